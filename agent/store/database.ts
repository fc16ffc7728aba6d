/**
 * Opens the agent's embedded database (SQLite through better-sqlite3) in the state directory.
 *
 * WAL with synchronous=NORMAL: a committed transaction survives a crash of the agent process
 * (the kill -9 case every component must tolerate); with `fsync: true` every commit is also
 * flushed to disk, which additionally survives a power loss at the cost of write latency.
 */
import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';

export type Db = Database.Database;

export function openDatabase(stateDir: string, opts: { fsync?: boolean } = {}): Db {
  fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const db = new Database(path.join(stateDir, 'hitless.db'));
  db.pragma('journal_mode = WAL');
  db.pragma(`synchronous = ${opts.fsync ? 'FULL' : 'NORMAL'}`);
  // Checkpoints run on a worker thread (see wal-checkpoint.worker.ts), never inside a commit.
  db.pragma('wal_autocheckpoint = 0');
  db.pragma('busy_timeout = 5000');
  const worker = new Worker(path.join(__dirname, 'wal-checkpoint.worker.js'), {
    workerData: { file: path.join(stateDir, 'hitless.db'), intervalMs: 500, fsync: !!opts.fsync },
  });
  worker.unref();
  const close = db.close.bind(db);
  db.close = () => {
    worker.postMessage('stop');
    return close();
  };
  return db;
}
