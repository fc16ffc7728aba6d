/**
 * The FIB service: the agent as the only writer of the data plane. The active routing process
 * publishes its forwarding entries as a checkpointed FIB table (checkpoint.proto, "FIB tables");
 * this service validates every batch of it before the checkpoint service stores it, programs
 * what was stored, and reconciles the data plane with the table when it cannot trust it to be in
 * step: at agent start, after every switchover, after a programming failure.
 *
 * Invariants:
 * - The table (the agent's replica of it) is the intent; the data plane converges to it. A write
 *   is acknowledged once stored, not once programmed: `programmedSeq` says how far the data plane
 *   is, `failures` what it refused, and both show in status and in the logs.
 * - Reconciliation reads what the data plane holds (routes with our protocol number only),
 *   compares with the table and applies only the difference: an unchanged FIB costs no change.
 * - One programming operation at a time (incremental flush or reconciliation), in the order the
 *   batches were applied to the replica; a reconciliation takes the replica at one instant and
 *   changes applied after it are programmed after it.
 * - A dead routing process or a stopped agent changes nothing: the routes stay in the kernel and
 *   packets keep flowing until the table says otherwise.
 */
import { performance } from 'node:perf_hooks';
import { failedPrecondition, invalidArgument } from '../common/errors';
import { Logger } from '../common/logger';
import type { ForwardingSink } from '../checkpoint/forwarding-sink';
import { OP_CLEAR, OP_DELETE, OP_PUT, RECORD_HEADER_BYTES, SCHEMA_BYTES } from '../checkpoint/records';
import type { TableReplica } from '../checkpoint/table-replica';
import { snapshotFrames } from '../checkpoint/record-table';
import type { DataPlane, DataPlaneInterface, RouteChange } from './data-plane';
import { FibEntry, FibEntryError, MAX_NEXT_HOPS, addressBytes, decodeFibEntry, describeFibEntry, inSubnet, nextHopsKey, prefixFamily } from './fib-entry';

/** What one reconciliation (or the programming of a switchover) changed. */
export interface DataPlaneChanges {
  at: number;
  /** Why it ran: "agent start", "switchover to cp-2", "retry after a failure", ... */
  cause: string;
  /** Routes in the table when it ran. */
  routes: number;
  added: number;
  replaced: number;
  deleted: number;
  /** Changes the data plane refused (see failures in status). */
  failed: number;
  ms: number;
  /** Set when it could not run at all (data plane unreadable). */
  error: string;
}

export interface DataPlaneStatusView {
  /** "network namespace hl-dp", "host network namespace", or '' when none is configured. */
  target: string;
  available: boolean;
  /** Why it is unavailable, or what is wrong; '' when all is well. */
  detail: string;
  /** "bgp/fib": the table that feeds it; '' before a process declared one. */
  table: string;
  tableSeq: number;
  programmedSeq: number;
  routes: number;
  /** Changes waiting to be programmed. */
  pending: number;
  failureCount: number;
  /** The first refused entries: "198.18.0.0/24: Nexthop has invalid gateway". */
  failures: string[];
  lastReconcile: DataPlaneChanges | null;
  /** Changes programmed since start, incremental and by reconciliation. */
  changesProgrammed: number;
}

/** Interfaces are re-read at most this often after a validation miss (a port just created), ms. */
const MISS_REFRESH_MS = 1000;
/** And in the background this often, ms. */
const REFRESH_MS = 5000;
/** A refused change is tried again by a reconciliation after this long, ms. */
const RETRY_MS = 5000;
const SHOWN_FAILURES = 10;
/** Most route changes one programming operation takes (the rest follow in the next one). */
const FLUSH_MAX = 50_000;
/**
 * A reconciliation reads the table in frames of this many bytes (about 400 routes), and gives
 * the event loop a turn whenever it has worked this long (ms): the one after every switchover
 * must not hold acknowledgements up (comparing 23,000 routes in slices of a fixed count held the
 * loop for 100 ms at a time with the guests busy).
 */
const RECONCILE_FRAME_BYTES = 32 * 1024;
const RECONCILE_SLICE_MS = 4;

/** Long work in turns of the event loop: yieldIfDue() gives it one once RECONCILE_SLICE_MS have passed. */
class Slice {
  private until = performance.now() + RECONCILE_SLICE_MS;

  async yieldIfDue(): Promise<void> {
    if (performance.now() < this.until) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.until = performance.now() + RECONCILE_SLICE_MS;
  }
}

export class FibService implements ForwardingSink {
  private owner: { process: string; table: string; replica: TableReplica } | null = null;
  private available = false;
  private detail = '';
  private ifaces = new Map<string, DataPlaneInterface>();
  private lastMissRefresh = 0;
  private refreshTimer: NodeJS.Timeout | null = null;
  private unwatch: (() => void) | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  /** Changes applied to the replica and not yet programmed, coalesced by prefix. */
  private pending = new Map<string, FibEntry | null>();
  private pendingSeq = 0;
  private programmedSeq = 0;
  /** Prefix -> why the data plane refused it (until a later change or reconciliation takes). */
  private readonly failures = new Map<string, string>();
  /** The programming chain: one operation at a time. */
  private chain: Promise<unknown> = Promise.resolve();
  private flushQueued = false;
  private reconcileWanted = false;
  private lastReconcile: DataPlaneChanges | null = null;
  private changesProgrammed = 0;
  private stopped = false;

  constructor(
    /** null: no data plane configured (FIB tables are replicated and validated by format only). */
    private readonly dp: DataPlane | null,
    private readonly log: Logger,
  ) {}

  /** Probes the data plane and reconciles it with the recovered table (agent start). */
  async start(): Promise<void> {
    if (!this.dp) return;
    const p = await this.dp.probe();
    this.available = p.usable;
    this.detail = p.reason;
    if (!p.usable) {
      this.log.warn(
        { dataplane: this.dp.target, reason: p.reason },
        'the data plane cannot be programmed: FIB tables are checkpointed but no route is installed; fix the cause and restart the agent',
      );
      return;
    }
    await this.refreshInterfaces();
    this.refreshTimer = setInterval(() => void this.refreshInterfaces(), REFRESH_MS).unref();
    // A burst of kernel notifications (a port and its addresses) is read once, 20 ms after it.
    let soon: NodeJS.Timeout | null = null;
    this.unwatch = this.dp.watchInterfaces(() => {
      soon ??= setTimeout(() => {
        soon = null;
        void this.refreshInterfaces();
      }, 20).unref();
    });
    this.log.info({ dataplane: this.dp.target, ports: [...this.ifaces.keys()] }, 'data plane attached');
    if (this.owner) await this.reconcile('agent start');
  }

  stop(): void {
    this.stopped = true;
    if (this.refreshTimer) clearInterval(this.refreshTimer);
    this.unwatch?.();
    if (this.retryTimer) clearTimeout(this.retryTimer);
  }

  /** Resolves once every programming operation queued so far has ended. */
  idle(): Promise<void> {
    return this.chain.then(() => undefined);
  }

  // ------------------------------------------------------------------ ForwardingSink

  claim(process: string, table: string, replica: TableReplica): void {
    if (this.owner && (this.owner.process !== process || this.owner.table !== table)) {
      throw failedPrecondition(
        `process '${process}' declares FIB table '${table}', but '${this.owner.process}/${this.owner.table}' already feeds the data plane; one FIB table per agent: declare it as a plain table, or publish the routes through ${this.owner.process}`,
      );
    }
    if (this.owner) {
      // The same table declared again: a declaration the store refused (full disk) and retried
      // comes with a fresh replica; the one the checkpoint service keeps is the last one.
      this.owner.replica = replica;
      return;
    }
    this.owner = { process, table, replica };
    this.programmedSeq = 0;
    // A table recovered at start is reconciled by start(); one declared later (nothing in it yet,
    // or a process that re-declared after the agent lost it) is reconciled now.
    if (this.available) this.queueReconcile('FIB table declared');
  }

  validate(table: string, seq: number, records: Buffer): void {
    let index = 0;
    // Routes share next hops: a full table has a few distinct values (one per next hop set),
    // so each is checked once per batch. Key: the family, then the value's bytes as latin1.
    const good = new Set<string>();
    forEachRecord(records, (op, key, value) => {
      try {
        if (op === OP_CLEAR) return;
        const family = prefixFamily(key);
        if (op !== OP_PUT) return;
        const seen = (family === 4 ? '4' : '6') + value!.latin1Slice(0, value!.length);
        if (good.has(seen)) return;
        this.checkEntry(family, value!);
        good.add(seen);
      } catch (e) {
        if (!(e instanceof FibEntryError)) throw e;
        throw invalidArgument(`table '${table}' batch ${seq}, record ${index} (entry '${key}'): ${e.message}; nothing was applied`);
      } finally {
        index++;
      }
    });
  }

  applied(seq: number, records: Buffer): void {
    if (!this.owner) return;
    // One decoded entry per distinct value in the batch, shared by its routes (read only from
    // here on): fewer objects for the collector while a table loads.
    const decoded = new Map<string, FibEntry>();
    forEachRecord(records, (op, key, value) => {
      if (op === OP_CLEAR) {
        this.reconcileWanted = true;
        this.pending.clear();
      } else if (op === OP_DELETE) this.pending.set(key, null);
      else {
        const bytes = value!.latin1Slice(0, value!.length);
        let e = decoded.get(bytes);
        if (!e) decoded.set(bytes, (e = normalize(decodeFibEntry(value!))));
        this.pending.set(key, e);
      }
    });
    this.pendingSeq = seq;
    if (!this.available || this.flushQueued) return;
    this.flushQueued = true;
    this.chain = this.chain.then(() => this.flush());
  }

  // ------------------------------------------------------------------ validation

  private checkEntry(family: 4 | 6, value: Buffer): void {
    let e: FibEntry;
    try {
      e = decodeFibEntry(value);
    } catch (err) {
      throw new FibEntryError(`the value is not a FibEntry (${(err as Error).message})`);
    }
    if (e.nextHops.length === 0) throw new FibEntryError('no next hop (a FibEntry needs 1 to 32)');
    if (e.nextHops.length > MAX_NEXT_HOPS) throw new FibEntryError(`${e.nextHops.length} next hops; at most ${MAX_NEXT_HOPS}`);
    for (const h of e.nextHops) {
      if (!h.interface) throw new FibEntryError(`next hop '${describeFibEntry({ nextHops: [h] })}' names no interface`);
      if (h.weight < 1 || h.weight > 256) throw new FibEntryError(`next hop weight ${h.weight} is outside 1..256`);
      const gw = h.gateway ? addressBytes(h.gateway) : null;
      if (h.gateway && !gw) throw new FibEntryError(`next hop gateway '${h.gateway}' is not an address`);
      if (gw && (gw.length === 4 ? 4 : 6) !== family) throw new FibEntryError(`next hop gateway ${h.gateway} is not an IPv${family} address`);
      // Without a data plane there is nothing to check ports against: the format is all.
      if (!this.available) continue;
      const ifc = this.port(h.interface);
      if (!ifc) {
        throw new FibEntryError(
          `interface '${h.interface}' is not a port of the data plane (ports: ${[...this.ifaces.keys()].filter((n) => n !== 'lo').join(', ')})`,
        );
      }
      if (gw && !(gw.length === 16 && gw[0] === 0xfe && (gw[1] & 0xc0) === 0x80)) {
        const onLink = ifc.addresses.some((a) => a.bytes.length === gw.length && inSubnet(gw, a.bytes, a.length));
        if (!onLink) {
          const nets = ifc.addresses.map((a) => a.text).join(', ') || 'no address';
          throw new FibEntryError(`next hop ${h.gateway} cannot be reached: it is in no subnet of ${h.interface} (${nets})`);
        }
      }
    }
  }

  /**
   * A port by name, from the ports last read. They are read again when the kernel announces a
   * change (watchInterfaces), every REFRESH_MS, and after a miss (at most once a second): a write
   * naming a port created a moment ago may be refused once, never the event loop held for a read.
   */
  private port(name: string): DataPlaneInterface | undefined {
    const known = this.ifaces.get(name);
    if (!known && this.dp && Date.now() - this.lastMissRefresh >= MISS_REFRESH_MS) {
      this.lastMissRefresh = Date.now();
      void this.refreshInterfaces();
    }
    return known;
  }

  private async refreshInterfaces(): Promise<void> {
    if (!this.dp || this.stopped) return;
    try {
      this.setInterfaces(await this.dp.interfaces());
    } catch (e) {
      this.log.warn({ err: (e as Error).message }, 'could not read the data plane ports');
    }
  }

  private setInterfaces(list: DataPlaneInterface[]): void {
    this.ifaces = new Map(list.map((i) => [i.name, i]));
  }

  // ------------------------------------------------------------------ programming

  /** Programs what `applied` queued since the last flush. */
  private async flush(): Promise<void> {
    this.flushQueued = false;
    // A CLEAR since the last operation: only a reconciliation knows what to remove.
    if (this.reconcileWanted) {
      await this.doReconcile('the table was cleared');
      return;
    }
    if (!this.dp || this.pending.size === 0) return;
    // At most FLUSH_MAX changes per operation, oldest first: a million queued routes are not
    // turned into one list (and one `ip` input) in a single turn of the event loop.
    const changes: RouteChange[] = [];
    for (const [prefix, entry] of this.pending) {
      if (changes.length >= FLUSH_MAX) break;
      changes.push({ prefix, entry });
      this.pending.delete(prefix);
    }
    const seq = this.pending.size === 0 ? this.pendingSeq : this.programmedSeq;
    try {
      const r = await this.dp.apply(changes);
      this.changesProgrammed += r.applied;
      for (const c of changes) this.failures.delete(c.prefix);
      this.noteFailures(r.failed, 'programming');
      this.programmedSeq = seq;
      // The rest of a long queue follows at once (after a failure, the retry reconciles instead).
      if (this.pending.size && !this.flushQueued) {
        this.flushQueued = true;
        this.chain = this.chain.then(() => this.flush());
      }
    } catch (e) {
      // Nothing is known to be programmed: a reconciliation finds out what is.
      this.detail = (e as Error).message;
      this.log.error({ dataplane: this.dp.target, err: this.detail, changes: changes.length }, 'programming the data plane failed; it will be reconciled');
      this.scheduleRetry();
    }
  }

  private noteFailures(failed: { prefix: string; error: string }[], what: string): void {
    if (failed.length === 0) return;
    for (const f of failed) this.failures.set(f.prefix, f.error);
    this.log.error(
      { dataplane: this.dp?.target, refused: failed.length, first: failed.slice(0, 3) },
      `the data plane refused ${failed.length} route change(s) while ${what}; they are retried every ${RETRY_MS / 1000} s and listed in 'issu status'`,
    );
    this.scheduleRetry();
  }

  private scheduleRetry(): void {
    if (this.retryTimer || this.stopped) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.queueReconcile('retry after a failure');
    }, RETRY_MS);
    this.retryTimer.unref();
  }

  private queueReconcile(cause: string): Promise<DataPlaneChanges | null> {
    const p = this.chain.then(() => this.doReconcile(cause));
    this.chain = p.catch(() => undefined);
    return p;
  }

  /**
   * Makes the data plane hold exactly the table, changing only what differs. Null when there is
   * no data plane or no FIB table. Never throws: a failure is in the result's `error`.
   */
  reconcile(cause: string): Promise<DataPlaneChanges | null> {
    if (!this.dp || !this.available || !this.owner) return Promise.resolve(null);
    return this.queueReconcile(cause);
  }

  private async doReconcile(cause: string): Promise<DataPlaneChanges | null> {
    this.flushQueued = false;
    this.reconcileWanted = false;
    if (!this.dp || !this.owner || this.stopped) return null;
    const t0 = performance.now();
    const result: DataPlaneChanges = { at: Date.now(), cause, routes: 0, added: 0, replaced: 0, deleted: 0, failed: 0, ms: 0, error: '' };
    // The table at this instant (a snapshot of its log, read in slices so that a table of
    // millions of routes does not hold the event loop): what is applied later is queued in
    // `pending` and follows.
    const snap = this.owner.replica.snapshot();
    const seq = snap.seq;
    this.pending.clear();
    // prefix -> the FibEntry's bytes as latin1 text: one string per route is all that lives
    // across the turns of a reconciliation, on each side (decoded objects for both sides of
    // 23,000 routes gave the collector far more to trace and promote, in the agent's busiest
    // moment after a switchover). Entries are decoded again, one at a time, to compare.
    const wanted = new Map<string, string>();
    try {
      const slice = new Slice();
      for (const f of snapshotFrames(snap, RECONCILE_FRAME_BYTES)) {
        forEachRecord(f.records, (op, key, value) => {
          if (op === OP_PUT) wanted.set(key, value!.latin1Slice(0, value!.length));
          else if (op === OP_DELETE) wanted.delete(key);
          else wanted.clear();
        });
        await slice.yieldIfDue();
      }
    } finally {
      snap.release();
    }
    result.routes = wanted.size;
    try {
      const held = await this.dp.readRoutes();
      const changes: RouteChange[] = [];
      const slice = new Slice();
      let visited = 0;
      // Routes share their value (one FibEntry per next-hop set): each distinct one is decoded
      // and keyed once, and its entry shared by the changes that need it (read only). Decoding
      // every route made the garbage that the collector paused for after a switchover.
      const distinct = new Map<string, { entry: FibEntry; key: string }>();
      for (const [prefix, bytes] of wanted) {
        if (++visited % 256 === 0) await slice.yieldIfDue();
        let v = distinct.get(bytes);
        if (!v) {
          const entry = normalize(decodeFibEntry(Buffer.from(bytes, 'latin1')));
          distinct.set(bytes, (v = { entry, key: nextHopsKey(entry.nextHops) }));
        }
        const has = held.get(prefix);
        if (has === undefined) {
          changes.push({ prefix, entry: v.entry });
          result.added++;
        } else if (has !== v.key) {
          changes.push({ prefix, entry: v.entry });
          result.replaced++;
        }
      }
      for (const prefix of held.keys()) {
        if (++visited % 256 === 0) await slice.yieldIfDue();
        if (!wanted.has(prefix)) {
          changes.push({ prefix, entry: null });
          result.deleted++;
        }
      }
      this.failures.clear();
      if (changes.length) {
        const r = await this.dp.apply(changes);
        this.changesProgrammed += r.applied;
        result.failed = r.failed.length;
        this.noteFailures(r.failed, `reconciling (${cause})`);
      }
      this.programmedSeq = seq;
      this.detail = '';
    } catch (e) {
      result.error = (e as Error).message;
      this.detail = result.error;
      this.log.error({ dataplane: this.dp.target, cause, err: result.error }, 'reconciling the data plane failed');
      this.scheduleRetry();
    }
    result.ms = Math.round((performance.now() - t0) * 100) / 100;
    this.lastReconcile = result;
    this.log.info({ dataplane: this.dp.target, ...result }, 'data plane reconciled');
    // Changes applied to the replica while this ran.
    if (this.pending.size && !this.flushQueued) {
      this.flushQueued = true;
      this.chain = this.chain.then(() => this.flush());
    }
    return result;
  }

  // ------------------------------------------------------------------ status

  status(): DataPlaneStatusView {
    const o = this.owner;
    return {
      target: this.dp?.target ?? '',
      available: this.available,
      detail: this.dp ? this.detail : 'no data plane configured (hitlessd --dataplane)',
      table: o ? `${o.process}/${o.table}` : '',
      tableSeq: o?.replica.seq ?? 0,
      programmedSeq: this.programmedSeq,
      routes: o?.replica.records ?? 0,
      pending: this.pending.size,
      failureCount: this.failures.size,
      failures: [...this.failures].slice(0, SHOWN_FAILURES).map(([p, e]) => `${p}: ${e}`),
      lastReconcile: this.lastReconcile,
      changesProgrammed: this.changesProgrammed,
    };
  }
}

/** One next hop's weight is meaningless (and the kernel does not keep it). */
function normalize(e: FibEntry): FibEntry {
  if (e.nextHops.length === 1) e.nextHops[0].weight = 1;
  return e;
}

/** Visits the packed records of a validated batch: key as latin1 text, value for PUT. */
function forEachRecord(buf: Buffer, cb: (op: number, key: string, value: Buffer | null) => void): void {
  let off = 0;
  while (off < buf.length) {
    const op = buf[off];
    const keyLen = buf.readUInt16BE(off + 1);
    const valLen = buf.readUInt32BE(off + 3);
    off += RECORD_HEADER_BYTES;
    const key = buf.latin1Slice(off, off + keyLen);
    off += keyLen;
    if (op === OP_PUT) {
      cb(op, key, buf.subarray(off + SCHEMA_BYTES, off + SCHEMA_BYTES + valLen));
      off += SCHEMA_BYTES + valLen;
    } else cb(op, key, null);
  }
}
