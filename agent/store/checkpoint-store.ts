/**
 * Durable storage of checkpoint tables: a log of applied batches plus periodic snapshots.
 *
 * The agent acknowledges a batch only after `appendBatch` resolved, so every acknowledged change
 * is in the database. On start the agent rebuilds each table from its latest complete snapshot
 * and the batches after it. Compaction writes a new snapshot generation chunk by chunk, makes it
 * current in one small transaction, then removes what it replaced a few rows at a time.
 *
 * The big writes (batches, compaction) run on the store's writer thread (batch-log-writer.ts),
 * in the order they were made; declarations and every read go through the agent's connection.
 */
import path from 'node:path';
import { isDiskFull } from '../common/errors';
import { BatchLogWriter } from './batch-log-writer';
import { Db, onDatabaseClose, storeWrite } from './database';

/** What a compaction refused for lack of space is followed by: the log still holds everything. */
const COMPACT_LATER = 'the agent compacts the log again later; the log still holds every batch';

export interface StoredTable {
  process: string;
  name: string;
  durability: number;
  /** TableKind number: 0 opaque records, 1 FIB. */
  kind: number;
  /** Sequence of the current snapshot generation (0 = none). */
  snapSeq: number;
  snapGen: number;
  /** Instance id that wrote the last batch ('' when not known). */
  lastWriter: string;
}

export interface StoredBatch {
  seq: number;
  records: Buffer;
  count: number;
}

/** The port the checkpoint domain uses; SqliteCheckpointStore is the implementation. */
export interface CheckpointStore {
  listTables(): StoredTable[];
  upsertTable(process: string, name: string, durability: number, kind?: number): void;
  /**
   * Stores a batch; resolves once it is committed. Batches are stored in call order; when one is
   * refused, so are the batches of its process handed over before the refusal was seen.
   * `writer`: the table's last writer becomes this instance id, in the batch's transaction.
   */
  appendBatch(process: string, table: string, seq: number, records: Buffer, count: number, writer?: string): Promise<void>;
  /** Batches with seq > after, ascending, at most `limit`. */
  readBatches(process: string, table: string, after: number, limit: number): StoredBatch[];
  /** Lowest sequence still replayable from the log: batches after it are all present. */
  logFloor(process: string, table: string): number;
  logBytesSinceSnapshot(process: string, table: string): number;
  snapshotChunks(process: string, table: string): Iterable<Buffer>;
  /**
   * Compaction's writes (the next five) are asynchronous: they run in order with the batches, on
   * the store's writer thread. A chunk's bytes must not change until its write resolved.
   */
  beginSnapshot(process: string, table: string): Promise<number>;
  writeSnapshotChunk(process: string, table: string, gen: number, chunkNo: number, records: Buffer): Promise<void>;
  /**
   * Makes generation `gen` the table's snapshot as of `seq`, in one small transaction. What it
   * replaces (older generations, batches up to `seq`) is garbage from then on, never read again,
   * and is removed in pieces by dropReplaced.
   */
  commitSnapshot(process: string, table: string, gen: number, seq: number): Promise<void>;
  abortSnapshot(process: string, table: string, gen: number): Promise<void>;
  /**
   * Removes up to `limit` rows of what the current snapshot replaced (chunks of other
   * generations, then batches it covers); resolves with how many it removed (0: none left). Each
   * call is one short transaction, so a big removal goes in pieces between other writes.
   */
  dropReplaced(process: string, table: string, limit: number): Promise<number>;
  /**
   * The schema version the agent last told `process`'s active to write (0 = never decided).
   * Recovered state: after an agent restart the active writes this again, whichever instance
   * re-registers first, so readers that have not reconnected yet are not left behind.
   */
  writeSchema(process: string): number;
  setWriteSchema(process: string, schema: number): void;
}

export class SqliteCheckpointStore implements CheckpointStore {
  private readonly stmts;
  /** Bytes of batch blobs per table since its snapshot, kept here: summing blob lengths reads them. */
  private readonly logBytes = new Map<string, number>();
  private readonly writer: BatchLogWriter;

  constructor(private readonly db: Db) {
    db.exec(`
      CREATE TABLE IF NOT EXISTS ckpt_tables (
        process TEXT NOT NULL, name TEXT NOT NULL, durability INTEGER NOT NULL,
        snap_seq INTEGER NOT NULL DEFAULT 0, snap_gen INTEGER NOT NULL DEFAULT 0,
        next_gen INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (process, name));
      CREATE TABLE IF NOT EXISTS ckpt_batches (
        process TEXT NOT NULL, tbl TEXT NOT NULL, seq INTEGER NOT NULL,
        count INTEGER NOT NULL, records BLOB NOT NULL,
        PRIMARY KEY (process, tbl, seq)) WITHOUT ROWID;
      CREATE TABLE IF NOT EXISTS ckpt_snapshots (
        process TEXT NOT NULL, tbl TEXT NOT NULL, gen INTEGER NOT NULL, chunk INTEGER NOT NULL,
        records BLOB NOT NULL,
        PRIMARY KEY (process, tbl, gen, chunk)) WITHOUT ROWID;
      CREATE TABLE IF NOT EXISTS ckpt_processes (
        process TEXT NOT NULL PRIMARY KEY, write_schema INTEGER NOT NULL);
    `);
    // Stores written before table kinds existed: every table there is opaque (kind 0).
    const cols = db.prepare('PRAGMA table_info(ckpt_tables)').all() as { name: string }[];
    if (!cols.some((c) => c.name === 'kind')) db.exec('ALTER TABLE ckpt_tables ADD COLUMN kind INTEGER NOT NULL DEFAULT 0');
    // And before the last writer was recorded: not known ('').
    if (!cols.some((c) => c.name === 'last_writer')) db.exec("ALTER TABLE ckpt_tables ADD COLUMN last_writer TEXT NOT NULL DEFAULT ''");
    this.stmts = {
      list: db.prepare('SELECT process, name, durability, kind, snap_seq AS snapSeq, snap_gen AS snapGen, last_writer AS lastWriter FROM ckpt_tables'),
      upsert: db.prepare(
        `INSERT INTO ckpt_tables (process, name, durability, kind) VALUES (?, ?, ?, ?)
         ON CONFLICT (process, name) DO UPDATE SET durability = excluded.durability, kind = excluded.kind`,
      ),
      read: db.prepare('SELECT seq, records, count FROM ckpt_batches WHERE process = ? AND tbl = ? AND seq > ? ORDER BY seq LIMIT ?'),
      minSeq: db.prepare('SELECT MIN(seq) AS s FROM ckpt_batches WHERE process = ? AND tbl = ?'),
      snapSeq: db.prepare('SELECT snap_seq AS s, snap_gen AS g FROM ckpt_tables WHERE process = ? AND name = ?'),
      logBytes: db.prepare('SELECT COALESCE(SUM(LENGTH(records)), 0) AS b FROM ckpt_batches WHERE process = ? AND tbl = ? AND seq > ?'),
      chunks: db.prepare('SELECT records FROM ckpt_snapshots WHERE process = ? AND tbl = ? AND gen = ? ORDER BY chunk'),
      getSchema: db.prepare('SELECT write_schema AS s FROM ckpt_processes WHERE process = ?'),
      setSchema: db.prepare(
        `INSERT INTO ckpt_processes (process, write_schema) VALUES (?, ?)
         ON CONFLICT (process) DO UPDATE SET write_schema = excluded.write_schema`,
      ),
    };
    this.writer = new BatchLogWriter(db.name, { fsync: db.pragma('synchronous', { simple: true }) === 2 });
    onDatabaseClose(db, () => this.writer.stop());
    // Snapshots left half-written by a crash are never current; drop them. On a full disk they
    // stay (the next compaction's commit drops them too): the agent must still start and serve.
    try {
      db.exec(`DELETE FROM ckpt_snapshots WHERE NOT EXISTS (SELECT 1 FROM ckpt_tables t
        WHERE t.process = ckpt_snapshots.process AND t.name = ckpt_snapshots.tbl AND t.snap_gen = ckpt_snapshots.gen)`);
    } catch (e) {
      if (!isDiskFull(e, path.dirname(db.name))) throw e;
    }
  }

  listTables(): StoredTable[] {
    return this.stmts.list.all() as StoredTable[];
  }

  upsertTable(process: string, name: string, durability: number, kind = 0): void {
    storeWrite(
      this.db,
      () => `register again (the SDK retries by itself); table '${name}' was not declared`,
      () => this.stmts.upsert.run(process, name, durability, kind),
    );
  }

  appendBatch(process: string, table: string, seq: number, records: Buffer, count: number, writer?: string): Promise<void> {
    // Counted when handed over, and taken back if refused. (Counted after the insert, an uncached
    // total, right after a compaction, already held this batch and counted it twice. Batches in
    // flight when a compaction resets the count are missed by the recount: the total only
    // decides when to compact, and is low by a few batches at most.)
    const k = `${process}\u0000${table}`;
    this.logBytes.set(k, this.logBytesSinceSnapshot(process, table) + records.length);
    const stored = this.writer.append(process, table, seq, count, records, writer).catch((e: unknown) => {
      const b = this.logBytes.get(k);
      if (b !== undefined) this.logBytes.set(k, b - records.length);
      throw e;
    });
    return storeWrite(
      this.db,
      () => `the writer resends batch ${seq} of table '${table}' (the SDK does this by itself); nothing of this batch was applied`,
      stored,
    );
  }

  readBatches(process: string, table: string, after: number, limit: number): StoredBatch[] {
    return this.stmts.read.all(process, table, after, limit) as StoredBatch[];
  }

  logFloor(process: string, table: string): number {
    const row = this.stmts.snapSeq.get(process, table) as { s: number } | undefined;
    const min = (this.stmts.minSeq.get(process, table) as { s: number | null }).s;
    const snap = row?.s ?? 0;
    // Batches run contiguously from min; the log covers everything after min - 1, and after the
    // snapshot once compaction removed the older batches.
    return min === null ? Number.MAX_SAFE_INTEGER : Math.max(snap, min - 1);
  }

  logBytesSinceSnapshot(process: string, table: string): number {
    const k = `${process}\u0000${table}`;
    let b = this.logBytes.get(k);
    if (b === undefined) {
      const snap = (this.stmts.snapSeq.get(process, table) as { s: number } | undefined)?.s ?? 0;
      b = (this.stmts.logBytes.get(process, table, snap) as { b: number }).b;
      this.logBytes.set(k, b);
    }
    return b;
  }

  *snapshotChunks(process: string, table: string): Iterable<Buffer> {
    const row = this.stmts.snapSeq.get(process, table) as { s: number; g: number } | undefined;
    if (!row || row.g === 0) return;
    for (const r of this.stmts.chunks.iterate(process, table, row.g) as Iterable<{ records: Buffer }>) {
      yield r.records;
    }
  }

  beginSnapshot(process: string, table: string): Promise<number> {
    return this.compaction(this.writer.compaction({ op: 'beginSnapshot', process, table }));
  }

  async writeSnapshotChunk(process: string, table: string, gen: number, chunk: number, records: Buffer): Promise<void> {
    await this.compaction(this.writer.compaction({ op: 'writeChunk', process, table, gen, chunk, records }));
  }

  async commitSnapshot(process: string, table: string, gen: number, seq: number): Promise<void> {
    // Only the switch: deleting what it replaces in the same transaction (a million records'
    // snapshot and log, 240 MB of blobs freed page by page) took 460-530 ms on the development
    // machine; dropReplaced spreads it over short transactions.
    await this.compaction(this.writer.compaction({ op: 'commitSnapshot', process, table, gen, seq }));
    this.logBytes.delete(`${process}\u0000${table}`); // recounted from the batches after the snapshot on next use
  }

  dropReplaced(process: string, table: string, limit: number): Promise<number> {
    return this.compaction(this.writer.compaction({ op: 'dropReplaced', process, table, limit }));
  }

  async abortSnapshot(process: string, table: string, gen: number): Promise<void> {
    await this.compaction(this.writer.compaction({ op: 'abortSnapshot', process, table, gen }));
  }

  /** A compaction write's outcome, a full disk turned into the error that says what happens next. */
  private compaction<T>(p: Promise<T>): Promise<T> {
    return storeWrite(this.db, COMPACT_LATER, p);
  }

  writeSchema(process: string): number {
    return (this.stmts.getSchema.get(process) as { s: number } | undefined)?.s ?? 0;
  }

  setWriteSchema(process: string, schema: number): void {
    storeWrite(this.db, 'retry the registration or role change (the SDK retries a registration by itself); the agreed write schema was not changed', () =>
      this.stmts.setSchema.run(process, schema),
    );
  }
}
