/**
 * One standby's (or recovering active's) subscription: what it has been sent per table, and the
 * pump that brings it up to date.
 *
 * Per table the subscription is either:
 * - live: `sent` equals the table's sequence; a new batch is forwarded as it is applied, without
 *   being decoded again;
 * - behind: batches after `sent` are read from the store's log, in order, as the gRPC stream
 *   drains (a slow reader never makes the agent buffer without bound);
 * - snapshotting: a consistent snapshot at `sent` is being streamed on a bulk socket; changes after
 *   it may already follow on the gRPC stream, which the SDK applies after the snapshot.
 * Flow control is by acknowledgement: grpc-js buffers whatever is written to a server stream
 * without pushing back when the client stops reading, so the agent itself stops sending once
 * `windowBytes` of changes are unacknowledged. A subscriber that acknowledges nothing for the
 * stall timeout while the window is full is cut off with RESOURCE_EXHAUSTED; memory held for it
 * stays bounded by the window either way.
 *
 * A live subscription whose transport is momentarily full (write() said wait) keeps the batches
 * applied meanwhile in `held`, in order, within the same window (held + unacknowledged bytes), and
 * sends them when the transport drains. Only a subscriber further behind than the window is
 * served from the store's log: reading back from SQLite costs the agent far more than the
 * reference it already holds (at 2,000 batches/s it was most of the agent's time, and it made a
 * standby that fell behind fall further behind).
 */
import { status } from '@grpc/grpc-js';
import { HitlessError } from '../common/errors';
import { SubscribeEvent, SubscribeMode } from './messages';

export interface SubscriberStream {
  /** Returns false when the transport wants the writer to wait for onDrain. */
  write(ev: SubscribeEvent): boolean;
  onDrain(cb: () => void): void;
  end(): void;
  fail(err: HitlessError): void;
}

/** What a subscription needs from the service; kept narrow so it can be reasoned about alone. */
export interface SubscriptionHost {
  tableSeq(table: string): number;
  /** Batches after `after` from the durable log, or null when the log no longer reaches back. */
  readLog(table: string, after: number, limit: number): { seq: number; records: Buffer; count: number }[] | null;
  /**
   * Starts a bulk snapshot of `table`; returns the ticket event, the snapshot's sequence, and a
   * progress record whose `sent` counts the records written to the bulk socket so far.
   */
  startSnapshot(table: string, onDone: (err: Error | null) => void): { event: SubscribeEvent; seq: number; empty: boolean; progress?: SnapshotProgress };
  stallTimeoutMs: number;
  /** Unacknowledged change bytes allowed in flight to one subscriber. */
  windowBytes: number;
}

/** Records of a bulk snapshot written to the subscriber's socket so far, of `total`. */
export interface SnapshotProgress {
  sent: number;
  total: number;
}

interface TableCursor {
  sent: number;
  snapshotting: boolean;
  progress?: SnapshotProgress;
}

export class Subscription {
  private readonly cursors = new Map<string, TableCursor>();
  private blocked = false;
  private pumping = false;
  private stallTimer: NodeJS.Timeout | null = null;
  closed = false;
  /** RECOVER: snapshots still streaming before the subscription can end. */
  private pendingSnapshots = 0;
  /** Sent, not yet acknowledged changes per table: [seq, bytes] in sequence order. */
  private readonly unacked = new Map<string, [number, number][]>();
  private unackedBytes = 0;
  private windowFull = false;
  /** Per table, the last sequence to send while a switchover promotes this subscriber. */
  private cap: Record<string, number> | null = null;
  /**
   * Changes applied while the transport was blocked, oldest first from `heldHead`, to send when it
   * drains. Non-empty only while blocked; a table's held changes directly follow what was sent of
   * it, and its cursor's `sent` already counts them.
   */
  private held: { table: string; seq: number; records: Buffer; count: number }[] = [];
  private heldHead = 0;
  private heldBytes = 0;

  constructor(
    readonly sessionId: string,
    readonly mode: SubscribeMode,
    private readonly host: SubscriptionHost,
    private readonly stream: SubscriberStream,
    private readonly onClosed: (sub: Subscription) => void,
  ) {
    stream.onDrain(() => {
      if (this.windowFull) return;
      this.blocked = false;
      this.clearStall();
      this.pump();
    });
  }

  /** Plans each table from what the subscriber already has, then pumps. */
  start(tables: string[], have: Record<string, number>): void {
    for (const t of tables) {
      const seq = this.host.tableSeq(t);
      const h = have[t] ?? 0;
      if (h > 0 && h <= seq && this.host.readLog(t, h, 0) !== null) {
        this.cursors.set(t, { sent: h, snapshotting: false }); // resume from the log
      } else if (h === seq && h > 0) {
        this.cursors.set(t, { sent: h, snapshotting: false }); // already current
      } else {
        this.snapshot(t);
      }
    }
    this.pump();
  }

  /** Only with nothing held (start, or pump, which reaches tables once held changes are out). */
  private snapshot(table: string): void {
    const cursor: TableCursor = { sent: 0, snapshotting: true };
    this.cursors.set(table, cursor);
    this.pendingSnapshots++;
    const { event, seq, empty, progress } = this.host.startSnapshot(table, (err) => {
      cursor.snapshotting = false;
      this.pendingSnapshots--;
      if (err) this.fail(new HitlessError(status.ABORTED, `snapshot of table '${table}' failed: ${err.message}; subscribe again`));
      else this.pump();
    });
    cursor.sent = seq;
    cursor.progress = progress;
    if (empty) {
      cursor.snapshotting = false;
      this.pendingSnapshots--;
    }
    this.send(event);
  }

  /**
   * Records sent and in total over every snapshot of this subscription, while one still streams
   * (0 of 0 when none does). Finished tables count whole, so with several tables the total does
   * not shrink as the first ones finish: it is the standby's whole transfer.
   */
  snapshotProgress(): SnapshotProgress {
    const p = { sent: 0, total: 0 };
    let streaming = false;
    for (const c of this.cursors.values()) {
      if (!c.progress) continue;
      streaming ||= c.snapshotting;
      p.sent += c.snapshotting ? c.progress.sent : c.progress.total;
      p.total += c.progress.total;
    }
    return streaming ? p : { sent: 0, total: 0 };
  }

  /**
   * Sends nothing beyond `seqs` (what the old active wrote before it froze) until uncap(): the
   * subscriber is being promoted and its own first writes must not come back to it.
   */
  capAt(seqs: Record<string, number>): void {
    this.cap = { ...seqs };
  }

  uncap(): void {
    this.cap = null;
    this.pump();
  }

  /** The highest sequence of `table` this subscription may send now. */
  private limitOf(table: string): number {
    const seq = this.host.tableSeq(table);
    return this.cap ? Math.min(seq, this.cap[table] ?? seq) : seq;
  }

  /** Called by the service right after a batch was applied to `table`. */
  onBatch(table: string, seq: number, records: Buffer, count: number): void {
    const c = this.cursors.get(table);
    if (!c || this.closed) return;
    if (this.mode === 'RECOVER') return; // a recovering active gets the state, not later changes
    if (this.cap && seq > (this.cap[table] ?? seq)) return;
    if (c.sent === seq - 1) {
      if (!this.blocked) {
        c.sent = seq;
        this.send({ change: { table, seq, records, count } });
        return;
      }
      if (!this.windowFull && this.heldBytes + this.unackedBytes + records.length <= this.host.windowBytes) {
        c.sent = seq;
        this.held.push({ table, seq, records, count });
        this.heldBytes += records.length;
        return;
      }
    }
    this.pump(); // behind by more than the window: the log has it
  }

  /** Sends the held changes while the transport takes them; true when none is left. */
  private sendHeld(): boolean {
    while (this.heldHead < this.held.length && !this.blocked && !this.closed) {
      const h = this.held[this.heldHead++];
      this.heldBytes -= h.records.length;
      this.send({ change: h });
    }
    if (this.heldHead < this.held.length) return false;
    this.held = [];
    this.heldHead = 0;
    return true;
  }

  /** Adds a table created after the subscription started. */
  addTable(table: string): void {
    if (!this.cursors.has(table)) {
      this.cursors.set(table, { sent: 0, snapshotting: false });
      this.pump();
    }
  }

  private send(ev: SubscribeEvent): void {
    if (this.closed) return;
    if (ev.change && this.mode === 'FOLLOW') {
      let q = this.unacked.get(ev.change.table);
      if (!q) this.unacked.set(ev.change.table, (q = []));
      q.push([ev.change.seq, ev.change.records.length]);
      this.unackedBytes += ev.change.records.length;
      if (this.unackedBytes >= this.host.windowBytes) {
        this.windowFull = true;
        this.blocked = true;
        this.armStall();
      }
    }
    if (!this.stream.write(ev)) {
      this.blocked = true;
      this.armStall();
    }
  }

  /** The subscriber applied `table` up to `seq`: frees window and resumes sending. */
  onAck(table: string, seq: number): void {
    const q = this.unacked.get(table);
    let freed = 0;
    while (q && q.length && q[0][0] <= seq) freed += q.shift()![1];
    if (freed === 0) return;
    this.unackedBytes -= freed;
    this.clearStall();
    if (this.windowFull && this.unackedBytes < this.host.windowBytes / 2) {
      this.windowFull = false;
      this.blocked = false;
      this.pump();
    } else if (this.blocked) {
      this.armStall();
    }
  }

  private armStall(): void {
    if (this.stallTimer) return;
    this.stallTimer = setTimeout(() => {
      this.fail(
        new HitlessError(
          status.RESOURCE_EXHAUSTED,
          `subscriber stopped reading for ${this.host.stallTimeoutMs} ms; the agent dropped it. Reconnect to resume from the last acknowledged sequence`,
        ),
      );
    }, this.host.stallTimeoutMs);
  }

  private clearStall(): void {
    if (this.stallTimer) clearTimeout(this.stallTimer);
    this.stallTimer = null;
  }

  /** Sends what the subscriber is missing, from the log, until caught up or blocked. */
  pump(): void {
    if (this.pumping || this.closed) return;
    this.pumping = true;
    try {
      // Held changes first: a table's log reads start after its held ones (its `sent`).
      if (!this.blocked && !this.sendHeld()) return;
      let progressed = true;
      while (progressed && !this.blocked && !this.closed) {
        progressed = false;
        for (const [table, c] of this.cursors) {
          if (this.blocked || this.closed) break;
          const seq = this.limitOf(table);
          // RECOVER reads the log too: an active that is behind (another instance wrote while it
          // was cut off) gets the batches after what it holds, as a follower would.
          if (c.sent >= seq) continue;
          const batches = this.host.readLog(table, c.sent, Math.min(64, seq - c.sent));
          if (batches === null || batches.length === 0 || batches[0].seq !== c.sent + 1) {
            this.snapshot(table); // the log no longer reaches back: start over from a snapshot
            progressed = true;
            continue;
          }
          for (const b of batches) {
            c.sent = b.seq;
            this.send({ change: { table, seq: b.seq, records: b.records, count: b.count } });
            progressed = true;
            if (this.blocked) break;
          }
        }
      }
      if (this.mode === 'RECOVER' && !this.closed && this.pendingSnapshots === 0 && !this.blocked) {
        const tableSeqs: Record<string, number> = {};
        for (const [t, c] of this.cursors) tableSeqs[t] = c.sent;
        this.send({ caughtUp: { tableSeqs } });
        this.end();
      }
    } finally {
      this.pumping = false;
    }
  }

  end(): void {
    if (!this.close()) return;
    this.stream.end();
    this.onClosed(this);
  }

  fail(err: HitlessError): void {
    if (!this.close()) return;
    this.stream.fail(err);
    this.onClosed(this);
  }

  /** Called when the transport saw the client go away. */
  cancelled(): void {
    if (this.close()) this.onClosed(this);
  }

  /** Marks the subscription closed and lets go of what it held; false when it already was. */
  private close(): boolean {
    if (this.closed) return false;
    this.closed = true;
    this.held = [];
    this.heldHead = 0;
    this.heldBytes = 0;
    this.clearStall();
    return true;
  }
}
