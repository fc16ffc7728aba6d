/**
 * RecordTable: one table's records held as an append-only log of packed records in large
 * buffers ("arenas"), indexed by an open-addressing hash table in typed arrays.
 *
 * Why this shape: a full Internet table is ~1M records. Holding each as JS strings in a Map costs
 * two string allocations plus a Map insert per record (about 1 s for 1M on this machine) and
 * ~200 MB of V8 heap. Here a batch is one buffer copy plus, per record, a hash of the key bytes
 * and a few typed-array writes; values never become JS objects.
 *
 * Invariants:
 * - The log (arenas in order, each up to `used`) replayed from empty yields exactly the live table:
 *   it holds every live PUT plus possibly dead PUTs and DELETEs that a replay overrides. CLEAR is
 *   never logged: it starts a new log.
 * - Arenas only grow at their end and are never modified below `used`, so a snapshot is a list of
 *   (arena, used) pairs: a consistent view as of its sequence, at no copying cost.
 * - Compaction runs in the background, a slice per event-loop turn, so a big table never stalls
 *   writes: arenas existing when it starts are "old"; from then on every write and every copied
 *   live record goes to new arenas, in the order it happens; when every live record is in a new
 *   arena the old ones leave the log. Replaying old + new arenas, or (once done) the new ones
 *   alone, still yields the live table. Snapshots keep referencing whatever arenas they listed.
 * - Index slot i holds arena id + 1 in slotArena[i], 0 when empty (fresh typed arrays are zero,
 *   so a new index costs no fill). Linear probing with backward-shift deletion, so there are no
 *   tombstones in the current index. Capacity is a power of two, load factor <= 0.6.
 * - The index grows incrementally: a doubling keeps the previous index as `old` and moves its
 *   entries a few per insert and a chunk per event-loop turn (rehashing 5M keys at once held the
 *   event loop for about half a second). Every key is in exactly one of the two; lookups try the
 *   current index, then the old one, and a key found there moves over first, so updates and
 *   deletes only ever touch the current index. Moved old slots become tombstones (-1), which old
 *   lookups step over. Whatever walks slots (forEach, the digest, compaction) settles the growth
 *   first.
 * - With an ArenaPool, arenas that leave the log (compaction, CLEAR) go back to the pool once no
 *   snapshot pins them, and are written again by whichever table takes them next. Then a value
 *   view from get()/forEach() is valid only until the next write: copy what you keep. Without a
 *   pool (the default) arenas are left to the garbage collector and views stay valid.
 */
import crypto from 'node:crypto';
import { ARENA_BYTES, ArenaPool } from './arena-pool';
import { OP_CLEAR, OP_DELETE, OP_PUT, RECORD_HEADER_BYTES, SCHEMA_BYTES } from './records';

const MIN_CAPACITY = 1024;
/** A presize() for this many records (about three arenas of route records) starts warming at once. */
const PRESIZE_WARM_RECORDS = 200_000;
/** Live records copied per background compaction slice (~0.5 ms on this hardware). */
const COMPACT_SLICE_RECORDS = 2048;
/**
 * Old index slots moved per insert while the index grows. A doubling starts at load 0.6 of the old
 * capacity C and the next one is due after another 0.6 C inserts, so anything over 1/0.6 slots
 * per insert finishes in time; the background turns usually finish it much sooner.
 */
const MIGRATE_PER_INSERT = 4;
/**
 * Longest a background turn of the index growth (paging in the next index, moving old slots) may
 * hold the event loop, ms. Work is counted in time, not bytes or slots: a page fault costs 1-3 us
 * on a quiet host and 10 us or more while other processes fault in memory too, and moving a slot
 * costs what its cache misses cost.
 */
const GROWTH_TURN_MS = 2;
/** Old index slots moved, or index bytes paged in, between two looks at the clock. */
const MIGRATE_PER_CHECK = 2048;
const PREFAULT_BYTES_PER_CHECK = 256 * 1024;
/** Marks a moved slot of the old index: its key lives in the current index now. */
const TOMBSTONE = -1;

/** An index that is being replaced by one twice its size (see the class comment). */
interface OldIndex {
  arena: Int32Array;
  off: Int32Array;
  hash: Uint32Array;
  mask: number;
  /** Slots below this have been moved. */
  next: number;
}

interface Arena {
  id: number;
  buf: Buffer;
  used: number;
  records: number;
  /** Open snapshots listing this arena: its bytes must not change while > 0. */
  pins: number;
  /** Out of the log; returned to the pool when the last pin goes. */
  retired: boolean;
}

/** A consistent view of the log at `seq`: stream `frames()` to rebuild the table. */
export interface LogSnapshot {
  seq: number;
  /** Records in the log view (live and overridden ones). */
  records: number;
  liveRecords: number;
  bytes: number;
  parts: { buf: Buffer; end: number; records: number }[];
  /**
   * Ends the snapshot: its arenas may be reused once no other snapshot pins them. Call it when
   * nothing reads `parts` any more (including bytes queued on a socket); calling it again is a
   * no-op, and never calling it only means those arenas are left to the garbage collector.
   */
  release(): void;
}

export interface RecordView {
  schema: number;
  value: Buffer;
}

/**
 * The index's hash of key bytes [off, off+len) of buf: MurmurHash3's 32-bit mixing (x86_32, seed
 * 0), four key bytes per step, then its finalizer. It only places keys in this process's index
 * (never stored or sent), so it can change freely. FNV-1a chains one multiply per byte: about
 * 40 ns for a 15-byte route key, against 15 ns here. The finalizer spreads every key byte over
 * the low bits that pick the slot.
 */
function hashKey(buf: Uint8Array, off: number, len: number): number {
  let h = 0;
  let i = off;
  for (const end4 = off + (len & ~3); i < end4; i += 4) {
    let k = buf[i] | (buf[i + 1] << 8) | (buf[i + 2] << 16) | (buf[i + 3] << 24);
    k = Math.imul(k, 0xcc9e2d51);
    k = Math.imul((k << 15) | (k >>> 17), 0x1b873593);
    h ^= k;
    h = (h << 13) | (h >>> 19);
    h = (Math.imul(h, 5) + 0xe6546b64) | 0;
  }
  const rest = len & 3;
  if (rest > 0) {
    let k = buf[i];
    if (rest > 1) k |= buf[i + 1] << 8;
    if (rest > 2) k |= buf[i + 2] << 16;
    k = Math.imul(k, 0xcc9e2d51);
    h ^= Math.imul((k << 15) | (k >>> 17), 0x1b873593);
  }
  h ^= len;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * appendReserved() hashes this many records ahead of their index updates. The index is tens of
 * MB read at random, so each update waits on cache and TLB misses; interleaved with hashing (a
 * chain of dependent multiplies per key) the CPU waited on them one record at a time. With the
 * group hashed first and its slots read in a short loop (touch()), the CPU overlaps the misses.
 * 1M route records appended to a presized table, medians of 7 on this hardware (noisy): about
 * 270 ms one record at a time with FNV-1a, about 175 ms now. Module scratch: appendReserved() is
 * synchronous and finishes a group before anything else (the CLEAR path included) starts one.
 */
const APPEND_GROUP = 64;
const groupOff = new Int32Array(APPEND_GROUP);
const groupHash = new Uint32Array(APPEND_GROUP);
let _touchSink = 0;

function recordLength(buf: Buffer, off: number): number {
  const op = buf[off];
  const keyLen = (buf[off + 1] << 8) | buf[off + 2];
  const valLen = buf.readUInt32BE(off + 3);
  return RECORD_HEADER_BYTES + keyLen + (op === OP_PUT ? SCHEMA_BYTES + valLen : 0);
}

export class RecordTable {
  /** Set: retired arenas are recycled through it (see the class comment for what that implies). */
  private readonly pool: ArenaPool | null;
  /** Arenas by id (ids only grow; a dropped arena leaves a hole). */
  private byId: (Arena | undefined)[] = [];
  /** Arena ids in log order. */
  private order: number[] = [];
  private nextId = 0;
  /** While compacting: arenas with id < boundary are old. -1 when not compacting. */
  private boundary = -1;
  private cursor = 0;
  /** Arena id of a pending reserveAppend(), else -1. */
  private reserved = -1;
  /** Where in its arena the pending reservation's bytes begin. */
  private reservedAt = 0;
  private compactScheduled = false;
  /** arena id + 1 per slot; 0 = empty. */
  private slotArena = new Int32Array(MIN_CAPACITY);
  private slotOff = new Int32Array(MIN_CAPACITY);
  private slotHash = new Uint32Array(MIN_CAPACITY);
  private mask = MIN_CAPACITY - 1;
  /** The index being replaced while it grows, else null. */
  private old: OldIndex | null = null;
  private migrateScheduled = false;
  /**
   * The arrays of the next, doubled index, made at load 0.5 and paged in a slice per turn until
   * the doubling (load 0.6) takes them; `touched` counts the slots of each array paged in.
   */
  private nextIndex: { arena: Int32Array<ArrayBuffer>; off: Int32Array<ArrayBuffer>; hash: Uint32Array<ArrayBuffer>; touched: number } | null = null;
  /** Live records. */
  size = 0;
  /** Bytes of live records (as packed). */
  liveBytes = 0;
  /** Bytes in the log (live + overridden). */
  logBytes = 0;
  logRecords = 0;
  /** Compact when the log exceeds max(this, 2 x liveBytes). */
  compactMinBytes = 64 * 1024 * 1024;
  /** Start background compaction from append() when needed (tests turn it off to drive it). */
  autoCompact = true;
  /** Bumped by every change of the live records (append, clear); compaction keeps it. */
  version = 0;

  constructor(opts: { pool?: ArenaPool } = {}) {
    this.pool = opts.pool ?? null;
  }

  /** Applies a validated packed batch. */
  append(batch: Buffer): void {
    if (batch.length === 0) return;
    const room = this.reserveAppend(batch.length);
    batch.copy(room);
    this.appendReserved(batch.length);
  }

  /**
   * Room for `bytes` of packed records at the end of the log, for a caller that writes them in
   * place and then applies them with appendReserved(bytes): a standby reads a bulk snapshot from
   * its socket straight into the table, without a copy of the whole table in between. Meanwhile
   * compaction waits; any other change (append, clear, another reservation) cancels the
   * reservation, whose bytes were never part of the log, and appendReserved() then throws.
   */
  reserveAppend(bytes: number): Buffer {
    const arena = this.byId[this.reserve(bytes)]!;
    this.reserved = arena.id;
    this.reservedAt = arena.used;
    return arena.buf.subarray(arena.used, arena.used + bytes);
  }

  /**
   * Applies the whole records among the first `written` bytes of the pending reservation that no
   * earlier call applied, and keeps the reservation open for the rest. A standby applies a
   * snapshot frame as its bytes arrive, a read at a time, rather than a whole frame (~8,000
   * records, 10-50 ms with the CPUs busy) in the one turn that completes it. A CLEAR, and
   * whatever follows it, waits for appendReserved().
   */
  appendReservedPart(written: number): void {
    const arena = this.reserved >= 0 ? this.byId[this.reserved] : undefined;
    if (!arena) throw new Error('RecordTable: appendReservedPart() without a reservation (the table changed since reserveAppend())');
    this.version++;
    this.indexWhole(arena, this.reservedAt + written);
  }

  /** Applies the `bytes` written in place since reserveAppend(bytes) (validated packed records). */
  appendReserved(bytes: number): void {
    const arena = this.reserved >= 0 ? this.byId[this.reserved] : undefined;
    this.reserved = -1;
    if (!arena) throw new Error('RecordTable: appendReserved() without a reservation (the table changed since reserveAppend())');
    this.version++;
    const end = this.reservedAt + bytes;
    this.indexWhole(arena, end);
    if (arena.used < end) {
      const off = arena.used;
      if (arena.buf[off] !== OP_CLEAR)
        throw new Error(`RecordTable: a record at byte ${off - this.reservedAt} runs past the end of the ${bytes} bytes applied`);
      // A CLEAR: everything before is void; start a new log with the rest of this batch.
      const rest = Buffer.from(arena.buf.subarray(off + RECORD_HEADER_BYTES, end));
      this.reset();
      this.append(rest);
      return;
    }
    if (this.autoCompact && this.needsCompaction()) this.startCompaction();
  }

  /**
   * Indexes the whole records in `arena` from its end of log (`used`) up to byte `limit`, in
   * groups (see touch), and makes them part of the log. Stops before a CLEAR, and before a record
   * that `limit` cuts (its bytes are still arriving).
   */
  private indexWhole(arena: Arena, limit: number): void {
    const buf = arena.buf;
    const from = arena.used;
    let off = from;
    for (;;) {
      let n = 0;
      for (; n < APPEND_GROUP && off + RECORD_HEADER_BYTES <= limit && buf[off] !== OP_CLEAR; n++) {
        const len = recordLength(buf, off);
        if (off + len > limit) break;
        groupOff[n] = off;
        groupHash[n] = hashKey(buf, off + RECORD_HEADER_BYTES, (buf[off + 1] << 8) | buf[off + 2]);
        off += len;
      }
      if (n === 0) break;
      this.touch(n);
      for (let k = 0; k < n; k++) this.index(arena.id, buf, groupOff[k], groupHash[k]);
      arena.records += n;
      this.logRecords += n;
    }
    this.logBytes += off - from;
    arena.used = off;
  }

  /**
   * Reads the index slots the next `n` records of the group hash to, so that their cache and TLB
   * misses overlap here, in a loop short enough for the CPU to run many iterations ahead, instead
   * of one at a time in index() (see APPEND_GROUP).
   */
  private touch(n: number): void {
    const a = this.slotArena;
    const o = this.slotOff;
    const hh = this.slotHash;
    const mask = this.mask;
    let t = 0;
    for (let k = 0; k < n; k++) {
      const i = groupHash[k] & mask;
      t += a[i] + o[i] + hh[i];
    }
    _touchSink = t; // kept, so that the reads are not optimised away
  }

  /** Applies the PUT or DELETE at `off` of arena `arenaIdx` (its key's hash `h`) to the index. */
  private index(arenaIdx: number, buf: Buffer, off: number, h: number): void {
    const keyLen = (buf[off + 1] << 8) | buf[off + 2];
    const slot = this.find(h, buf, off + RECORD_HEADER_BYTES, keyLen);
    if (buf[off] === OP_PUT) {
      if (slot >= 0) {
        this.liveBytes -= recordLength(this.byId[this.slotArena[slot] - 1]!.buf, this.slotOff[slot]);
        this.slotArena[slot] = arenaIdx + 1;
        this.slotOff[slot] = off;
      } else {
        this.insert(h, arenaIdx, off);
      }
      this.liveBytes += recordLength(buf, off);
    } else if (buf[off] === OP_DELETE && slot >= 0) {
      this.liveBytes -= recordLength(this.byId[this.slotArena[slot] - 1]!.buf, this.slotOff[slot]);
      this.remove(slot);
    }
  }

  get(key: string | Buffer): RecordView | undefined {
    const slot = typeof key === 'string' ? this.findLatin1(key) : this.find(hashKey(key, 0, key.length), key, 0, key.length);
    if (slot < 0) return undefined;
    const buf = this.byId[this.slotArena[slot] - 1]!.buf;
    const off = this.slotOff[slot];
    const keyLen = (buf[off + 1] << 8) | buf[off + 2];
    const valLen = buf.readUInt32BE(off + 3);
    const s = off + RECORD_HEADER_BYTES + keyLen;
    return { schema: (buf[s] << 8) | buf[s + 1], value: buf.subarray(s + SCHEMA_BYTES, s + SCHEMA_BYTES + valLen) };
  }

  has(key: string | Buffer): boolean {
    return this.get(key) !== undefined;
  }

  /** Visits live records in no particular order. Key as latin1 string, value bytes shared (copy to keep). */
  forEach(cb: (key: string, schema: number, value: Buffer) => void): void {
    this.forEachIn(0, this.mask + 1, cb);
  }

  /**
   * forEach in slices that a caller can spread over turns of the event loop: visits the live
   * records in index slots [from, from + slots) and returns where the next slice starts, or -1
   * after the last. Begin at 0. The slices of one pass visit every record once only while the
   * records do not change between them: compare `version` before and after a pass, and start
   * over when it moved (an append may grow the index or move keys to other slots).
   */
  forEachIn(from: number, slots: number, cb: (key: string, schema: number, value: Buffer) => void): number {
    if (from === 0) this.settle();
    const end = Math.min(from + slots, this.mask + 1);
    for (let i = from; i < end; i++) {
      const a = this.slotArena[i];
      if (a === 0) continue;
      const buf = this.byId[a - 1]!.buf;
      const off = this.slotOff[i];
      const keyLen = (buf[off + 1] << 8) | buf[off + 2];
      const valLen = buf.readUInt32BE(off + 3);
      const s = off + RECORD_HEADER_BYTES + keyLen;
      cb(buf.latin1Slice(off + RECORD_HEADER_BYTES, s), (buf[s] << 8) | buf[s + 1], buf.subarray(s + SCHEMA_BYTES, s + SCHEMA_BYTES + valLen));
    }
    return end > this.mask ? -1 : end;
  }

  clear(): void {
    this.reset();
  }

  /**
   * Sizes the index of an empty table for `records` keys at once (a bulk snapshot says how many
   * it brings): no doubling, rehash or migration while they arrive. Load stays under 0.5, so no
   * next index is prepared either. Does nothing to a table that holds records. Enough records
   * to fill several arenas start the pool's warmer (see ArenaPool's warmAhead).
   *
   * Resolves once the new index is paged in, a slice per event-loop turn (GROWTH_TURN_MS), one
   * write per page in order; a load that waits for it takes no page faults on the index. Its
   * inserts land on random pages, and touch() reads a slot before index() writes it, so a fresh
   * page took two faults (the zero page, then its copy): with 1M records (24 MB of index) the
   * first 1 MiB frame took 35-60 ms and ~12,300 faults; after ~14 ms of paging (in slices) it
   * takes ~8-10 ms. Paging stops early, harmlessly, once the table changes.
   */
  presize(records: number): Promise<void> {
    if (this.size > 0 || this.old) return Promise.resolve();
    if (records >= PRESIZE_WARM_RECORDS) this.pool?.warmNow();
    let cap = MIN_CAPACITY;
    while (cap < records * 2 + 2) cap *= 2;
    if (cap <= this.mask + 1) return Promise.resolve();
    this.nextIndex = null;
    const arena = (this.slotArena = new Int32Array(cap));
    const off = (this.slotOff = new Int32Array(cap));
    const hash = (this.slotHash = new Uint32Array(cap));
    this.mask = cap - 1;
    const version = this.version;
    let from = 0;
    return new Promise<void>((resolve) => {
      const step = () => {
        // Zeros go only where nothing was written: the same arrays, and no change since (every
        // write to the index comes with an append or a clear, which bump the version).
        if (this.slotArena !== arena || this.version !== version) return resolve();
        from = pageInSlice(arena, off, hash, from);
        if (from < cap) setImmediate(step);
        else resolve();
      };
      step();
    });
  }

  /**
   * Index slots: liveSlots, compareSlotKeys and packDigestRecord work on slot numbers. Call
   * settle() first: while the index grows, some keys are not in these slots yet.
   */
  get slots(): number {
    return this.mask + 1;
  }

  /** True while the index grows (some keys are still in the old index; see the class comment). */
  get growing(): boolean {
    return this.old !== null;
  }

  /** Finishes a growing index now, so that every key is in `slots`. */
  settle(): void {
    if (this.old) this.migrate(Number.MAX_SAFE_INTEGER);
  }

  /**
   * Writes the numbers of the occupied slots in [from, to) into `out` from `at`; returns the new
   * `at`. Slot numbers stay valid until the live records change (compaction only moves bytes) or
   * the index grows (an insert); settle() before the first call.
   */
  liveSlots(from: number, to: number, out: Int32Array, at: number): number {
    for (let i = from, end = Math.min(to, this.mask + 1); i < end; i++) if (this.slotArena[i] > 0) out[at++] = i;
    return at;
  }

  /** Byte order of the keys in two occupied slots (memcmp; a prefix first). No allocation. */
  compareSlotKeys(a: number, b: number): number {
    const ba = this.byId[this.slotArena[a] - 1]!.buf;
    const bb = this.byId[this.slotArena[b] - 1]!.buf;
    const oa = this.slotOff[a];
    const ob = this.slotOff[b];
    const la = (ba[oa + 1] << 8) | ba[oa + 2];
    const lb = (bb[ob + 1] << 8) | bb[ob + 2];
    const n = la < lb ? la : lb;
    for (let i = 0, pa = oa + RECORD_HEADER_BYTES, pb = ob + RECORD_HEADER_BYTES; i < n; i++) {
      const d = ba[pa + i] - bb[pb + i];
      if (d !== 0) return d;
    }
    return la - lb;
  }

  /**
   * Writes the record in `slot` as the digest hashes it (`key 0x00 schema 0x00 value 0x00`) into
   * `out` at `at` and returns the new end; when it does not fit, writes nothing and returns minus
   * the bytes it needs.
   */
  packDigestRecord(slot: number, out: Buffer, at: number): number {
    const buf = this.byId[this.slotArena[slot] - 1]!.buf;
    const off = this.slotOff[slot];
    const keyLen = (buf[off + 1] << 8) | buf[off + 2];
    const valLen = buf.readUInt32BE(off + 3);
    const s = off + RECORD_HEADER_BYTES + keyLen;
    const schema = SCHEMA_DIGITS[(buf[s] << 8) | buf[s + 1]] ?? schemaDigits((buf[s] << 8) | buf[s + 1]);
    const need = keyLen + schema.length + valLen + 3;
    if (at + need > out.length) return -need;
    at += buf.copy(out, at, off + RECORD_HEADER_BYTES, s);
    out[at++] = 0;
    at += schema.copy(out, at);
    out[at++] = 0;
    at += buf.copy(out, at, s + SCHEMA_BYTES, s + SCHEMA_BYTES + valLen);
    out[at++] = 0;
    return at;
  }

  /** A consistent view of the log now; cheap (no copying). Release it when done (see LogSnapshot). */
  snapshot(seq: number): LogSnapshot {
    const arenas = this.order.map((id) => this.byId[id]!).filter((a) => a.used > 0);
    for (const a of arenas) a.pins++;
    let open = true;
    return {
      seq,
      records: this.logRecords,
      liveRecords: this.size,
      bytes: this.logBytes,
      parts: arenas.map((a) => ({ buf: a.buf, end: a.used, records: a.records })),
      release: () => {
        if (!open) return;
        open = false;
        for (const a of arenas) {
          a.pins--;
          if (a.retired && a.pins === 0) this.pool?.give(a.buf);
        }
      },
    };
  }

  /** True when overridden records make up more than half of a log bigger than compactMinBytes. */
  needsCompaction(): boolean {
    return this.boundary < 0 && this.logBytes > this.compactMinBytes && this.logBytes > 2 * this.liveBytes;
  }

  get compacting(): boolean {
    return this.boundary >= 0;
  }

  /** Starts background compaction (a slice per event-loop turn) unless one is running. */
  startCompaction(): void {
    if (this.boundary >= 0) return;
    this.boundary = this.nextId;
    this.cursor = 0;
    this.scheduleCompaction();
  }

  /** Compacts now, synchronously: finishes a running compaction or does a whole one. */
  compact(): void {
    this.settle();
    this.startCompaction();
    while (this.boundary >= 0) this.compactSlice(Number.MAX_SAFE_INTEGER);
  }

  private scheduleCompaction(): void {
    if (this.compactScheduled) return;
    this.compactScheduled = true;
    setImmediate(() => {
      this.compactScheduled = false;
      if (this.boundary < 0) return;
      this.compactSlice(COMPACT_SLICE_RECORDS);
      if (this.boundary >= 0) this.scheduleCompaction();
    });
  }

  /**
   * Copies up to `budget` live records out of old arenas; drops the old arenas when none is left.
   * Waits while the index grows: it walks the current index's slots, where not every key is yet.
   */
  private compactSlice(budget: number): void {
    if (this.old) return; // the migration's own turns run meanwhile; it resets the cursor when done
    if (this.reserved >= 0) return; // it would write where a reserved append is being filled
    const boundary = this.boundary;
    let i = this.cursor;
    for (; i <= this.mask && budget > 0; i++) {
      const a = this.slotArena[i] - 1;
      if (a < 0 || a >= boundary) continue;
      const src = this.byId[a]!.buf;
      const off = this.slotOff[i];
      const len = recordLength(src, off);
      const id = this.reserve(len);
      const dst = this.byId[id]!;
      src.copy(dst.buf, dst.used, off, off + len);
      this.slotArena[i] = id + 1;
      this.slotOff[i] = dst.used;
      dst.used += len;
      dst.records++;
      this.logBytes += len;
      this.logRecords++;
      budget--;
    }
    this.cursor = i;
    if (i <= this.mask) return;
    // Every live record is in a new arena: the old ones leave the log.
    for (const id of this.order) {
      if (id >= boundary) continue;
      const old = this.byId[id]!;
      this.logBytes -= old.used;
      this.logRecords -= old.records;
      this.byId[id] = undefined;
      this.retire(old);
    }
    this.order = this.order.filter((id) => id >= boundary);
    this.boundary = -1;
  }

  // ---------------------------------------------------------------- internals

  /** An arena left the log: back to the pool now, or when its last snapshot is released. */
  private retire(a: Arena): void {
    a.retired = true;
    if (a.pins === 0) this.pool?.give(a.buf);
  }

  private reset(): void {
    this.version++;
    this.reserved = -1;
    for (const a of this.byId) if (a) this.retire(a);
    this.byId = [];
    this.order = [];
    this.boundary = -1; // a running compaction has nothing left to do
    this.old = null; // nor a growing index
    this.nextIndex = null;
    this.slotArena = new Int32Array(MIN_CAPACITY);
    this.slotOff = new Int32Array(MIN_CAPACITY);
    this.slotHash = new Uint32Array(MIN_CAPACITY);
    this.mask = MIN_CAPACITY - 1;
    this.size = 0;
    this.liveBytes = 0;
    this.logBytes = 0;
    this.logRecords = 0;
  }

  /** Id of an arena with `bytes` free at its end (a new one when the last is full or, while compacting, old). */
  private reserve(bytes: number): number {
    const lastId = this.order[this.order.length - 1];
    const last = lastId === undefined ? undefined : this.byId[lastId];
    if (last && last.buf.length - last.used >= bytes && !(this.boundary >= 0 && last.id < this.boundary)) return last.id;
    const id = this.nextId++;
    const buf = this.pool ? this.pool.take(bytes) : Buffer.allocUnsafeSlow(Math.max(ARENA_BYTES, bytes));
    this.byId[id] = { id, buf, used: 0, records: 0, pins: 0, retired: false };
    this.order.push(id);
    return id;
  }

  /** Whether the record at (arena id + 1 `a`, `off`) has the key kbuf[koff, koff + klen). */
  private keyEquals(a: number, off: number, kbuf: Buffer, koff: number, klen: number): boolean {
    const buf = this.byId[a - 1]!.buf;
    if (((buf[off + 1] << 8) | buf[off + 2]) !== klen) return false;
    const s = off + RECORD_HEADER_BYTES;
    for (let i = 0; i < klen; i++) if (buf[s + i] !== kbuf[koff + i]) return false;
    return true;
  }

  /** The key's slot in the current index (moved there from the old one if need be), or -1. */
  private find(h: number, kbuf: Buffer, koff: number, klen: number): number {
    let i = h & this.mask;
    for (;;) {
      const a = this.slotArena[i];
      if (a === 0) break;
      if (this.slotHash[i] === h && this.keyEquals(a, this.slotOff[i], kbuf, koff, klen)) return i;
      i = (i + 1) & this.mask;
    }
    const o = this.old;
    if (o === null) return -1;
    for (let j = h & o.mask; ; j = (j + 1) & o.mask) {
      const a = o.arena[j];
      if (a === 0) return -1;
      if (a > 0 && o.hash[j] === h && this.keyEquals(a, o.off[j], kbuf, koff, klen)) {
        o.arena[j] = TOMBSTONE;
        return this.place(h, a, o.off[j]);
      }
    }
  }

  private findLatin1(key: string): number {
    const kb = Buffer.from(key, 'latin1');
    return this.find(hashKey(kb, 0, kb.length), kb, 0, kb.length);
  }

  /** Puts an entry (arena id + 1 `a`) in the first free slot of its probe chain; returns the slot. */
  private place(h: number, a: number, off: number): number {
    const mask = this.mask;
    let i = h & mask;
    while (this.slotArena[i] !== 0) i = (i + 1) & mask;
    this.slotArena[i] = a;
    this.slotOff[i] = off;
    this.slotHash[i] = h;
    return i;
  }

  /** A key that is in neither index (find said so). */
  private insert(h: number, arena: number, off: number): void {
    if ((this.size + 1) * 10 > (this.mask + 1) * 6) this.grow();
    else if (this.nextIndex === null && (this.size + 1) * 2 > this.mask + 1 && this.mask >= 65535) this.prepareGrowth();
    this.place(h, arena + 1, off);
    this.size++;
    if (this.old) this.migrate(MIGRATE_PER_INSERT);
  }

  /** Backward-shift deletion keeps every probe chain unbroken without tombstones. */
  private remove(slot: number): void {
    const mask = this.mask;
    let i = slot;
    let j = slot;
    for (;;) {
      j = (j + 1) & mask;
      if (this.slotArena[j] === 0) break;
      const home = this.slotHash[j] & mask;
      // Move j back into i when its home position is not in the cyclic range (i, j].
      const inRange = i <= j ? home > i && home <= j : home > i || home <= j;
      if (!inRange) {
        this.slotArena[i] = this.slotArena[j];
        this.slotOff[i] = this.slotOff[j];
        this.slotHash[i] = this.slotHash[j];
        i = j;
      }
    }
    this.slotArena[i] = 0;
    this.size--;
  }

  /** Starts doubling the index; its entries move over incrementally (see the class comment). */
  private grow(): void {
    this.settle(); // never two at once (unreachable while inserts move MIGRATE_PER_INSERT slots)
    this.old = { arena: this.slotArena, off: this.slotOff, hash: this.slotHash, mask: this.mask, next: 0 };
    const cap = (this.mask + 1) * 2;
    const next = this.nextIndex?.arena.length === cap ? this.nextIndex : null;
    this.nextIndex = null;
    this.slotArena = next?.arena ?? new Int32Array(cap);
    this.slotOff = next?.off ?? new Int32Array(cap);
    this.slotHash = next?.hash ?? new Uint32Array(cap);
    this.mask = cap - 1;
    this.scheduleMigration();
  }

  /**
   * Makes the next index's arrays now and pages them in, in turns of GROWTH_TURN_MS. Fresh arrays
   * are zero pages the kernel maps on first write; inserts and moves write them at random places,
   * so without this the first appends after a doubling took 30-40 ms each in page faults (an 8M
   * slot index is 96 MB). A doubling that comes before all pages are in takes the arrays as they are.
   */
  private prepareGrowth(): void {
    const cap = (this.mask + 1) * 2;
    const next = (this.nextIndex = { arena: new Int32Array(cap), off: new Int32Array(cap), hash: new Uint32Array(cap), touched: 0 });
    const step = () => {
      if (this.nextIndex !== next) return; // taken by a doubling, or dropped by a CLEAR
      next.touched = pageInSlice(next.arena, next.off, next.hash, next.touched);
      if (next.touched < cap) setImmediate(step);
    };
    setImmediate(step);
  }

  /** Moves up to `budget` slots of the old index into the current one; drops it when done. */
  private migrate(budget: number): void {
    const o = this.old!;
    const end = o.mask + 1;
    let i = o.next;
    for (; i < end && budget > 0; i++, budget--) {
      const a = o.arena[i];
      if (a > 0) {
        this.place(o.hash[i], a, o.off[i]);
        o.arena[i] = TOMBSTONE;
      }
    }
    o.next = i;
    if (i < end) return;
    this.old = null;
    this.cursor = 0; // keys landed everywhere: a compaction that waited rescans (copying is idempotent)
  }

  private scheduleMigration(): void {
    if (this.migrateScheduled) return;
    this.migrateScheduled = true;
    setImmediate(() => {
      this.migrateScheduled = false;
      const until = performance.now() + GROWTH_TURN_MS;
      while (this.old) {
        this.migrate(MIGRATE_PER_CHECK);
        if (performance.now() >= until) break;
      }
      if (this.old) this.scheduleMigration();
    });
  }
}

/**
 * Pages in the slots of an index's three arrays from `from` on, for up to GROWTH_TURN_MS; returns
 * where it stopped. It writes zeros, which change nothing where nothing was written but make the
 * pages resident: callers page in only arrays no record was indexed in since they were made.
 */
function pageInSlice(arena: Int32Array, off: Int32Array, hash: Uint32Array, from: number): number {
  const cap = arena.length;
  const perCheck = PREFAULT_BYTES_PER_CHECK / 4 / 3;
  const until = performance.now() + GROWTH_TURN_MS;
  do {
    const to = Math.min(cap, from + perCheck);
    arena.fill(0, from, to);
    off.fill(0, from, to);
    hash.fill(0, from, to);
    from = to;
  } while (from < cap && performance.now() < until);
  return from;
}

/**
 * Cuts a snapshot's arenas into frames of at most about `maxBytes`, at record boundaries, with
 * the number of records in each: small enough to stream or store without a long stall.
 */
export function* snapshotFrames(snap: LogSnapshot, maxBytes: number): Generator<{ records: Buffer; count: number }> {
  for (const part of snap.parts) {
    let start = 0;
    let off = 0;
    let count = 0;
    while (off < part.end) {
      const len = recordLength(part.buf, off);
      if (off > start && off + len - start > maxBytes) {
        yield { records: part.buf.subarray(start, off), count };
        start = off;
        count = 0;
      }
      off += len;
      count++;
    }
    if (off > start) yield { records: part.buf.subarray(start, off), count };
  }
}

export type Digest = { records: number; sha256: string };

/**
 * The table digest (TableDigest.sha256 in checkpoint.proto): sha256 over `key 0x00 schema 0x00
 * value 0x00` of every live record in byte order of the keys, and the number of records.
 * Synchronous: it blocks for the whole table (seconds for a million records); an audit uses
 * tableDigestSliced.
 */
export function tableDigest(t: RecordTable): Digest {
  const steps = digestSteps(t);
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value!; // nothing can change the table between two steps of this loop
  }
}

/** A slice of digest work lasts about this long before the event loop gets a turn (ms). */
const DIGEST_SLICE_MS = 5;

/**
 * The same digest as tableDigest, computed a few milliseconds at a time so that the event loop
 * (acknowledgements, keepalives, other tables) keeps running however big the table is. The
 * table must not change meanwhile (callers digest a frozen or quiescent table); if it does, the
 * digest starts over, and the third attempt runs synchronously so an answer always comes.
 * `sliceMs` 0 gives the event loop a turn after every step (tests).
 */
export async function tableDigestSliced(t: RecordTable, sliceMs = DIGEST_SLICE_MS): Promise<Digest> {
  for (let attempt = 1; attempt < 3; attempt++) {
    const steps = digestSteps(t);
    for (;;) {
      const until = performance.now() + sliceMs;
      let r = steps.next();
      while (!r.done && performance.now() < until) r = steps.next();
      if (r.done) {
        if (r.value) return r.value;
        break; // changed meanwhile: again
      }
      await new Promise((resolve) => setImmediate(resolve));
    }
  }
  return tableDigest(t);
}

/** Work items between two checks of the time (each well under a microsecond to a few). */
const DIGEST_STEP = 1024;

/** Decimal ASCII of schema numbers, made once per number seen. */
const SCHEMA_DIGITS: Buffer[] = [];
function schemaDigits(schema: number): Buffer {
  return (SCHEMA_DIGITS[schema] = Buffer.from(String(schema), 'latin1'));
}

/**
 * The digest as resumable steps: list the occupied index slots, sort them by key bytes (runs
 * sorted natively, then merged bottom-up), hash the records in that order through a scratch
 * buffer. Nothing is allocated per record, so a big table adds no garbage-collection pauses. It
 * yields every DIGEST_STEP items; when the table changed since the first step it ends with null
 * (a synchronous run never sees a change).
 */
function* digestSteps(t: RecordTable): Generator<void, Digest | null> {
  t.settle(); // every key in the slots walked below (a growing index has some in the old one)
  const version = t.version;
  const slots = t.slots;
  let order = new Int32Array(t.size) as Int32Array<ArrayBuffer>;
  let n = 0;
  for (let i = 0; i < slots; i += 16 * DIGEST_STEP) {
    n = t.liveSlots(i, i + 16 * DIGEST_STEP, order, n);
    yield;
    if (t.version !== version) return null;
  }
  const sorted = yield* sortSlots(t, order, version);
  if (!sorted) return null;
  order = sorted;
  const h = crypto.createHash('sha256');
  let scratch = Buffer.allocUnsafe(256 * 1024);
  let used = 0;
  for (let i = 0; i < n; i++) {
    if (i % DIGEST_STEP === DIGEST_STEP - 1) {
      yield;
      if (t.version !== version) return null;
    }
    let end = t.packDigestRecord(order[i], scratch, used);
    if (end < 0) {
      h.update(scratch.subarray(0, used));
      if (-end > scratch.length) scratch = Buffer.allocUnsafe(-end); // a record bigger than the buffer (rare)
      end = t.packDigestRecord(order[i], scratch, 0);
    }
    used = end;
  }
  h.update(scratch.subarray(0, used));
  return { records: n, sha256: h.digest('hex') };
}

/**
 * Slots per natively sorted run: one run is one step that cannot be cut short (about 2,000 key
 * comparisons; a run of 1,024 took 20 ms with the CPUs busy under TCG guests).
 */
const SORT_RUN = 256;

/**
 * Sorts slot numbers by the bytes of their keys, yielding every DIGEST_STEP items: runs of
 * SORT_RUN slots are sorted natively, then merged in passes of doubling width. Ends with null
 * as soon as the table is no longer at `version` (its slots may then be empty).
 */
function* sortSlots(t: RecordTable, a: Int32Array<ArrayBuffer>, version: number): Generator<void, Int32Array<ArrayBuffer> | null> {
  const n = a.length;
  const cmp = (x: number, y: number) => t.compareSlotKeys(x, y);
  for (let lo = 0; lo < n; lo += SORT_RUN) {
    a.subarray(lo, Math.min(lo + SORT_RUN, n)).sort(cmp);
    yield;
    if (t.version !== version) return null;
  }
  let src = a;
  let dst = new Int32Array(n);
  for (let width = SORT_RUN; width < n; width *= 2) {
    let budget = DIGEST_STEP;
    for (let lo = 0; lo < n; lo += 2 * width) {
      const mid = Math.min(lo + width, n);
      const hi = Math.min(lo + 2 * width, n);
      let i = lo;
      let j = mid;
      for (let k = lo; k < hi; k++) {
        dst[k] = j >= hi || (i < mid && t.compareSlotKeys(src[i], src[j]) <= 0) ? src[i++] : src[j++];
        if (--budget === 0) {
          budget = DIGEST_STEP;
          yield;
          if (t.version !== version) return null;
        }
      }
    }
    [src, dst] = [dst, src];
  }
  return src;
}
