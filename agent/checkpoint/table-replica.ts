/**
 * The agent's authoritative in-memory replica of one table, and consistent snapshots of it.
 *
 * Invariants:
 * - `seq` only grows; it is the sequence of the last applied batch (0 = never written).
 * - `bytes` is the sum of key + entry lengths held (for status and memory accounting).
 * - A snapshot taken at sequence S yields exactly the table as of S, even while later batches are
 *   applied: the first write to a key during an open snapshot saves the key's old entry (its
 *   "preimage") for that snapshot, and a CLEAR swaps in a new Map so the snapshot keeps the old one.
 */
import { RecordSink, applyRecords } from './records';

/** Marks a key that did not exist when a snapshot was taken. */
const ABSENT = '\u0000absent';

export class TableSnapshot {
  private readonly keys: string[];
  private pos = 0;
  /** Preimages of keys written after the snapshot was taken (only while this snapshot is open). */
  readonly preimages = new Map<string, string>();
  closed = false;

  constructor(
    readonly seq: number,
    private readonly map: Map<string, string>,
  ) {
    // Capturing the key list once (about 8 bytes per key) fixes the snapshot's key set at S.
    this.keys = Array.from(map.keys());
  }

  get records(): number {
    return this.keys.length;
  }

  get done(): boolean {
    return this.pos >= this.keys.length;
  }

  /** Emits up to `maxBytes` worth of entries as of `seq`. */
  next(maxBytes: number, emit: (key: string, entry: string) => void): void {
    let used = 0;
    const keys = this.keys;
    while (this.pos < keys.length && used < maxBytes) {
      const key = keys[this.pos++];
      const pre = this.preimages.get(key);
      const entry = pre !== undefined ? pre : this.map.get(key);
      if (entry === undefined || entry === ABSENT) continue;
      emit(key, entry);
      used += key.length + entry.length + 7;
    }
  }

  /** Called by the table before it changes `key` in `map`. */
  notePreimage(map: Map<string, string>, key: string): void {
    if (map !== this.map || this.preimages.has(key)) return;
    const old = map.get(key);
    this.preimages.set(key, old === undefined ? ABSENT : old);
  }

  appliesTo(map: Map<string, string>): boolean {
    return map === this.map;
  }
}

export class TableReplica implements RecordSink {
  map = new Map<string, string>();
  seq = 0;
  bytes = 0;
  /** Schema versions of values currently possibly present (grows; reset by CLEAR). */
  readonly schemas = new Set<number>();
  private readonly openSnapshots = new Set<TableSnapshot>();

  constructor(
    readonly process: string,
    readonly name: string,
  ) {}

  get records(): number {
    return this.map.size;
  }

  /** Applies a validated batch and advances the sequence. */
  applyBatch(seq: number, records: Buffer, schemas: Iterable<number>): void {
    applyRecords(records, this);
    for (const s of schemas) this.schemas.add(s);
    this.seq = seq;
  }

  put(key: string, entry: string): void {
    if (this.openSnapshots.size) for (const s of this.openSnapshots) s.notePreimage(this.map, key);
    const old = this.map.get(key);
    if (old !== undefined) this.bytes -= key.length + old.length;
    this.bytes += key.length + entry.length;
    this.map.set(key, entry);
  }

  delete(key: string): void {
    const old = this.map.get(key);
    if (old === undefined) return;
    if (this.openSnapshots.size) for (const s of this.openSnapshots) s.notePreimage(this.map, key);
    this.bytes -= key.length + old.length;
    this.map.delete(key);
  }

  clear(): void {
    // Snapshots keep the old Map object, which nobody mutates from now on.
    this.map = new Map();
    this.bytes = 0;
    this.schemas.clear();
  }

  /** Opens a consistent snapshot at the current sequence. Close it when done to stop preimaging. */
  openSnapshot(): TableSnapshot {
    const snap = new TableSnapshot(this.seq, this.map);
    this.openSnapshots.add(snap);
    return snap;
  }

  closeSnapshot(snap: TableSnapshot): void {
    snap.closed = true;
    this.openSnapshots.delete(snap);
  }
}
