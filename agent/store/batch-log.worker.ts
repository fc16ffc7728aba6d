/**
 * Writes the checkpoint store's big tables on a thread of its own, with its own SQLite
 * connection (see batch-log-writer.ts for why): the batch log, and compaction's snapshot chunks
 * and removals. Requests run in the order they arrive.
 *
 * Batches that arrive while a commit runs are stored together in the next transaction (group
 * commit). Each request is answered once its transaction committed. A batch that could not be
 * stored is answered with the error, and so is every later batch of the same process until the
 * agent, having seen the refusal, says `resume`: batches handed over before the agent knew are
 * never stored behind a refused one (no gap in a table's log, nothing stored that its writer
 * will resend). Compaction requests fail on their own; they never block batches.
 */
import Database from 'better-sqlite3';
import { parentPort, workerData } from 'node:worker_threads';
import { BUSY_TIMEOUT_MS } from './busy-timeout';
import { checkpointIfRoom } from './wal-checkpoint';

export type WriterRequest =
  // An append's bytes: `records` of its own, or `staged` [offset, length] in the staging ring.
  // `writer`: the table's last writer becomes this instance id, with this batch.
  | { id: number; op: 'append'; process: string; table: string; seq: number; count: number; writer?: string; records?: Uint8Array; staged?: [number, number] }
  | { id: number; op: 'beginSnapshot'; process: string; table: string }
  | { id: number; op: 'writeChunk'; process: string; table: string; gen: number; chunk: number; records: Uint8Array }
  | { id: number; op: 'commitSnapshot'; process: string; table: string; gen: number; seq: number }
  | { id: number; op: 'abortSnapshot'; process: string; table: string; gen: number }
  | { id: number; op: 'dropReplaced'; process: string; table: string; limit: number };

/** Sent by the agent once it handled the refusals of `process`: its next batches are tried again. */
export interface ResumeMessage {
  resume: string;
}

/** One reply per round: the requests done (with a number for those that answer one), and the ones refused with why. */
export interface WriterReply {
  done: { id: number; value: number }[];
  failed: { id: number; code: string; message: string }[];
}

const { file, fsync, staging, walRestartBytes } = workerData as { file: string; fsync: boolean; staging: SharedArrayBuffer; walRestartBytes: number };
/** The agent's staging ring (batch-log-writer.ts), shared once here so requests carry only offsets. */
const stagingBytes = Buffer.from(staging);
const bytesOf = (m: Append): Uint8Array => (m.staged ? stagingBytes.subarray(m.staged[0], m.staged[0] + m.staged[1]) : m.records!);
const db = new Database(file);
db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
// Without --fsync nothing is synced, as on the checkpoint thread: in WAL mode a commit is never
// synced below FULL anyway, and NORMAL would add an fsync of the WAL each time the WAL starts over
// (restartWal), measured as 20-40 ms stalls of the batches behind it. A crash of the agent loses
// nothing committed; a power loss needs --fsync (FULL: every commit synced).
db.pragma(`synchronous = ${fsync ? 'FULL' : 'OFF'}`);
// Every connection checkpoints on its own when a commit crosses the WAL threshold (1000 pages by
// default), inside that commit. Here that held a batch's commit for 8-12 ms every few hundred ms
// under a steady load (copying the WAL into the database, then an fsync), and every SYNC ack
// behind it waited; such a checkpoint would also skip the room check a nearly full disk needs.
// The copying belongs to the checkpoint thread (wal-checkpoint.worker.ts); this thread only has
// the WAL start over now and then, between rounds (restartWal).
db.pragma('wal_autocheckpoint = 0');
const q = {
  append: db.prepare('INSERT INTO ckpt_batches (process, tbl, seq, count, records) VALUES (?, ?, ?, ?, ?)'),
  setWriter: db.prepare('UPDATE ckpt_tables SET last_writer = ? WHERE process = ? AND name = ?'),
  nextGen: db.prepare('UPDATE ckpt_tables SET next_gen = next_gen + 1 WHERE process = ? AND name = ? RETURNING next_gen - 1 AS g'),
  writeChunk: db.prepare('INSERT INTO ckpt_snapshots (process, tbl, gen, chunk, records) VALUES (?, ?, ?, ?, ?)'),
  setSnap: db.prepare('UPDATE ckpt_tables SET snap_seq = ?, snap_gen = ? WHERE process = ? AND name = ?'),
  snapSeq: db.prepare('SELECT snap_seq AS s, snap_gen AS g FROM ckpt_tables WHERE process = ? AND name = ?'),
  dropGen: db.prepare('DELETE FROM ckpt_snapshots WHERE process = ? AND tbl = ? AND gen = ?'),
  minSeq: db.prepare('SELECT MIN(seq) AS s FROM ckpt_batches WHERE process = ? AND tbl = ?'),
  // Replaced rows go by key ranges found by seeks, never a walk over the current generation's
  // rows: stepping over a row reads its blob's pages (90 ms for a million records' snapshot),
  // and a DELETE driven by a subquery was planned as such a scan, per call.
  olderGen: db.prepare('SELECT gen FROM ckpt_snapshots WHERE process = ? AND tbl = ? AND gen < ? ORDER BY gen LIMIT 1'),
  newerGen: db.prepare('SELECT gen FROM ckpt_snapshots WHERE process = ? AND tbl = ? AND gen > ? ORDER BY gen LIMIT 1'),
  minChunk: db.prepare('SELECT MIN(chunk) AS c FROM ckpt_snapshots WHERE process = ? AND tbl = ? AND gen = ?'),
  dropChunks: db.prepare('DELETE FROM ckpt_snapshots WHERE process = ? AND tbl = ? AND gen = ? AND chunk >= ? AND chunk < ?'),
  dropBatches: db.prepare('DELETE FROM ckpt_batches WHERE process = ? AND tbl = ? AND seq >= ? AND seq < ? AND seq <= ?'),
};
type Append = Extract<WriterRequest, { op: 'append' }>;
function storeBatch(m: Append): void {
  q.append.run(m.process, m.table, m.seq, m.count, bytesOf(m));
  if (m.writer !== undefined) q.setWriter.run(m.writer, m.process, m.table);
}
const appendAll = db.transaction((group: Append[]) => {
  for (const m of group) storeBatch(m);
});
/** One batch in its own transaction: the batch and its writer change are stored together or not at all. */
const appendOne = db.transaction(storeBatch);

/** Runs one compaction request; returns its number (a generation, rows removed) or 0. */
function run(m: Exclude<WriterRequest, Append>): number {
  switch (m.op) {
    case 'beginSnapshot':
      return (q.nextGen.get(m.process, m.table) as { g: number }).g;
    case 'writeChunk':
      q.writeChunk.run(m.process, m.table, m.gen, m.chunk, m.records);
      return 0;
    case 'commitSnapshot':
      q.setSnap.run(m.seq, m.gen, m.process, m.table);
      return 0;
    case 'abortSnapshot':
      q.dropGen.run(m.process, m.table, m.gen);
      return 0;
    case 'dropReplaced':
      return dropReplaced(m.process, m.table, m.limit);
  }
}

/** See CheckpointStore.dropReplaced. */
function dropReplaced(process: string, table: string, limit: number): number {
  const row = q.snapSeq.get(process, table) as { s: number; g: number } | undefined;
  if (!row || row.g === 0) return 0;
  // Other generations: older ones, and newer ones a failed compaction left (only one compaction
  // of a table runs at a time, and this is called from it).
  const old = (q.olderGen.get(process, table, row.g) ?? q.newerGen.get(process, table, row.g)) as { gen: number } | undefined;
  if (old) {
    const from = (q.minChunk.get(process, table, old.gen) as { c: number }).c;
    return q.dropChunks.run(process, table, old.gen, from, from + limit).changes;
  }
  const min = (q.minSeq.get(process, table) as { s: number | null }).s;
  if (min === null || min > row.s) return 0;
  return q.dropBatches.run(process, table, min, min + limit, row.s).changes;
}

/** Bytes of records written since this thread last had the WAL start over (the WAL's growth, roughly). */
let walWritten = 0;
/**
 * `walWritten` at which restartWal tries next: `walRestartBytes`, and after an attempt that could
 * not finish, another 1/32 of it later, so that a lasting cause (no room on the disk, a reader
 * holding an old snapshot) does not cost every round a checkpoint attempt.
 */
let nextRestartAt = walRestartBytes;

const failure = (e: unknown) => ({ code: String((e as { code?: unknown }).code ?? 'unknown'), message: (e as Error).message });

/** Process -> why its batch was refused: its later batches are refused too until resumed. */
const blocked = new Map<string, { code: string; message: string }>();
let queue: WriterRequest[] = [];
let scheduled = false;

/** Stores a run of batches in one transaction, or, when that fails, one by one to find the culprit. */
function appendRun(run: Append[], reply: WriterReply): void {
  const ready: Append[] = [];
  for (const m of run) {
    const b = blocked.get(m.process);
    if (b) reply.failed.push({ id: m.id, ...b });
    else ready.push(m);
  }
  try {
    appendAll(ready);
    for (const m of ready) reply.done.push({ id: m.id, value: 0 });
  } catch {
    // Nothing of the group's transaction was kept: each on its own, in order, so that exactly the
    // failing batch and the later ones of its process are refused.
    for (const m of ready) {
      const b = blocked.get(m.process);
      if (b) {
        reply.failed.push({ id: m.id, ...b });
        continue;
      }
      try {
        appendOne(m);
        reply.done.push({ id: m.id, value: 0 });
      } catch (e) {
        const err = failure(e);
        blocked.set(m.process, err);
        reply.failed.push({ id: m.id, ...err });
      }
    }
  }
}

function flush(): void {
  scheduled = false;
  if (queue.length === 0) return; // a `resume` or `stop` flushed it already
  const round = queue;
  queue = [];
  for (const m of round) walWritten += m.op === 'append' ? (m.staged?.[1] ?? m.records!.length) : m.op === 'writeChunk' ? m.records.length : 0;
  const reply: WriterReply = { done: [], failed: [] };
  for (let i = 0; i < round.length;) {
    const m = round[i];
    if (m.op === 'append') {
      let j = i;
      while (j < round.length && round[j].op === 'append') j++;
      appendRun(round.slice(i, j) as Append[], reply);
      i = j;
      continue;
    }
    try {
      reply.done.push({ id: m.id, value: run(m) });
    } catch (e) {
      reply.failed.push({ id: m.id, ...failure(e) });
    }
    i++;
  }
  parentPort!.postMessage(reply);
  restartWal();
}

/**
 * Has the next write start the WAL over from its beginning once about `walRestartBytes` were
 * written since it last did.
 *
 * Why here: the checkpoint thread's PASSIVE checkpoints copy only what was committed when they
 * began, and SQLite reuses the WAL from its start only when a write finds every frame copied.
 * Under a steady stream of batches that never happens: the WAL grew by the whole stream (188 MB
 * in 9 s at 13 MB/s). This thread is the batch log's only writer, so a checkpoint it runs
 * between its own transactions copies every frame, and only those the checkpoint thread has not
 * copied yet (that runs every 100 ms). It runs after the round's answers left: only batches that
 * arrive meanwhile wait for it, and there is no lock to wait for (a PASSIVE checkpoint never
 * waits; when the checkpoint thread is copying, this one is incomplete and comes back a little
 * later). The room check applies as to every checkpoint.
 */
function restartWal(): void {
  if (walWritten <= nextRestartAt) return;
  let done = false;
  try {
    const r = checkpointIfRoom(db, file);
    done = r.ran && r.complete;
  } catch {
    // Failing (an I/O error, a full disk): the checkpoint thread meets it too and reports it.
  }
  if (done) walWritten = 0;
  nextRestartAt = done ? walRestartBytes : walWritten + walRestartBytes / 32;
}

parentPort!.on('message', (m: WriterRequest | ResumeMessage | 'stop') => {
  if (m === 'stop') {
    if (queue.length) flush();
    db.close();
    process.exit(0);
  }
  if ('resume' in m) {
    // In order with the batches: those queued before it were handed over before the agent knew.
    if (queue.length) flush();
    blocked.delete(m.resume);
    return;
  }
  queue.push(m);
  if (!scheduled) {
    scheduled = true;
    setImmediate(flush);
  }
});
