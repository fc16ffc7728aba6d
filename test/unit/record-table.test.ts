/**
 * RecordTable against a plain Map as the model: random PUT/DELETE/CLEAR batches, compaction, and
 * snapshots that must replay to exactly the table as of their sequence.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import path from 'node:path';
import { ArenaPool, canWarm } from '../../agent/checkpoint/arena-pool';
import { RecordTable, tableDigest, tableDigestSliced } from '../../agent/checkpoint/record-table';
import { RecordBuilder } from '../../agent/checkpoint/records';
import { until } from '../../harness/wait';

function rng(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a * 1103515245 + 12345) & 0x7fffffff;
    return a / 0x80000000;
  };
}

function modelDigest(m: Map<string, Buffer>): string {
  const t = new RecordTable();
  const b = new RecordBuilder();
  for (const [k, v] of m) b.put(k, 1, v);
  if (b.count) t.append(b.take().records);
  return tableDigest(t).sha256;
}

/** One random change of `key` in the batch and the model: a PUT of `value` with probability `putShare`, else a DELETE. */
function change(b: RecordBuilder, model: Map<string, Buffer>, rand: () => number, key: string, putShare: number, value: () => Buffer): void {
  if (rand() < putShare) {
    const v = value();
    b.put(key, 1, v);
    model.set(key, v);
  } else {
    b.delete(key);
    model.delete(key);
  }
}

/**
 * A table caught while its index grows (keys still in the old index), over 150,000 puts in
 * batches of 500, with the model of what it holds; `deleteSome` deletes every seventh key again.
 */
function tableWhileGrowing(deleteSome: boolean): { t: RecordTable; model: Map<string, Buffer> } {
  const t = new RecordTable();
  const model = new Map<string, Buffer>();
  const b = new RecordBuilder();
  for (let n = 0; !(t.growing && n > 150_000); n++) {
    const v = Buffer.from(`w${n}`);
    b.put(`f${n}`, 1, v);
    model.set(`f${n}`, v);
    if (deleteSome && n % 7 === 3) {
      b.delete(`f${n - 2}`);
      model.delete(`f${n - 2}`);
    }
    if (b.count >= 500) t.append(b.take().records);
  }
  return { t, model };
}

function replay(parts: { buf: Buffer; end: number }[]): RecordTable {
  const t = new RecordTable();
  for (const p of parts) t.append(p.buf.subarray(0, p.end));
  return t;
}

describe('RecordTable', () => {
  it('matches a Map model under random puts, deletes and clears, including after compaction', () => {
    const rand = rng(42);
    const t = new RecordTable();
    t.compactMinBytes = 64 * 1024; // compact often
    t.autoCompact = false; // this test drives compaction itself
    const model = new Map<string, Buffer>();
    let compactions = 0;
    for (let round = 0; round < 300; round++) {
      const b = new RecordBuilder();
      const n = 1 + Math.floor(rand() * 200);
      for (let i = 0; i < n; i++) {
        change(b, model, rand, `k${Math.floor(rand() * 3000)}`, 0.7, () => Buffer.from(`v${round}-${i}-${'x'.repeat(Math.floor(rand() * 50))}`));
        if ((round === 100 || round === 200) && i === n >> 1) {
          b.clear(); // mid-batch: what follows in the batch survives
          model.clear();
        }
      }
      t.append(b.take().records);
      if (t.needsCompaction()) {
        t.compact();
        compactions++;
      }
      assert.equal(t.size, model.size, `size after round ${round}`);
    }
    assert.ok(compactions > 0, 'compaction ran');
    for (const [k, v] of model) assert.deepEqual(t.get(k)?.value, v);
    assert.equal(t.get('k-missing'), undefined);
    assert.equal(tableDigest(t).sha256, modelDigest(model));
    // The log replays to the same table.
    assert.equal(tableDigest(replay(t.snapshot(1).parts)).sha256, modelDigest(model));
  });

  it('a snapshot replays to the table as of its sequence while later batches keep changing it', () => {
    const t = new RecordTable();
    const b = new RecordBuilder();
    for (let i = 0; i < 5000; i++) b.put(`p${i}`, 1, Buffer.from(`a${i}`));
    t.append(b.take().records);
    const at = tableDigest(t).sha256;
    const snap = t.snapshot(1);
    for (let i = 0; i < 5000; i += 2) b.put(`p${i}`, 2, Buffer.from(`b${i}`));
    for (let i = 1; i < 5000; i += 4) b.delete(`p${i}`);
    t.append(b.take().records);
    b.clear();
    b.put('only', 1, Buffer.from('one'));
    t.append(b.take().records);
    t.compact();
    assert.equal(t.size, 1);
    assert.equal(tableDigest(replay(snap.parts)).sha256, at);
  });

  it('compacts in the background while writes continue, and snapshots taken meanwhile stay exact', async () => {
    const rand = rng(7);
    const t = new RecordTable();
    t.compactMinBytes = 256 * 1024;
    const model = new Map<string, Buffer>();
    const b = new RecordBuilder();
    const snaps: { parts: { buf: Buffer; end: number }[]; digest: string }[] = [];
    let sawCompacting = 0;
    for (let round = 0; round < 400; round++) {
      for (let i = 0; i < 100; i++) change(b, model, rand, `r${Math.floor(rand() * 20000)}`, 0.9, () => Buffer.from(`${round}:${i}:${'y'.repeat(40)}`));
      t.append(b.take().records);
      if (t.compacting) {
        sawCompacting++;
        if (snaps.length < 5) snaps.push({ parts: t.snapshot(round).parts, digest: modelDigest(model) });
      }
      await new Promise((r) => setImmediate(r)); // let a compaction slice run
    }
    while (t.compacting) await new Promise((r) => setImmediate(r));
    assert.ok(sawCompacting > 0, 'a background compaction overlapped with writes');
    assert.ok(t.logBytes <= 2 * t.liveBytes + 512 * 1024, 'the log shrank');
    assert.equal(tableDigest(t).sha256, modelDigest(model));
    assert.equal(tableDigest(replay(t.snapshot(0).parts)).sha256, modelDigest(model));
    for (const s of snaps) assert.equal(tableDigest(replay(s.parts)).sha256, s.digest, 'snapshot taken during compaction');
  });

  it('a reserved append is filled in place over several turns while compaction waits, and a change in between cancels it', async () => {
    const rand = rng(11);
    const t = new RecordTable();
    t.compactMinBytes = 256 * 1024;
    const model = new Map<string, Buffer>();
    const b = new RecordBuilder();
    let filledWhileCompacting = 0;
    for (let round = 0; round < 300; round++) {
      for (let i = 0; i < 100; i++) change(b, model, rand, `r${Math.floor(rand() * 20000)}`, 0.9, () => Buffer.from(`${round}:${i}:${'y'.repeat(40)}`));
      const batch = b.take().records;
      // Written a part per event-loop turn, as a frame arrives from a socket; compaction slices
      // get those turns, and would copy live records over the room if they wrote meanwhile.
      const room = t.reserveAppend(batch.length);
      if (t.compacting) filledWhileCompacting++;
      for (let at = 0; at < batch.length; at += 1000) {
        batch.copy(room, at, at, Math.min(at + 1000, batch.length));
        await new Promise((r) => setImmediate(r));
      }
      t.appendReserved(batch.length);
    }
    assert.ok(filledWhileCompacting > 0, 'reservations were filled while a compaction was under way');
    while (t.compacting) await new Promise((r) => setImmediate(r));
    assert.equal(t.size, model.size);
    assert.equal(tableDigest(t).sha256, modelDigest(model));
    assert.equal(tableDigest(replay(t.snapshot(0).parts)).sha256, modelDigest(model), 'the log replays to the table');

    // A change in between cancels the reservation: its bytes never become records.
    const put = (k: string) => {
      const one = new RecordBuilder();
      one.put(k, 1, Buffer.from('v'));
      return one.take().records;
    };
    for (const other of [() => t.append(put('other')), () => t.clear()]) {
      const before = t.size;
      put('lost').copy(t.reserveAppend(put('lost').length));
      other();
      assert.throws(() => t.appendReserved(put('lost').length), /without a reservation/);
      assert.equal(t.get('lost'), undefined);
      assert.ok(t.size <= before + 1);
    }
  });

  it('a reserved append is applied as its bytes arrive: whole records at once, a cut record and a CLEAR once their bytes are all there', async () => {
    const rand = rng(12);
    const t = new RecordTable();
    t.compactMinBytes = 256 * 1024;
    const model = new Map<string, Buffer>();
    const b = new RecordBuilder();
    let appliedEarly = 0;
    for (let round = 0; round < 200; round++) {
      const withClear = round % 25 === 24;
      for (let i = 0; i < 100; i++) {
        if (withClear && i === 50) {
          b.clear();
          model.clear();
        }
        change(b, model, rand, `r${Math.floor(rand() * 20000)}`, 0.9, () => Buffer.from(`${round}:${i}:${'z'.repeat(Math.floor(rand() * 300))}`));
      }
      const batch = b.take().records;
      const room = t.reserveAppend(batch.length);
      const before = t.logRecords;
      // Pieces of any size, a turn apart (compaction slices get those turns and must wait).
      for (let at = 0; at < batch.length;) {
        const end = Math.min(batch.length, at + 1 + Math.floor(rand() * 3000));
        batch.copy(room, at, at, end);
        at = end;
        if (at < batch.length) t.appendReservedPart(at);
        await new Promise((r) => setImmediate(r));
      }
      if (!withClear && t.logRecords > before) appliedEarly++;
      t.appendReserved(batch.length);
    }
    assert.ok(appliedEarly > 150, `records were applied before their reservation was complete (${appliedEarly} of 192 batches)`);
    while (t.compacting) await new Promise((r) => setImmediate(r));
    assert.equal(t.size, model.size);
    assert.equal(tableDigest(t).sha256, modelDigest(model));
    assert.equal(tableDigest(replay(t.snapshot(0).parts)).sha256, modelDigest(model), 'the log replays to the table');

    // A record is applied only once its last byte is there.
    const one = new RecordBuilder();
    one.put('cut', 1, Buffer.from('whole value'));
    const rec = one.take().records;
    const room = t.reserveAppend(rec.length);
    rec.copy(room);
    t.appendReservedPart(rec.length - 1);
    assert.equal(t.get('cut'), undefined, 'a record missing its last byte is not applied');
    t.appendReservedPart(rec.length);
    assert.equal(t.get('cut')?.value.toString(), 'whole value');
    t.appendReserved(rec.length);
    // Applying fewer bytes than the records written cuts one: refused, not indexed half.
    rec.copy(t.reserveAppend(rec.length));
    assert.throws(() => t.appendReserved(rec.length - 2), /runs past the end/);
  });

  it('presize pages its index in a slice per turn, and a table changed meanwhile keeps every record', async () => {
    // Records arrive before the paging is done: the paging must stop, not zero their slots.
    const t = new RecordTable();
    const paged = t.presize(1_000_000);
    const b = new RecordBuilder();
    const model = new Map<string, Buffer>();
    for (let i = 0; i < 5000; i++) {
      const v = Buffer.alloc(20, i & 0xff);
      b.put(`p${i}`, 1, v);
      model.set(`p${i}`, v);
    }
    t.append(b.take().records);
    await paged;
    await new Promise((r) => setImmediate(r)); // a further turn: nothing is still paging
    assert.equal(t.size, 5000);
    for (const [k, v] of model) assert.deepEqual(t.get(k)?.value, v, k);
    assert.equal(tableDigest(t).sha256, modelDigest(model));
    // Unchanged, it resolves once the whole index is paged in; the table then takes its load.
    const u = new RecordTable();
    await u.presize(1_000_000);
    assert.equal(u.slots, 1 << 21);
    b.put('after', 1, Buffer.from('x'));
    u.append(b.take().records);
    assert.deepEqual(u.get('after')?.value, Buffer.from('x'));
  });

  it('grows its index a slice at a time: keys stay readable, updatable and deletable while they move', async () => {
    const rand = rng(99);
    const t = new RecordTable();
    t.autoCompact = false;
    const model = new Map<string, Buffer>();
    const b = new RecordBuilder();
    const check = (what: string) => {
      assert.equal(t.size, model.size, `size ${what}`);
      for (const [k, v] of model) assert.deepEqual(t.get(k)?.value, v, `${k} ${what}`);
    };
    // 200,000 keys: the index doubles from 262,144 slots at 157,287 keys, more than a turn moves.
    let n = 0;
    while (!(t.growing && n > 150_000)) {
      for (let i = 0; i < 1000; i++, n++) {
        const v = Buffer.from(`v${n}`);
        b.put(`g${n}`, 1, v);
        model.set(`g${n}`, v);
      }
      t.append(b.take().records);
    }
    // Keys still in the old index are found, updated and deleted in place of each other.
    for (let round = 0; round < 20 && t.growing; round++) {
      for (let i = 0; i < 500; i++) change(b, model, rand, `g${Math.floor(rand() * n)}`, 0.7, () => Buffer.from(`u${round}-${i}`));
      t.append(b.take().records);
      assert.ok(t.growing, 'inserts alone move only a few slots each');
    }
    check('while the index grows');
    // A compaction started now waits for the growth, then copies every live record.
    t.startCompaction();
    let turns = 0;
    while (t.growing || t.compacting) {
      await new Promise((r) => setImmediate(r));
      turns++;
    }
    assert.ok(turns > 1, 'the growth took several event-loop turns');
    check('after the growth and a compaction');
    assert.equal(tableDigest(t).sha256, modelDigest(model));
    assert.equal(tableDigest(replay(t.snapshot(0).parts)).sha256, modelDigest(model));
  });

  it('forEach and the digest see every key while the index grows', () => {
    const { t, model } = tableWhileGrowing(false);
    let seen = 0;
    t.forEach((k, _s, v) => {
      assert.deepEqual(v, model.get(k));
      seen++;
    });
    assert.equal(seen, model.size);
    assert.equal(tableDigest(t).sha256, modelDigest(model));
  });

  it('forEachIn visits every live record once over slices, begun while the index grows; version tells a change', async () => {
    const { t, model } = tableWhileGrowing(true);
    assert.ok(t.growing, 'the pass begins while keys are still in the old index');
    const version = t.version;
    const seen = new Map<string, Buffer>();
    let slices = 0;
    for (let slot = 0; slot >= 0; slices++) {
      slot = t.forEachIn(slot, 4096, (k, schema, v) => {
        assert.equal(schema, 1);
        assert.ok(!seen.has(k), `${k} visited twice`);
        seen.set(k, Buffer.from(v));
      });
      await new Promise((r) => setImmediate(r)); // other work runs between slices
    }
    assert.ok(slices > 10, `spread over slices (${slices})`);
    assert.equal(t.version, version, 'nothing changed during the pass');
    assert.deepEqual(seen, model);
    // Any change of the records moves the version; compaction does not.
    const c = new RecordBuilder();
    c.delete('f0');
    t.append(c.take().records);
    assert.notEqual(t.version, version);
    const v2 = t.version;
    t.compact();
    assert.equal(t.version, v2);
  });

  it('keeps values of other schema versions with their version', () => {
    const t = new RecordTable();
    const b = new RecordBuilder();
    b.put('a', 1, Buffer.from('old'));
    b.put('b', 2, Buffer.from('new'));
    t.append(b.take().records);
    assert.equal(t.get('a')!.schema, 1);
    assert.equal(t.get(Buffer.from('b'))!.schema, 2);
  });
});

describe('tableDigest: the encoding documented at TableDigest.sha256 in checkpoint.proto', () => {
  it('hashes key 0x00 schema-in-decimal 0x00 value 0x00 per live record, keys in byte order, prefixes first', () => {
    const t = new RecordTable();
    const b = new RecordBuilder();
    b.put('10.0.0.0/8', 2, Buffer.from([1, 2]));
    b.put('\xff', 1, Buffer.from('z'));
    b.put('10.0.0.0/80', 13, Buffer.from('v'));
    b.put('gone', 1, Buffer.from('x'));
    b.delete('gone');
    b.put('10', 1, Buffer.from('w'));
    t.append(b.take().records);
    // Written out by hand from the proto's text, in memcmp order of the keys.
    const bytes = Buffer.concat([
      Buffer.from('10\x001\x00w\x00', 'latin1'),
      Buffer.from('10.0.0.0/8\x002\x00', 'latin1'),
      Buffer.from([1, 2, 0]),
      Buffer.from('10.0.0.0/80\x0013\x00v\x00', 'latin1'),
      Buffer.from('\xff\x001\x00z\x00', 'latin1'),
    ]);
    assert.deepEqual(tableDigest(t), { records: 4, sha256: crypto.createHash('sha256').update(bytes).digest('hex') });
    assert.equal(tableDigest(new RecordTable()).sha256, 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
  });
});

describe('tableDigestSliced', () => {
  /** The digest written from the proto's text: records sorted by key bytes, each key 0 schema 0 value 0. */
  function referenceDigest(m: Map<string, { schema: number; value: Buffer }>): string {
    const h = crypto.createHash('sha256');
    for (const k of [...m.keys()].sort((a, b) => Buffer.compare(Buffer.from(a, 'latin1'), Buffer.from(b, 'latin1')))) {
      const r = m.get(k)!;
      h.update(Buffer.concat([Buffer.from(`${k}\0${r.schema}\0`, 'latin1'), r.value, Buffer.from([0])]));
    }
    return h.digest('hex');
  }

  it('equals the documented digest on a big churned table, and lets the event loop run in between', async function () {
    this.timeout(60_000);
    const t = new RecordTable();
    const model = new Map<string, { schema: number; value: Buffer }>();
    let x = 7;
    const rand = () => (x = (Math.imul(x, 1664525) + 1013904223) >>> 0) / 2 ** 32;
    for (let round = 0; round < 40; round++) {
      const b = new RecordBuilder();
      for (let i = 0; i < 5000; i++) {
        const n = Math.floor(rand() * 150_000);
        // Keys that are prefixes of others, and bytes above 0x7f.
        const key = n % 10 === 0 ? `${n}` : n % 10 === 1 ? `${n}\xe9/24` : `10.${n >> 8}.${n & 255}.0/24`;
        if (rand() < 0.1) {
          b.delete(key);
          model.delete(key);
        } else {
          const value = Buffer.alloc(1 + (n % 300), n & 0xff);
          const schema = 1 + (n % 3);
          b.put(key, schema, value);
          model.set(key, { schema, value });
        }
      }
      t.append(b.take().records);
    }
    // One value larger than the digest's scratch buffer.
    const big = new RecordBuilder();
    big.put('big', 1, Buffer.alloc(100_000, 7));
    t.append(big.take().records);
    model.set('big', { schema: 1, value: Buffer.alloc(100_000, 7) });

    let turns = 0;
    let counting = true;
    const tick = () => {
      turns++;
      if (counting) setImmediate(tick);
    };
    setImmediate(tick);
    // Slices of no time: the event loop gets a turn after every step of 1024 items at least.
    const d = await tableDigestSliced(t, 0);
    counting = false;
    assert.deepEqual(d, { records: model.size, sha256: referenceDigest(model) });
    assert.deepEqual(tableDigest(t), d);
    assert.deepEqual(await tableDigestSliced(t), d, 'with the default slices');
    assert.ok(turns >= Math.floor((2 * model.size) / 1024), `the event loop ran ${turns} times while ${model.size} records were digested`);
  });

  it('starts over when the table changes meanwhile, and describes the table as it is at the end', async () => {
    const t = new RecordTable();
    const b = new RecordBuilder();
    for (let i = 0; i < 100_000; i++) b.put(`k${i}`, 1, Buffer.from([i & 0xff]));
    t.append(b.take().records);
    const pending = tableDigestSliced(t);
    await new Promise((resolve) => setImmediate(resolve));
    const c = new RecordBuilder();
    c.put('k5', 2, Buffer.from('changed'));
    c.delete('k6');
    t.append(c.take().records);
    assert.deepEqual(await pending, tableDigest(t));
    assert.equal((await pending).records, 99_999);
  });
});

describe('ArenaPool', () => {
  const ARENA = 64 * 1024;

  /** A table whose small arenas come from `pool`, compacting whenever the log is twice the table. */
  function pooled(pool: ArenaPool): RecordTable {
    const t = new RecordTable({ pool });
    t.compactMinBytes = 4 * ARENA;
    t.autoCompact = false; // compacted explicitly below, so the test is deterministic
    return t;
  }

  function churn(t: RecordTable, model: Map<string, Buffer>, rand: () => number, round: number, keys: number): void {
    const b = new RecordBuilder();
    for (let i = 0; i < 200; i++) {
      const key = `k${Math.floor(rand() * keys)}`;
      const v = Buffer.from(`${round}:${i}:${'z'.repeat(Math.floor(rand() * 60))}`);
      b.put(key, 1, v);
      model.set(key, v);
    }
    t.append(b.take().records);
    if (t.needsCompaction()) t.compact();
  }

  it('a table under churn stops allocating: compaction hands its arenas to the next writes', () => {
    const pool = new ArenaPool(ARENA);
    const t = pooled(pool);
    const model = new Map<string, Buffer>();
    const rand = rng(3);
    for (let round = 0; round < 200; round++) churn(t, model, rand, round, 2000);
    const allocatedAfterWarmUp = pool.allocated;
    const reusedAfterWarmUp = pool.reused;
    for (let round = 200; round < 600; round++) churn(t, model, rand, round, 2000);
    assert.ok(pool.reused > reusedAfterWarmUp, 'retired arenas were written again');
    assert.equal(pool.allocated, allocatedAfterWarmUp, 'no arena was allocated once the table reached its steady size');
    assert.equal(tableDigest(t).sha256, modelDigest(model));
    // Arenas live outside what V8 counts as new external memory (see ArenaPool): that is the point.
    assert.ok(t.snapshot(0).parts[0].buf.buffer instanceof SharedArrayBuffer);
  });

  it('never reuses an arena a snapshot still lists; release() lets it go', () => {
    const pool = new ArenaPool(ARENA);
    const a = pooled(pool);
    const other = pooled(pool); // a second table of the same process takes what `a` retires
    const modelA = new Map<string, Buffer>();
    const modelO = new Map<string, Buffer>();
    const rand = rng(11);
    for (let round = 0; round < 100; round++) churn(a, modelA, rand, round, 1500);
    const pinned = a.snapshot(100);
    const pinnedDigest = modelDigest(modelA);
    for (let round = 100; round < 400; round++) {
      churn(a, modelA, rand, round, 1500);
      churn(other, modelO, rand, round, 1500);
    }
    assert.equal(tableDigest(replay(pinned.parts)).sha256, pinnedDigest, 'bytes of a held snapshot never change');
    const before = pool.freeBytes;
    pinned.release();
    pinned.release(); // a second release is a no-op
    assert.ok(pool.freeBytes > before, 'the released arenas went back to the pool');
    for (let round = 400; round < 500; round++) churn(other, modelO, rand, round, 1500);
    assert.equal(tableDigest(a).sha256, modelDigest(modelA));
    assert.equal(tableDigest(other).sha256, modelDigest(modelO));
  });

  it('with warmAhead, keeps arenas ready that a thread of their own made, once a big load was announced', async () => {
    const pool = new ArenaPool(ARENA, 64 * ARENA, 2);
    const t = new RecordTable({ pool });
    const b = new RecordBuilder();
    const model = new Map<string, Buffer>();
    const write = (from: number, to: number) => {
      for (let i = from; i < to; i++) {
        const v = Buffer.alloc(200, i & 0xff);
        b.put(`w${i}`, 1, v);
        model.set(`w${i}`, v);
        if (b.bytes > ARENA / 4) t.append(b.take().records);
      }
      if (b.count) t.append(b.take().records);
    };
    write(0, 1500); // ~330 KB, a batch at a time: several arenas
    await new Promise((r) => setTimeout(r, 100));
    assert.ok(pool.allocated >= 4, `arenas made: ${pool.allocated}`);
    assert.equal(pool.warmed + pool.freeBytes, 0, 'a table growing a batch at a time starts no warmer');

    // A presize for a big load starts warming before the table holds anything.
    const loading = new RecordTable({ pool });
    void loading.presize(1_000_000);
    await until('two warm arenas for the announced load', () => pool.freeBytes === 2 * ARENA, 10_000);
    assert.equal(pool.warmed, 2, 'made by the warmer');
    write(1500, 3000); // takes the two warm ones first; the warmer makes two more
    await until('the warmer kept two ready', () => pool.freeBytes === 2 * ARENA && pool.warmed === 4, 10_000);
    for (const [k, v] of model) assert.deepEqual(t.get(k)?.value, v);
    assert.equal(tableDigest(t).sha256, modelDigest(model));
  });

  it('a process whose pool warmed arenas still exits on its own (the thread never keeps it running)', async () => {
    // A routing process that loaded a big snapshot and then closed everything must end by itself.
    const code = `
      const { ArenaPool } = require(${JSON.stringify(path.join(__dirname, '../../agent/checkpoint/arena-pool.js'))});
      const pool = new ArenaPool(1 << 20, 64 << 20, 2);
      pool.warmNow();
      const t = setInterval(() => { if (pool.warmed + pool.freeBytes > 0) { clearInterval(t); console.log('warmed', pool.warmed); } }, 5);
    `;
    const r = await new Promise<{ code: number | null; signal: string | null; out: string }>((resolve) => {
      const child = execFile(process.execPath, ['-e', code], { timeout: 20_000, killSignal: 'SIGKILL' }, () => undefined);
      let out = '';
      child.stdout!.on('data', (d: Buffer) => (out += d));
      child.on('exit', (c, s) => resolve({ code: c, signal: s, out }));
    });
    if (canWarm()) assert.match(r.out, /warmed [12]/, 'the warmer made arenas first');
    assert.deepEqual([r.code, r.signal], [0, null], `exited by itself (output: ${r.out.trim()})`);
  });

  it("CLEAR returns a table's arenas; oversize batches and arenas beyond the cap are not kept", () => {
    const pool = new ArenaPool(ARENA, 2 * ARENA);
    const t = pooled(pool);
    const b = new RecordBuilder();
    for (let i = 0; i < 3000; i++) b.put(`c${i}`, 1, Buffer.alloc(60, 1));
    t.append(b.take().records); // one oversize batch (~200 KB): its own buffer, not pooled
    assert.equal(pool.allocated, 0);
    for (let r = 0; r < 25; r++) {
      for (let i = 0; i < 100; i++) b.put(`d${r}-${i}`, 1, Buffer.alloc(100, 2));
      t.append(b.take().records);
    }
    assert.ok(pool.allocated >= 3, `pooled arenas in use: ${pool.allocated}`);
    b.clear();
    t.append(b.take().records);
    assert.equal(t.size, 0);
    assert.equal(pool.freeBytes, 2 * ARENA, 'kept up to the cap, the rest left to the collector');
  });
});
