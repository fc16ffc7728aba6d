/**
 * The checkpoint store's compaction bookkeeping (real SQLite in a temporary directory): a new
 * snapshot becomes current in one small transaction, and what it replaced is garbage that is
 * never read again and goes in pieces. An agent that stops between the two (killed mid-way)
 * rebuilds the same table, and its next compaction removes the rest.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { closeDatabase, Db, openDatabase } from '../../agent/store/database';
import { SqliteCheckpointStore } from '../../agent/store/checkpoint-store';
import { RecordBuilder } from '../../agent/checkpoint/records';
import { TableReplica } from '../../agent/checkpoint/table-replica';
import { snapshotFrames } from '../../agent/checkpoint/record-table';
import { CheckpointService } from '../../agent/checkpoint/checkpoint.service';
import type { BulkServer } from '../../agent/checkpoint/bulk-server';
import { silentLogger } from '../../agent/common/logger';
import { setTimeout as sleep } from 'node:timers/promises';
import { Compactor } from '../../agent/checkpoint/compaction';
import { ProcessGroup } from '../../agent/checkpoint/process-group';
import { DEFAULT_CHECKPOINT_OPTIONS } from '../../agent/checkpoint/checkpoint-options';

describe('checkpoint store: snapshots replace the log, and the replaced rows go in pieces', () => {
  let dir = '';
  let db: Db;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-store-'));
    db = openDatabase(dir);
  });

  afterEach(async () => {
    await closeDatabase(db);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Appends batches from..to (16 records each, keys per batch) to the store and the replica. */
  async function append(store: SqliteCheckpointStore, r: TableReplica, from: number, to: number): Promise<void> {
    for (let seq = from; seq <= to; seq++) {
      const b = new RecordBuilder();
      for (let j = 0; j < 16; j++) b.put(`10.${seq}.${j}.0/24`, 1, Buffer.alloc(300, seq));
      const { records, count } = b.take();
      await store.appendBatch('bgp', 'rib', seq, records, count);
      r.applyBatch(seq, records, [1]);
    }
  }

  /** A table as a restart rebuilds it: current snapshot, then the batches after it. */
  function rebuild(store: SqliteCheckpointStore): TableReplica {
    const t = store.listTables()[0];
    const r = new TableReplica('bgp', 'rib');
    for (const c of store.snapshotChunks('bgp', 'rib')) r.table.append(c);
    r.seq = t.snapSeq;
    for (const b of store.readBatches('bgp', 'rib', t.snapSeq, 1000)) r.applyBatch(b.seq, b.records, []);
    return r;
  }

  /** Writes the replica as a new snapshot generation and makes it current (no drops). */
  async function snapshot(store: SqliteCheckpointStore, r: TableReplica): Promise<number> {
    const snap = r.snapshot();
    const gen = await store.beginSnapshot('bgp', 'rib');
    let i = 0;
    for (const f of snapshotFramesOf(snap)) await store.writeSnapshotChunk('bgp', 'rib', gen, i++, f);
    await store.commitSnapshot('bgp', 'rib', gen, snap.seq);
    snap.release();
    return gen;
  }

  it('keeps the table exact across a stop between the switch and the drops, then drops every replaced row', async () => {
    const store = new SqliteCheckpointStore(db);
    store.upsertTable('bgp', 'rib', 1);
    const r = new TableReplica('bgp', 'rib');
    await append(store, r, 1, 30);
    await snapshot(store, r); // generation 1 at 30; the 30 batches are garbage now, not yet dropped
    await append(store, r, 31, 40);
    await snapshot(store, r); // generation 2 at 40: generation 1 and batches 31..40 are garbage too
    await append(store, r, 41, 45);
    assert.equal(
      store.logBytesSinceSnapshot('bgp', 'rib'),
      store.readBatches('bgp', 'rib', 40, 100).reduce((n, b) => n + b.records.length, 0),
    );

    // "Killed" here: a restart opens the same files and rebuilds the same table.
    await closeDatabase(db);
    db = openDatabase(dir);
    const again = new SqliteCheckpointStore(db);
    const rebuilt = rebuild(again);
    assert.deepEqual([rebuilt.seq, rebuilt.records, rebuilt.bytes], [45, r.records, r.bytes]);
    assert.equal(again.logFloor('bgp', 'rib'), 40, 'only the snapshot and the batches after it count');

    // The removal, a few rows per call, leaves exactly the current generation and batches 41..45.
    let calls = 0;
    for (let n; (n = await again.dropReplaced('bgp', 'rib', 4)) > 0; calls++) assert.ok(n <= 4);
    assert.ok(calls >= 10, `in pieces (${calls} calls)`);
    const gens = db.prepare('SELECT DISTINCT gen FROM ckpt_snapshots').all() as { gen: number }[];
    assert.deepEqual(
      gens.map((g) => g.gen),
      [again.listTables()[0].snapGen],
    );
    assert.deepEqual(
      (db.prepare('SELECT seq FROM ckpt_batches ORDER BY seq').all() as { seq: number }[]).map((b) => b.seq),
      [41, 42, 43, 44, 45],
    );
    const after = rebuild(again);
    assert.deepEqual([after.seq, after.records, after.bytes], [45, r.records, r.bytes]);
  });

  it('keeps the new snapshot when removing what it replaced fails (a fault injected into the removal)', async () => {
    const store = new SqliteCheckpointStore(db);
    store.upsertTable('bgp', 'rib', 1);
    const r = new TableReplica('bgp', 'rib');
    await append(store, r, 1, 30);
    await snapshot(store, r);
    await append(store, r, 31, 40);
    // The real store, except that its second removal fails as a full disk would make it.
    let drops = 0;
    const faulty = Object.assign(Object.create(store) as SqliteCheckpointStore, {
      dropReplaced: (p: string, t: string, limit: number) =>
        ++drops === 2 ? Promise.reject(Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' })) : store.dropReplaced(p, t, limit),
    });
    const svc = new CheckpointService(faulty, {} as BulkServer, silentLogger);
    await assert.rejects(svc.compact('bgp', r), /full/);
    assert.equal(drops, 2);
    assert.equal(store.listTables()[0].snapSeq, 40, 'the new snapshot is current');
    // A restart rebuilds exactly the table from it, and the next compaction removes the rest.
    const rebuilt = rebuild(store);
    assert.deepEqual([rebuilt.seq, rebuilt.records, rebuilt.bytes], [40, r.records, r.bytes]);
    while ((await store.dropReplaced('bgp', 'rib', 64)) > 0);
    assert.deepEqual(db.prepare('SELECT COUNT(*) AS n FROM ckpt_batches').get(), { n: 0 });
    assert.deepEqual([rebuild(store).records], [r.records]);
  });

  it('waits while a role change of the process is in progress, and goes on once it is over', async () => {
    const store = new SqliteCheckpointStore(db);
    store.upsertTable('bgp', 'rib', 1);
    const r = new TableReplica('bgp', 'rib');
    await append(store, r, 1, 30);
    const g = new ProcessGroup('bgp');
    g.switching = true; // a switchover's freeze must not wait behind snapshot chunks
    const compactor = new Compactor({ store, log: silentLogger, opts: DEFAULT_CHECKPOINT_OPTIONS, groups: new Map([['bgp', g]]) });
    let done = false;
    const compaction = compactor.compact('bgp', r).then(() => (done = true));
    await sleep(100); // a compaction that did not wait writes its generation in a few ms
    assert.equal(done, false);
    assert.deepEqual(db.prepare('SELECT COUNT(*) AS n FROM ckpt_snapshots').get(), { n: 0 }, 'no chunk written during the role change');
    g.switching = false;
    await compaction;
    assert.equal(store.listTables()[0].snapSeq, 30);
    assert.deepEqual([rebuild(store).seq, rebuild(store).records], [30, r.records]);
  });
});

function* snapshotFramesOf(snap: ReturnType<TableReplica['snapshot']>): Iterable<Buffer> {
  // Small chunks, so that a generation has many rows to drop.
  for (const f of snapshotFrames(snap, 2048)) yield f.records;
}

describe('checkpoint store: which instance wrote a table last', () => {
  let dir = '';
  let db: Db | null = null;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-store-'));
  });

  afterEach(async () => {
    if (db) await closeDatabase(db);
    db = null;
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function batch(store: SqliteCheckpointStore, seq: number, writer?: string): Promise<void> {
    const b = new RecordBuilder();
    b.put(`10.${seq}.0.0/16`, 1, Buffer.from(`nh-${seq}`));
    const { records, count } = b.take();
    await store.appendBatch('bgp', 'rib', seq, records, count, writer);
  }

  it('starts unknown on a store from before it was recorded, changes with the batch that names a new writer, and survives a restart', async () => {
    db = openDatabase(dir);
    // The table as an agent from before the column created it, with a batch in it.
    db.exec(`CREATE TABLE ckpt_tables (process TEXT NOT NULL, name TEXT NOT NULL, durability INTEGER NOT NULL,
      snap_seq INTEGER NOT NULL DEFAULT 0, snap_gen INTEGER NOT NULL DEFAULT 0, next_gen INTEGER NOT NULL DEFAULT 1,
      kind INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (process, name));
      INSERT INTO ckpt_tables (process, name, durability) VALUES ('bgp', 'rib', 1);`);
    let store = new SqliteCheckpointStore(db);
    assert.equal(store.listTables()[0].lastWriter, '');
    await batch(store, 1, 'bgp@vm1');
    await batch(store, 2); // the same writer: not named again
    assert.equal(store.listTables()[0].lastWriter, 'bgp@vm1');
    await batch(store, 3, 'bgp@vm3');
    assert.equal(store.listTables()[0].lastWriter, 'bgp@vm3');
    await closeDatabase(db);
    db = openDatabase(dir);
    store = new SqliteCheckpointStore(db);
    assert.deepEqual(
      store.listTables().map((t) => [t.name, t.lastWriter]),
      [['rib', 'bgp@vm3']],
    );
    assert.deepEqual(
      store.readBatches('bgp', 'rib', 0, 10).map((b) => b.seq),
      [1, 2, 3],
    );
  });
});
