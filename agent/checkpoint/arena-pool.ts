/** ArenaPool: the arenas of RecordTables (record-table.ts), pooled per process. */
import os from 'node:os';
import { ArenaWarmer } from './arena-warmer';

/** Bytes of a pooled arena. */
export const ARENA_BYTES = 8 * 1024 * 1024;
/** Retired arenas a pool keeps for reuse at most (beyond this they are left to the collector). */
const POOL_MAX_FREE_BYTES = 256 * 1024 * 1024;
/**
 * Paged-in arenas the shared pool keeps ready once a large load was announced. A bulk load fills
 * one 8 MiB arena in 25-30 ms and the warmer makes one in about 5 ms, so two keep ahead of it;
 * they cost 16 MB of memory that is used as soon as the table grows again.
 */
const WARM_AHEAD = 2;
/**
 * Warming also needs a second CPU and this much memory on the machine. In a guest with one vCPU
 * and 256 MB under software emulation, the thread's start and its paged-in spares took the CPU
 * and memory the routing processes needed: a daemon that had loaded a 200k-record snapshot
 * answered FREEZE after 0.8-5 s and later lost its session (VM tests, twice in a row).
 */
const WARM_MIN_CPUS = 2;
const WARM_MIN_MEMORY_BYTES = 2 * 1024 ** 3;
let warmingAffordable: boolean | null = null;
/** Whether this machine warms arenas at all (see ArenaPool). */
export function canWarm(): boolean {
  warmingAffordable ??= os.availableParallelism() >= WARM_MIN_CPUS && os.totalmem() >= WARM_MIN_MEMORY_BYTES;
  return warmingAffordable;
}

/**
 * Where a table's arenas come from, and where retired ones wait to be written again.
 *
 * Why not Buffer.allocUnsafeSlow: V8 counts new ArrayBuffer memory against its old-generation
 * limit, whose headroom is only about 8 MB for a heap the size of the agent's (~17 MB). Every
 * fresh 8 MiB arena therefore started a full mark-compact: about once a second under a 50k
 * records/s SYNC load, in the agent and in each client, and those pauses made the SYNC
 * acknowledgement p99. Arenas are long-lived memory whose lifetime this code manages itself, so
 * they are SharedArrayBuffers: V8 leaves shared backing stores out of that accounting. The OS
 * hands their pages out zeroed and lazily (no resident cost until written).
 *
 * Retired arenas (compaction, CLEAR) come back here once no snapshot pins them, so a table under
 * churn stops allocating at all. All tables of one process (the agent, or one client) share the
 * pool; it keeps at most `maxFreeBytes` and leaves the rest to the garbage collector.
 */
export class ArenaPool {
  private readonly free: Buffer[] = [];
  /** Pooled-size arenas allocated, and handed out again instead (for tests and diagnostics). */
  allocated = 0;
  reused = 0;
  /** Arenas taken from the warmer thread (see `warmAhead`). */
  warmed = 0;
  private warmer: ArenaWarmer | null = null;
  /** Arenas asked of the warmer and not arrived yet. */
  private warming = 0;
  /** Set by warmNow(): from then on take() keeps `warmAhead` arenas ready. */
  private warmStarted = false;

  /**
   * `warmAhead`: once a large load is announced (warmNow(); RecordTable.presize() for a bulk
   * snapshot of 200k records or more), keep this many free arenas ready, made and paged in by a
   * thread of their own (ArenaWarmer), so that filling them costs no page faults on the event
   * loop. Only then, and only with a second CPU and 2 GiB of memory (WARM_MIN_CPUS): the thread
   * and its paged-in spares are worth their memory where tens of MB arrive at once on a machine
   * that has room for them, not in a process whose tables grow a batch at a time. The agent never
   * announces one (its tables grow a batch at a time): with spares, its RSS holding 1M records was
   * 349 MB against 319 MB, and its load was not measurably faster. 0: never.
   */
  constructor(
    readonly arenaBytes = ARENA_BYTES,
    readonly maxFreeBytes = POOL_MAX_FREE_BYTES,
    readonly warmAhead = 0,
  ) {}

  /** An arena of at least `bytes` (an oversize batch gets its own ordinary buffer, never pooled). */
  take(bytes: number): Buffer {
    if (bytes > this.arenaBytes) return Buffer.allocUnsafeSlow(bytes);
    const reused = this.free.pop();
    if (reused) {
      this.reused++;
      this.keepAhead();
      return reused;
    }
    this.allocated++;
    this.keepAhead();
    return Buffer.from(new SharedArrayBuffer(this.arenaBytes));
  }

  /** Takes back an arena nothing references any more. */
  give(buf: Buffer): void {
    if (buf.length !== this.arenaBytes || (this.free.length + 1) * this.arenaBytes > this.maxFreeBytes) return;
    this.free.push(buf);
  }

  get freeBytes(): number {
    return this.free.length * this.arenaBytes;
  }

  /** A large load is coming: keep `warmAhead` arenas ready from now on. */
  warmNow(): void {
    this.warmStarted = true;
    this.keepAhead();
  }

  /** Asks the warmer for what `warmAhead` lacks (free arenas and those on their way count). */
  private keepAhead(): void {
    if (this.warmAhead === 0 || !this.warmStarted || !canWarm()) return;
    const want = this.warmAhead - this.free.length - this.warming;
    if (want <= 0) return;
    this.warmer ??= new ArenaWarmer(
      this.arenaBytes,
      (buf) => {
        this.warming--;
        this.warmed++;
        this.free.push(buf);
      },
      () => (this.warming = 0),
    );
    if (this.warmer.request(want)) this.warming += want;
  }
}

/** The pool the agent's replicas and the SDK's local tables share within one process. */
export const sharedArenaPool = new ArenaPool(ARENA_BYTES, POOL_MAX_FREE_BYTES, WARM_AHEAD);
