/**
 * Runs SQLite WAL checkpoints on a thread of its own, with its own connection.
 *
 * Why: an automatic checkpoint runs inside the commit that crosses the threshold, on the agent's
 * only thread, and copying tens of MB back into the database stalls every write and ack for
 * hundreds of milliseconds. A PASSIVE checkpoint from another connection never blocks writers.
 * A checkpoint the disk has no room to finish is not started (see wal-checkpoint.ts).
 */
import Database from 'better-sqlite3';
import { parentPort, workerData } from 'node:worker_threads';
import { checkpointIfRoom } from './wal-checkpoint';

/** Posted to the agent when checkpoints start failing (per error code) and when they work again. */
export type CheckpointWorkerReport = { ok: true } | { ok: false; code: string; message: string };

const { file, intervalMs, fsync } = workerData as { file: string; intervalMs: number; fsync: boolean };
const db = new Database(file);
db.pragma('busy_timeout = 1000');
// Without --fsync the agent promises survival of its own crash, not of a power loss: the WAL and
// database pages in the OS page cache are enough, and an fsync here would stall the agent's
// writes to the same files (measured as 10-30 ms spikes in SYNC acknowledgements).
db.pragma(`synchronous = ${fsync ? 'FULL' : 'OFF'}`);
/** The code of the failure last reported, so a failing checkpoint is reported once, not every round. */
let failing: string | null = null;
const report = (code: string, message: string) => {
  if (code === failing) return;
  failing = code;
  parentPort?.postMessage({ ok: false, code, message } satisfies CheckpointWorkerReport);
};
const mib = (n: number) => (n / 1048576).toFixed(1);
const timer = setInterval(() => {
  try {
    const r = checkpointIfRoom(db, file);
    if (!r.ran) {
      // Reported like the ENOSPC the checkpoint would have met.
      return report(
        'SQLITE_FULL',
        `a checkpoint must grow the database by ${mib(r.growBytes)} MiB and keep a reserve for writes; ${mib(r.freeBytes)} MiB are free`,
      );
    }
    if (failing) parentPort?.postMessage({ ok: true } satisfies CheckpointWorkerReport);
    failing = null;
  } catch (e) {
    const code = String((e as { code?: unknown }).code ?? 'unknown');
    // Busy: a writer holds the lock; try again next round.
    if (!code.startsWith('SQLITE_BUSY')) report(code, (e as Error).message);
  }
}, intervalMs);
parentPort?.on('message', (m) => {
  if (m === 'stop') {
    clearInterval(timer);
    db.close();
    process.exit(0);
  }
});
