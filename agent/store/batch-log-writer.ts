/**
 * The store's big writes happen on a thread of their own (batch-log.worker.ts): the batch log,
 * and compaction's snapshot chunks and removals.
 *
 * Why: a write() into the state disk's page cache can block in the kernel (ext4 waiting on its
 * journal while hundreds of MB of earlier writes go out). On the agent's one thread such an
 * insert held the event loop for 100-150 ms now and then under a sustained load, and every
 * acknowledgement, keepalive and switchover waited with it (the same run on tmpfs had no such
 * stall). On a thread of its own a slow commit delays only the writes in it. One writer for both
 * also means the two never wait for each other's lock (SQLite's busy handler sleeps).
 *
 * Invariants:
 * - A request's promise resolves only after its transaction committed (as durable as the
 *   database's synchronous setting makes any commit), so an acknowledgement never covers a batch
 *   the store does not hold.
 * - Requests run in the order they were made. When a batch is refused, every batch of its process
 *   handed over before the refusal was seen here is refused too: a table's log never gets a gap,
 *   and nothing is stored behind a refused batch that its writer will send again.
 */
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { ResumeMessage, WriterReply, WriterRequest } from './batch-log.worker';

/** An error from the writer thread: SQLite's error code and message, as a caller on this thread would see them. */
export class StoreWriteError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** A request without its id (the writer numbers them); Omit taken per member of the union. */
type WithoutId<T> = T extends unknown ? Omit<T, 'id'> : never;
type Request = WithoutId<WriterRequest>;

export class BatchLogWriter {
  private readonly worker: Worker;
  private nextId = 1;
  /** `batchOf`: the process of a batch (refusals of batches are resumed per process). */
  private readonly pending = new Map<number, { batchOf: string | null; resolve: (v: number) => void; reject: (e: Error) => void }>();
  /** Set when the thread is gone: every request from then on fails with it. */
  private dead: Error | null = null;

  constructor(file: string, opts: { fsync?: boolean } = {}) {
    this.worker = new Worker(path.join(__dirname, 'batch-log.worker.js'), { workerData: { file, fsync: !!opts.fsync } });
    this.worker.unref();
    this.worker.on('message', (r: WriterReply) => {
      for (const d of r.done) this.settle(d.id)?.resolve(d.value);
      const refused = new Set<string>();
      for (const f of r.failed) {
        const p = this.settle(f.id);
        if (p?.batchOf) refused.add(p.batchOf);
        p?.reject(new StoreWriteError(f.code, f.message));
      }
      // The rejections' handlers run before anything else here (the tables' next expected batches
      // went back): whatever comes after this is sent knowing of the refusal, and is tried again.
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
    // A copy of exactly these bytes, moved to the thread: `records` is usually a view into a larger
    // buffer (the received message), which posting the view would clone whole.
    const own = new Uint8Array(records);
    return this.request({ op: 'append', process, table, seq, count, records: own }, process, [own.buffer]).then(() => undefined);
  }

  /**
   * A compaction request; resolves with its number (beginSnapshot: the new generation;
   * dropReplaced: rows removed). A writeChunk's bytes must not change until it resolves: arenas
   * (SharedArrayBuffers) are read by the thread in place, other buffers are copied.
   */
  compaction(req: Exclude<Request, { op: 'append' }>): Promise<number> {
    return this.request(req, null, []);
  }

  /** Requests handed over and not answered yet. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Ends the thread after the requests it holds; those not answered by then are not acknowledged. */
  stop(): void {
    if (!this.dead) this.worker.postMessage('stop');
  }

  private request(req: Request, batchOf: string | null, transfer: ArrayBuffer[]): Promise<number> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise<number>((resolve, reject) => {
      this.pending.set(id, { batchOf, resolve, reject });
      this.worker.postMessage({ ...req, id } as WriterRequest, transfer);
    });
  }

  private settle(id: number) {
    const p = this.pending.get(id);
    this.pending.delete(id);
    return p;
  }
}
