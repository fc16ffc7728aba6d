/**
 * Runs SQLite WAL checkpoints on a thread of its own, with its own connection.
 *
 * Why: an automatic checkpoint runs inside the commit that crosses the threshold, on the agent's
 * only thread, and copying tens of MB back into the database stalls every write and ack for
 * hundreds of milliseconds. A PASSIVE checkpoint from another connection never blocks writers.
 */
import Database from 'better-sqlite3';
import { parentPort, workerData } from 'node:worker_threads';

const { file, intervalMs } = workerData as { file: string; intervalMs: number };
const db = new Database(file);
db.pragma('busy_timeout = 1000');
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
