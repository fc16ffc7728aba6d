/**
 * The store's batch log is written by a thread of its own (batch-log.worker.ts).
 *
 * Why: a write() into the state disk's page cache can block in the kernel (ext4 waiting on its
 * journal while hundreds of MB of earlier writes go out). On the agent's one thread such an
 * insert held the event loop for 100-150 ms now and then under a sustained load, and every
 * acknowledgement, keepalive and switchover waited with it (measured: the same run on tmpfs had
 * no such stall). On a thread of its own a slow commit delays only the batches in it.
 *
 * Invariants:
 * - append() resolves only after the batch's transaction committed (as durable as the database's
 *   synchronous setting makes any commit), so an acknowledgement never covers a batch the store
 *   does not hold.
 * - Batches are stored in the order append() was called. When one fails, every batch of its
 *   process handed over before its refusal was seen here fails too: a table's log never gets a
 *   gap, and nothing is stored behind a refused batch that its writer will send again.
 */
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { AppendMessage, AppendReply, ResumeMessage } from './batch-log.worker';

/** An error from the writer thread: SQLite's error code and message, as a caller on this thread would see them. */
export class StoreWriteError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export class BatchLogWriter {
  private readonly worker: Worker;
  private nextId = 1;
  private readonly pending = new Map<number, { process: string; resolve: () => void; reject: (e: Error) => void }>();
  /** Set when the thread is gone: every append from then on fails with it. */
  private dead: Error | null = null;

  constructor(file: string, opts: { fsync?: boolean } = {}) {
    this.worker = new Worker(path.join(__dirname, 'batch-log.worker.js'), { workerData: { file, fsync: !!opts.fsync } });
    this.worker.unref();
    this.worker.on('message', (r: AppendReply) => {
      for (const id of r.stored) this.settle(id)?.resolve();
      const refused = new Set<string>();
      for (const f of r.failed) {
        const p = this.settle(f.id);
        if (p) refused.add(p.process);
        p?.reject(new StoreWriteError(f.code, f.message));
      }
      // The rejections ran (the tables' next expected batches went back): what comes now is sent
      // knowing of the refusal, and is tried again.
      for (const process of refused) this.worker.postMessage({ resume: process } satisfies ResumeMessage);
    });
    const gone = (why: string) => {
      this.dead ??= new StoreWriteError('WRITER_GONE', `the store's writer thread ${why}; restart the agent`);
      for (const p of this.pending.values()) p.reject(this.dead);
      this.pending.clear();
    };
    this.worker.on('error', (e) => gone(`failed: ${e.message}`));
    this.worker.on('exit', (code) => gone(`exited (code ${code})`));
  }

  /** Stores one batch; resolves once it is committed, rejects (StoreWriteError) when it was not stored. */
  append(process: string, table: string, seq: number, count: number, records: Buffer): Promise<void> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    // A copy of exactly these bytes, moved to the thread: `records` is usually a view into a larger
    // buffer (the received message), which posting the view would clone whole.
    const own = new Uint8Array(records);
    const m: AppendMessage = { id, process, table, seq, count, records: own };
    return new Promise<void>((resolve, reject) => {
      this.pending.set(id, { process, resolve, reject });
      this.worker.postMessage(m, [own.buffer]);
    });
  }

  /** Batches handed over and not answered yet. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Ends the thread after the batches it holds; appends not answered by then are not acknowledged. */
  stop(): void {
    if (!this.dead) this.worker.postMessage('stop');
  }

  private settle(id: number) {
    const p = this.pending.get(id);
    this.pending.delete(id);
    return p;
  }
}
