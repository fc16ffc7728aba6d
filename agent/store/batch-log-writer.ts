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
import { stopWhenAsked } from './database';

/** The code of what was handed to the writer thread after stop(): not stored, the agent is stopping. */
export const WRITER_STOPPED = 'WRITER_STOPPED';

/** An error from the writer thread: SQLite's error code and message, as a caller on this thread would see them. */
export class StoreWriteError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Bytes written after which the writer thread has the WAL start over (batch-log.worker.ts
 * restartWal): the WAL file stays about this big under any load and is written again in place.
 */
const WAL_RESTART_BYTES = 32 * 1024 * 1024;

/** The longest the agent's event loop is held settling the thread's answers in one go, ms (see drain). */
const SETTLE_SLICE_MS = 4;

/** Bytes of shared memory batches are staged in for the thread (see StagingRing). */
const STAGING_BYTES = 16 * 1024 * 1024;

/**
 * Shared memory the batches are copied into for the thread to read in place. The alternative, a
 * fresh buffer per batch moved to the thread, is new memory each time (on this machine memory
 * fresh from the kernel is written at ~300 MB/s, memory written before at ~6 GB/s); this memory
 * stays resident and is written again and again. Spans are taken at the head and come back in the order they were taken (the
 * thread answers appends in order), so the free space is one run that may wrap around the end.
 */
export class StagingRing {
  readonly buf: Buffer;
  private head = 0;
  private tail = 0;
  /** Spans in use, oldest first: [start, end, given back]. */
  private spans: [number, number, boolean][] = [];

  constructor(bytes = STAGING_BYTES) {
    this.buf = Buffer.from(new SharedArrayBuffer(bytes));
  }

  /** A copy of `src` in the ring: its span [start, end, given back], or null when it has no room (the caller copies elsewhere). */
  stage(src: Buffer): [number, number, boolean] | null {
    const n = src.length;
    if (n === 0) return null;
    let at: number;
    if (this.spans.length === 0) {
      this.head = this.tail = 0;
      at = n <= this.buf.length ? 0 : -1;
    } else if (this.head > this.tail) {
      // In use: [tail, head). Free: [head, end) and [0, tail).
      at = this.buf.length - this.head >= n ? this.head : n <= this.tail ? 0 : -1;
    } else {
      // Wrapped, in use: [tail, end) and [0, head). Free: [head, tail).
      at = this.tail - this.head >= n ? this.head : -1;
    }
    if (at < 0) return null;
    src.copy(this.buf, at);
    this.head = at + n;
    const span: [number, number, boolean] = [at, at + n, false];
    this.spans.push(span);
    return span;
  }

  /** The thread is done with a span's bytes: they may be written again once every older span is too. */
  release(span: [number, number, boolean]): void {
    span[2] = true;
    while (this.spans.length && this.spans[0][2]) this.spans.shift();
    if (this.spans.length) this.tail = this.spans[0][0];
  }

  get spansInUse(): number {
    return this.spans.length;
  }
}

/** A request without its id (the writer numbers them); Omit taken per member of the union. */
type WithoutId<T> = T extends unknown ? Omit<T, 'id'> : never;
type Request = WithoutId<WriterRequest>;

export class BatchLogWriter {
  private readonly worker: Worker;
  private readonly stopThread: () => Promise<void>;
  private stopping = false;
  private nextId = 1;
  /** `batchOf`: the process of a batch (refusals of batches are resumed per process); `span`: its bytes in the ring. */
  private readonly pending = new Map<
    number,
    { batchOf: string | null; span: [number, number, boolean] | null; resolve: (v: number) => void; reject: (e: Error) => void }
  >();
  private readonly ring = new StagingRing();
  /** The thread's answers not settled yet, oldest first; `next`: the first of its `done` left. */
  private readonly replies: { reply: WriterReply; next: number }[] = [];
  private draining = false;
  /** Set when the thread is gone: every request from then on fails with it. */
  private dead: Error | null = null;

  /** `walRestartBytes`: written bytes after which the thread has the WAL start over (tests make it small). */
  constructor(file: string, opts: { fsync?: boolean; walRestartBytes?: number } = {}) {
    this.worker = new Worker(path.join(__dirname, 'batch-log.worker.js'), {
      workerData: { file, fsync: !!opts.fsync, staging: this.ring.buf.buffer, walRestartBytes: opts.walRestartBytes ?? WAL_RESTART_BYTES },
    });
    this.worker.unref();
    this.stopThread = stopWhenAsked(this.worker);
    this.worker.on('message', (r: WriterReply) => {
      this.replies.push({ reply: r, next: 0 });
      if (!this.draining) void this.drain();
    });
    const gone = (why: string) => {
      // What the thread answered before it went is settled as it answered, not refused.
      while (this.settleNext());
      // Asked to stop (the agent stops): what was handed over after that is not stored, as a
      // write that was never made; only a thread that ended by itself calls for a restart.
      this.dead ??= this.stopping
        ? new StoreWriteError(WRITER_STOPPED, "the agent is stopping: the store's writer thread ended before this write")
        : new StoreWriteError('WRITER_GONE', `the store's writer thread ${why}; restart the agent`);
      for (const p of this.pending.values()) {
        if (p.span) this.ring.release(p.span);
        p.reject(this.dead);
      }
      this.pending.clear();
    };
    this.worker.on('error', (e) => gone(`failed: ${e.message}`));
    this.worker.on('exit', (code) => gone(`exited (code ${code})`));
  }

  /** Stores one batch; resolves once it is committed, rejects (StoreWriteError) when it was not stored. */
  append(process: string, table: string, seq: number, count: number, records: Buffer, writer?: string): Promise<void> {
    // A copy of exactly these bytes: `records` is usually a view into a larger buffer (the received
    // message), which posting the view would clone whole. In the ring when it has room (the thread
    // reads it in place), else a buffer of its own moved to the thread.
    const span = this.ring.stage(records);
    if (span)
      return this.request({ op: 'append', process, table, seq, count, writer, staged: [span[0], records.length] }, process, [], span).then(() => undefined);
    const own = new Uint8Array(records);
    return this.request({ op: 'append', process, table, seq, count, writer, records: own }, process, [own.buffer]).then(() => undefined);
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

  /**
   * Ends the thread after the requests it holds (those not answered by then are not
   * acknowledged); resolves once it has exited.
   */
  stop(): Promise<void> {
    this.stopping = true;
    return this.stopThread();
  }

  private request(req: Request, batchOf: string | null, transfer: ArrayBuffer[], span: [number, number, boolean] | null = null): Promise<number> {
    if (this.dead) {
      if (span) this.ring.release(span);
      return Promise.reject(this.dead);
    }
    const id = this.nextId++;
    return new Promise<number>((resolve, reject) => {
      this.pending.set(id, { batchOf, span, resolve, reject });
      this.worker.postMessage({ ...req, id } as WriterRequest, transfer);
    });
  }

  /**
   * Settles the thread's answers in the order they came, in slices of SETTLE_SLICE_MS of the
   * event loop. One answer can commit dozens of batches, and each resolution runs its batch's
   * application (the replica, the subscribers, the acknowledgement): all of them in one turn held
   * the agent's loop for 20-30 ms under a sustained load. Settling later is what a slower commit
   * would look like: order and outcomes are the same.
   */
  private async drain(): Promise<void> {
    if (this.draining) return;
    this.draining = true;
    try {
      let until = performance.now() + SETTLE_SLICE_MS;
      while (this.settleNext()) {
        // Lets what was settled run (its reactions are queued by now), so the clock counts it;
        // past the slice, the rest waits for the next turn.
        await null;
        if (performance.now() >= until) {
          await new Promise((resolve) => setImmediate(resolve));
          until = performance.now() + SETTLE_SLICE_MS;
        }
      }
    } finally {
      this.draining = false;
    }
  }

  /**
   * Settles the oldest answer not settled yet: one committed request, or, once an answer's
   * commits are settled, its refusals. False when there is nothing left.
   */
  private settleNext(): boolean {
    const q = this.replies[0];
    if (!q) return false;
    if (q.next < q.reply.done.length) {
      const d = q.reply.done[q.next++];
      this.settle(d.id)?.resolve(d.value);
      return true;
    }
    this.replies.shift();
    const refused = new Set<string>();
    for (const f of q.reply.failed) {
      const p = this.settle(f.id);
      if (p?.batchOf) refused.add(p.batchOf);
      p?.reject(new StoreWriteError(f.code, f.message));
    }
    // The rejections' handlers run before anything else here (the tables' next expected batches
    // went back): whatever comes after this is sent knowing of the refusal, and is tried again.
    for (const process of refused) this.worker.postMessage({ resume: process } satisfies ResumeMessage);
    return true;
  }

  private settle(id: number) {
    const p = this.pending.get(id);
    this.pending.delete(id);
    if (p?.span) this.ring.release(p.span);
    return p;
  }
}
