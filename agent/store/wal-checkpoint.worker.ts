/**
 * Runs SQLite WAL checkpoints on a thread of its own, with its own connection.
 *
 * Why: an automatic checkpoint runs inside the commit that crosses the threshold, on the agent's
 * only thread, and copying tens of MB back into the database stalls every write and ack for
 * hundreds of milliseconds. A PASSIVE checkpoint from another connection never blocks writers.
 */
import Database from 'better-sqlite3';
import { parentPort, workerData } from 'node:worker_threads';

const { file, intervalMs, fsync } = workerData as { file: string; intervalMs: number; fsync: boolean };
const db = new Database(file);
db.pragma('busy_timeout = 1000');
// Without --fsync the agent promises survival of its own crash, not of a power loss: the WAL and
// database pages in the OS page cache are enough, and an fsync here would stall the agent's
// writes to the same files (measured as 10-30 ms spikes in SYNC acknowledgements).
db.pragma(`synchronous = ${fsync ? 'FULL' : 'OFF'}`);
const timer = setInterval(() => {
  try {
    db.pragma('wal_checkpoint(PASSIVE)');
  } catch {
    // busy: try again next round
  }
}, intervalMs);
parentPort?.on('message', (m) => {
  if (m === 'stop') {
    clearInterval(timer);
    db.close();
    process.exit(0);
  }
});
