/**
 * The store's batch log writer thread (real SQLite, real worker thread): batches are committed in
 * the order they were handed over before their promises resolve, and a refused batch takes the
 * batches of its process handed over behind it down with it, so nothing is stored behind a gap.
 * A refusal is provoked for real: a batch whose sequence is already stored breaks the primary key.
 */
import assert from 'node:assert/strict';
import Database from 'better-sqlite3';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { closeDatabase, Db, openDatabase } from '../../agent/store/database';
import { SqliteCheckpointStore } from '../../agent/store/checkpoint-store';
import { BatchLogWriter, StagingRing, StoreWriteError, WRITER_STOPPED } from '../../agent/store/batch-log-writer';

describe('batch log writer thread', () => {
  let dir = '';
  let db: Db;
  let writer: BatchLogWriter;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-writer-'));
    db = openDatabase(dir);
    new SqliteCheckpointStore(db); // the schema
    writer = new BatchLogWriter(db.name);
  });

  afterEach(async () => {
    await writer.stop();
    await closeDatabase(db);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const seqs = (process: string) =>
    (db.prepare('SELECT seq FROM ckpt_batches WHERE process = ? ORDER BY seq').all(process) as { seq: number }[]).map((r) => r.seq);

  it('resolves each append only once its batch is committed, in the order handed over', async () => {
    const order: number[] = [];
    const all = [];
    for (let seq = 1; seq <= 300; seq++) {
      all.push(
        writer.append('bgp', 'rib', seq, 1, Buffer.alloc(100 + seq, seq)).then(() => {
          order.push(seq);
          // Committed: another connection (this thread's) sees it.
          assert.ok((db.prepare('SELECT 1 FROM ckpt_batches WHERE process = ? AND seq = ?').get('bgp', seq) as unknown) !== undefined, `batch ${seq} visible`);
        }),
      );
    }
    await Promise.all(all);
    assert.deepEqual(
      order,
      Array.from({ length: 300 }, (_, i) => i + 1),
    );
    const row = db.prepare('SELECT count, records FROM ckpt_batches WHERE process = ? AND seq = 7').get('bgp') as { count: number; records: Buffer };
    assert.deepEqual(row.records, Buffer.alloc(107, 7));
    assert.equal(writer.inFlight, 0);
  });

  it("settles a round of many batches over several event-loop turns, in order (each batch's application runs in its turn)", async () => {
    // Another connection holds the write lock while 100 batches are handed over, so that the
    // thread, once it gets the lock, commits most of them in one round and answers them at once.
    const other = new Database(db.name);
    other.exec('BEGIN IMMEDIATE');
    let turn = 0;
    let stopTicking = false;
    const tick = () => {
      turn++;
      if (!stopTicking) setImmediate(tick);
    };
    tick();
    const resolvedIn: number[] = [];
    const order: number[] = [];
    const all = [];
    for (let seq = 1; seq <= 100; seq++) {
      all.push(
        writer.append('bgp', 'rib', seq, 1, Buffer.alloc(64, seq)).then(() => {
          order.push(seq);
          resolvedIn.push(turn);
          // What applying a batch of ~1,000 routes costs the agent's loop.
          const until = performance.now() + 1;
          while (performance.now() < until);
        }),
      );
    }
    await new Promise((r) => setTimeout(r, 200));
    other.exec('COMMIT');
    other.close();
    await Promise.all(all);
    stopTicking = true;
    assert.deepEqual(
      order,
      Array.from({ length: 100 }, (_, i) => i + 1),
    );
    const perTurn = new Map<number, number>();
    for (const t of resolvedIn) perTurn.set(t, (perTurn.get(t) ?? 0) + 1);
    // A slice is 4 ms, and a turn of the loop may hold two (one when the answer arrives, one in
    // its check phase); settled all in one turn, the 100 would have held the loop for 100 ms.
    assert.ok(Math.max(...perTurn.values()) <= 16, `batches settled per turn: ${[...perTurn.values()].join(' ')}`);
  });

  it('on stop stores what it was given before, and refuses what comes after as not stored because the agent stops', async () => {
    const before = writer.append('bgp', 'rib', 1, 1, Buffer.from('before'));
    const stopped = writer.stop();
    const after = writer.append('bgp', 'rib', 2, 1, Buffer.from('after'));
    await before;
    await assert.rejects(after, (e: StoreWriteError) => {
      assert.equal(e.code, WRITER_STOPPED);
      assert.match(e.message, /the agent is stopping: the store's writer thread ended before this write/);
      return true;
    });
    await stopped;
    assert.deepEqual(db.prepare('SELECT seq FROM ckpt_batches ORDER BY seq').all(), [{ seq: 1 }]);
  });

  it("refuses the batches of a process behind a refused one until the refusal was seen, and only that process's", async () => {
    await writer.append('bgp', 'rib', 1, 1, Buffer.from('one'));
    // Handed over together: 1 again (refused: already stored), then 2 and 3 behind it, and
    // another process's batch in between.
    const again = writer.append('bgp', 'rib', 1, 1, Buffer.from('dup'));
    const two = writer.append('bgp', 'rib', 2, 1, Buffer.from('two'));
    const other = writer.append('ospf', 'lsdb', 1, 1, Buffer.from('lsa'));
    const three = writer.append('bgp', 'adj', 1, 1, Buffer.from('adj'));
    const outcome = await Promise.allSettled([again, two, other, three]);
    assert.deepEqual(
      outcome.map((o) => o.status),
      ['rejected', 'rejected', 'fulfilled', 'rejected'],
    );
    for (const o of outcome) if (o.status === 'rejected') assert.ok(o.reason instanceof StoreWriteError && /CONSTRAINT/.test(o.reason.code), String(o.reason));
    assert.deepEqual(seqs('bgp'), [1], 'nothing stored behind the refused batch');
    assert.deepEqual(seqs('ospf'), [1]);
    // Sent after the refusal was seen: stored again.
    await writer.append('bgp', 'rib', 2, 1, Buffer.from('two'));
    assert.deepEqual(seqs('bgp'), [1, 2]);
  });

  /**
   * A database of its own without the checkpoint thread, so that only the writer could copy the
   * WAL into the database file; 12 MiB written in 200 commits of 64 KiB (each awaited).
   */
  async function writeWithoutCheckpointThread(walRestartBytes?: number): Promise<{ dbGrew: boolean; walBytes: number; rows: number }> {
    const own = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-writer-wal-'));
    const file = path.join(own, 'hitless.db');
    const plain = new Database(file);
    plain.pragma('journal_mode = WAL');
    plain.pragma('wal_autocheckpoint = 0');
    new SqliteCheckpointStore(plain); // the schema (its own writer thread stays idle; closeDatabase stops it)
    const w = new BatchLogWriter(file, { walRestartBytes });
    try {
      const dbBytes = fs.statSync(file).size;
      for (let seq = 1; seq <= 200; seq++) await w.append('bgp', 'rib', seq, 1, Buffer.alloc(64 * 1024, seq));
      return {
        dbGrew: fs.statSync(file).size > dbBytes,
        walBytes: fs.statSync(`${file}-wal`).size,
        rows: (plain.prepare('SELECT COUNT(*) AS n FROM ckpt_batches').get() as { n: number }).n,
      };
    } finally {
      await w.stop();
      await closeDatabase(plain);
      fs.rmSync(own, { recursive: true, force: true });
    }
  }

  it('never checkpoints the WAL inside its commits', async () => {
    // SQLite's default would, in the commit that takes the WAL past 1000 pages (4 MiB here),
    // holding that commit (and every SYNC ack behind it) for milliseconds, and skipping the room
    // check a nearly full disk needs (wal-checkpoint.ts). 12 MiB stay under the default restart
    // size of 32 MiB, so nothing may be copied.
    const r = await writeWithoutCheckpointThread();
    assert.equal(r.dbGrew, false, 'no page of the WAL was copied into the database');
    assert.ok(r.walBytes > 12 * 1024 * 1024, 'the batches are in the WAL');
    assert.equal(r.rows, 200);
  });

  it('has the WAL start over once the restart size was written, so that a steady stream keeps it bounded', async () => {
    // A checkpoint from another connection never catches up with a steady writer; without this
    // the WAL grows by everything written (here 12 MiB and more).
    const r = await writeWithoutCheckpointThread(2 * 1024 * 1024);
    assert.equal(r.dbGrew, true, 'the WAL was copied into the database');
    assert.ok(r.walBytes < 4 * 1024 * 1024, `the WAL stayed near 2 MiB (it is ${r.walBytes} bytes)`);
    assert.equal(r.rows, 200);
  });

  it('stores batches bigger than its staging memory holds at once, each exactly', async () => {
    // 3 MB each, all handed over before the first commit: the 16 MiB ring takes five, the rest go
    // over in buffers of their own. Bytes differ per batch, so a span reused too early would show.
    const all = [];
    for (let seq = 1; seq <= 12; seq++) all.push(writer.append('bgp', 'rib', seq, 1, Buffer.alloc(3 * 1024 * 1024 + seq, seq)));
    await Promise.all(all);
    for (let seq = 1; seq <= 12; seq++) {
      const row = db.prepare('SELECT records FROM ckpt_batches WHERE process = ? AND seq = ?').get('bgp', seq) as { records: Buffer };
      assert.ok(row.records.equals(Buffer.alloc(3 * 1024 * 1024 + seq, seq)), `batch ${seq} stored exactly`);
    }
  });
});

describe('StagingRing', () => {
  it('never hands out bytes still in use, whatever the order of sizes and releases', () => {
    const ring = new StagingRing(64 * 1024);
    let x = 12345;
    const rnd = (n: number) => (x = (x * 1103515245 + 12345) & 0x7fffffff) % n;
    const live: { span: [number, number, boolean]; view: Uint8Array; fill: number }[] = [];
    let staged = 0;
    let refused = 0;
    for (let i = 0; i < 20_000; i++) {
      if (live.length && rnd(3) === 0) {
        // Released in the order taken, as the writer thread answers; sometimes several at once.
        for (let k = rnd(3) + 1; k > 0 && live.length; k--) {
          const l = live.shift()!;
          assert.ok(
            l.view.every((b) => b === l.fill),
            `span [${l.span[0]}, ${l.span[1]}) was overwritten while in use`,
          );
          ring.release(l.span);
        }
        continue;
      }
      const n = 1 + rnd(20_000);
      const fill = i & 255;
      const span = ring.stage(Buffer.alloc(n, fill));
      if (!span) {
        refused++;
        continue;
      }
      staged++;
      assert.equal(span[1] - span[0], n);
      live.push({ span, view: ring.buf.subarray(span[0], span[1]), fill });
    }
    assert.ok(staged > 1000 && refused > 0, `exercised both paths (${staged} staged, ${refused} refused)`);
    for (const l of live.splice(0)) {
      assert.ok(l.view.every((b) => b === l.fill));
      ring.release(l.span);
    }
    assert.equal(ring.spansInUse, 0);
    assert.ok(ring.stage(Buffer.alloc(64 * 1024, 1)), 'empty again: the whole ring is free');
  });
});
