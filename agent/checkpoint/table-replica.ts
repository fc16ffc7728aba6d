/**
 * The agent's authoritative replica of one table: a RecordTable plus the table's sequence and
 * the schema versions its values were written in.
 *
 * Invariants: `seq` only grows and is the sequence of the last applied batch (0 = never written);
 * `accepted` >= `seq` is the last batch handed to the store (the ones between are being stored,
 * and are applied in order once they are, or handed back when the store refused them);
 * a snapshot taken at `seq` S is exactly the table as of S (see RecordTable: the log is append-only
 * and snapshots reference its prefix).
 */
import { sharedArenaPool } from './arena-pool';
import { LogSnapshot, RecordTable } from './record-table';

export class TableReplica {
  // Pooled arenas: nothing in the agent keeps a value view past the call that read it.
  readonly table = new RecordTable({ pool: sharedArenaPool });
  seq = 0;
  /** The last batch handed to the store: the next write must be accepted + 1. */
  accepted = 0;
  /**
   * The instance that wrote the last applied batch ('' when not known), and the one that wrote the
   * last batch handed to the store: the store records a change of writer with the batch that
   * makes it, in the same transaction (see WritePath.write).
   */
  lastWriter = '';
  handedWriter = '';
  /** Schema versions of values possibly present (grows; used for compatibility checks). */
  readonly schemas = new Set<number>();
  /**
   * Batches handed to the store and not yet applied or refused (seq in (seq, accepted]): their
   * bytes, and what settles when they are applied (resolves) or refused (rejects).
   */
  readonly inFlight = new Map<number, { records: Buffer; applied: Promise<unknown> }>();

  constructor(
    readonly process: string,
    readonly name: string,
  ) {}

  get records(): number {
    return this.table.size;
  }

  get bytes(): number {
    return this.table.liveBytes;
  }

  /** Applies a validated batch and advances the sequence. */
  applyBatch(seq: number, records: Buffer, schemas: Iterable<number>): void {
    if (this.seq !== 0 && seq !== this.seq + 1) throw new Error(`table ${this.process}/${this.name}: batch ${seq} applied after ${this.seq}`);
    this.table.append(records);
    for (const s of schemas) this.schemas.add(s);
    this.seq = seq; // (the table compacts its log in the background when needed)
    if (this.accepted < seq) this.accepted = seq;
  }

  /** Settles once every batch handed to the store so far is applied or refused. */
  settled(): Promise<void> {
    return Promise.allSettled([...this.inFlight.values()].map((f) => f.applied)).then(() => undefined);
  }

  /** The table as of `seq`; the caller must release() it once nothing reads its bytes. */
  snapshot(): LogSnapshot {
    return this.table.snapshot(this.seq);
  }
}
