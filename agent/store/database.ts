/**
 * Opens the agent's embedded database (SQLite through better-sqlite3) in the state directory.
 *
 * WAL: a committed transaction survives a crash of the agent process (the kill -9 case every
 * component must tolerate). By default nothing of the batch log and its checkpoints is synced
 * (the writer and checkpoint threads run synchronous=OFF; this connection's small writes run
 * NORMAL), so a power loss may lose recent batches and can leave the database damaged. With
 * `fsync: true` every commit and checkpoint is synced (FULL), which survives a power loss at the
 * cost of write latency.
 */
import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { diskFull, isDiskFull, unavailable } from '../common/errors';
import { Logger } from '../common/logger';
import { BUSY_TIMEOUT_MS } from './busy-timeout';
import type { CheckpointWorkerReport } from './wal-checkpoint.worker';

export type Db = Database.Database;

export function openDatabase(stateDir: string, opts: { fsync?: boolean; log?: Logger } = {}): Db {
  fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const file = path.join(stateDir, 'hitless.db');
  let db: Db;
  try {
    db = new Database(file);
    db.pragma('journal_mode = WAL');
    db.pragma(`synchronous = ${opts.fsync ? 'FULL' : 'NORMAL'}`);
    // Checkpoints run on a worker thread (see wal-checkpoint.worker.ts), never inside a commit.
    db.pragma('wal_autocheckpoint = 0');
    db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  } catch (e) {
    // A fresh WAL and its index need room before the first read.
    if (isDiskFull(e, stateDir)) throw diskFull(stateDir, 'start the agent again; nothing stored was changed');
    throw e;
  }
  const worker = new Worker(path.join(__dirname, 'wal-checkpoint.worker.js'), {
    workerData: { file, intervalMs: 100, fsync: !!opts.fsync },
  });
  worker.unref();
  watchCheckpointWorker(worker, stateDir, opts.log);
  const stop = stopWhenAsked(worker);
  onDatabaseClose(db, stop);
  return db;
}

/** What must stop before a database's own connection closes: its threads, newest first. */
const closers = new WeakMap<Db, Array<() => Promise<void>>>();
/** A close under way: a second closeDatabase() waits for it instead of closing early. */
const closing = new WeakMap<Db, Promise<void>>();

/**
 * Registers a thread (or anything else holding its own connection to the database file) that
 * `closeDatabase` stops first. Threads registered later stop earlier: a writer thread flushes
 * before the checkpoint thread it relies on goes away.
 */
export function onDatabaseClose(db: Db, stop: () => Promise<void>): void {
  const list = closers.get(db) ?? [];
  list.unshift(stop);
  closers.set(db, list);
}

/**
 * Closes the database: its threads first, each awaited until it has exited (their connections
 * are closed then, and nothing touches the state directory any more), then this connection.
 * `db.close()` alone would leave the threads closing their connections afterwards, which may
 * still create or delete the WAL and its index in the directory.
 */
export function closeDatabase(db: Db): Promise<void> {
  let done = closing.get(db);
  if (!done) {
    done = (async () => {
      for (const stop of closers.get(db) ?? []) await stop();
      if (db.open) db.close();
    })();
    closing.set(db, done);
  }
  return done;
}

/**
 * How a worker thread of the store is stopped: posts 'stop' (the thread finishes what it holds,
 * closes its connection and exits) and resolves once the thread has exited; at once when it
 * already had. Every call after the first gets the same promise.
 */
export function stopWhenAsked(worker: Worker): () => Promise<void> {
  let exited = false;
  const gone = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
  void gone.then(() => (exited = true));
  let asked: Promise<void> | null = null;
  return () => {
    if (!asked) {
      if (!exited) {
        // The thread is unref'd so that it never keeps the agent alive by itself; awaiting its
        // exit must, or the process would end with the awaiting code (the rest of a shutdown)
        // never run.
        worker.ref();
        worker.postMessage('stop');
      }
      asked = gone;
    }
    return asked;
  };
}

/**
 * Logs what the WAL checkpoint worker reports, once per episode: a checkpoint that cannot copy
 * the WAL into a full disk leaves the WAL growing (and every later write then refused), which an
 * operator must hear about; a worker that dies must not take the agent with it.
 */
function watchCheckpointWorker(worker: Worker, stateDir: string, log: Logger | undefined): void {
  worker.on('message', (m: CheckpointWorkerReport) => {
    if (m.ok) {
      log?.info('WAL checkpoints succeed again');
    } else if (isDiskFull({ code: m.code }, stateDir)) {
      log?.warn(
        { code: m.code, detail: m.message },
        `${diskFull(stateDir, 'WAL checkpoints resume by themselves').message}; until then the WAL is not copied into the database`,
      );
    } else {
      log?.warn({ code: m.code, err: m.message }, 'WAL checkpoint failed; retrying');
    }
  });
  worker.on('error', (e) => log?.error({ err: e.message }, 'the WAL checkpoint worker failed; the WAL grows until the agent restarts'));
}

/**
 * Runs a write of the store; a full state disk becomes a RESOURCE_EXHAUSTED error saying what
 * happens once there is room (`then`), and a database that another connection kept locked past
 * the busy timeout an UNAVAILABLE one (the writer tries again: the SDK registers again and
 * resends). SQLite rolled the statement or transaction back by then, so nothing of it is stored.
 * A write that finishes later (the store's writer thread) is given as its promise, and is
 * translated the same way when it is refused.
 */
export function storeWrite<T>(db: Db, then: string | (() => string), fn: () => T): T;
export function storeWrite<T>(db: Db, then: string | (() => string), pending: Promise<T>): Promise<T>;
export function storeWrite<T>(db: Db, then: string | (() => string), work: (() => T) | Promise<T>): T | Promise<T> {
  const translate = (e: unknown) => {
    const dir = path.dirname(db.name);
    const next = () => (typeof then === 'string' ? then : then());
    if (isDiskFull(e, dir)) return diskFull(dir, next());
    if (isBusy(e)) {
      return unavailable(
        `the agent's state database (${db.name}) stayed locked by another connection for ${BUSY_TIMEOUT_MS / 1000} s; is a program other than the agent writing to it? Then ${next()}`,
      );
    }
    return e;
  };
  if (work instanceof Promise) {
    return work.catch((e: unknown) => {
      throw translate(e);
    });
  }
  try {
    return work();
  } catch (e) {
    throw translate(e);
  }
}

/** SQLITE_BUSY and its extended codes: another connection's lock, held past the busy timeout. */
function isBusy(e: unknown): boolean {
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' && code.startsWith('SQLITE_BUSY');
}
