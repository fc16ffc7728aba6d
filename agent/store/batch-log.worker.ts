/**
 * Appends checkpoint batches to the store's log on a thread of its own, with its own SQLite
 * connection (see batch-log-writer.ts for why).
 *
 * Batches that arrive while a commit runs are stored together in the next transaction (group
 * commit). Each batch is answered once its transaction committed. A batch that could not be
 * stored is answered with the error, and so is every later batch of the same process until the
 * agent, having seen the refusal, says `resume`: batches handed over before the agent knew are
 * never stored behind a refused one (no gap in a table's log, nothing stored that its writer
 * will resend).
 */
import Database from 'better-sqlite3';
import { parentPort, workerData } from 'node:worker_threads';

export interface AppendMessage {
  id: number;
  process: string;
  table: string;
  seq: number;
  count: number;
  records: Uint8Array;
}

/** One reply per group: the ids stored, and the ids refused with why. */
export interface AppendReply {
  stored: number[];
  failed: { id: number; code: string; message: string }[];
}

const { file } = workerData as { file: string };
const db = new Database(file);
db.pragma('busy_timeout = 5000');
db.pragma(`synchronous = ${(workerData as { fsync: boolean }).fsync ? 'FULL' : 'NORMAL'}`);
const insert = db.prepare('INSERT INTO ckpt_batches (process, tbl, seq, count, records) VALUES (?, ?, ?, ?, ?)');
const insertAll = db.transaction((group: AppendMessage[]) => {
  for (const m of group) insert.run(m.process, m.table, m.seq, m.count, m.records);
});

/** Sent by the agent once it handled the refusals of `process`: its next batches are tried again. */
export interface ResumeMessage {
  resume: string;
}

/** Process -> why its batch was refused: its later batches are refused too until resumed. */
const blocked = new Map<string, { code: string; message: string }>();
let queue: AppendMessage[] = [];
let scheduled = false;

function flush(): void {
  scheduled = false;
  const group = queue;
  queue = [];
  const reply: AppendReply = { stored: [], failed: [] };
  const ready: AppendMessage[] = [];
  for (const m of group) {
    const b = blocked.get(m.process);
    if (b) reply.failed.push({ id: m.id, ...b });
    else ready.push(m);
  }
  try {
    insertAll(ready);
    for (const m of ready) reply.stored.push(m.id);
  } catch {
    // Which one? Each on its own, in order, so that exactly the failing batch and the later ones
    // of its process are refused (nothing of the group's transaction was kept).
    for (const m of ready) {
      const b = blocked.get(m.process);
      if (b) {
        reply.failed.push({ id: m.id, ...b });
        continue;
      }
      try {
        insert.run(m.process, m.table, m.seq, m.count, m.records);
        reply.stored.push(m.id);
      } catch (e) {
        const err = { code: String((e as { code?: unknown }).code ?? 'unknown'), message: (e as Error).message };
        blocked.set(m.process, err);
        reply.failed.push({ id: m.id, ...err });
      }
    }
  }
  parentPort!.postMessage(reply);
}

parentPort!.on('message', (m: AppendMessage | ResumeMessage | 'stop') => {
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
