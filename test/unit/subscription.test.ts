/**
 * Subscription: what a live subscriber gets while its transport is full. The transport here is a
 * scripted stand-in for the gRPC server stream (it says "wait" on demand and records what it was
 * given); the log is a Map standing in for the store. What is asserted is the subscription's own
 * logic: every change arrives exactly once and in order, changes applied while the transport was
 * full are sent from memory when it drains (the log is not read), and a subscriber further behind
 * than the window is served from the log instead of growing the agent's memory.
 */
import assert from 'node:assert/strict';
import { SubscribeEvent } from '../../agent/checkpoint/messages';
import { SubscriberStream, Subscription, SubscriptionHost } from '../../agent/checkpoint/subscription';

interface Rig {
  sub: Subscription;
  /** Applies the next batch of `table` (`bytes` long) and tells the subscription, as the write path does. */
  apply(table: string, bytes: number): number;
  sent: { table: string; seq: number }[];
  logReads: number;
  /** From now on the transport takes one more write and then says wait (write() answers false). */
  block(): void;
  /** The transport drained and says so; it takes `room` writes (the last answered with wait). */
  drain(room?: number): void;
}

function rig(windowBytes: number, tables = ['a', 'b']): Rig {
  const seqs = new Map(tables.map((t) => [t, 0]));
  const log = new Map<string, Map<number, Buffer>>(tables.map((t) => [t, new Map()]));
  let room = Infinity;
  let drainCb: (() => void) | null = null;
  const r: Rig = {
    sub: null as unknown as Subscription,
    sent: [],
    logReads: 0,
    apply(table, bytes) {
      const seq = seqs.get(table)! + 1;
      seqs.set(table, seq);
      const records = Buffer.alloc(bytes, seq & 255);
      log.get(table)!.set(seq, records);
      r.sub.onBatch(table, seq, records, 1);
      return seq;
    },
    block: () => (room = 1),
    drain(n = Infinity) {
      room = n;
      drainCb?.();
    },
  };
  const host: SubscriptionHost = {
    stallTimeoutMs: 60_000,
    windowBytes,
    tableSeq: (t) => seqs.get(t) ?? 0,
    readLog(t, after, limit) {
      r.logReads++;
      const out = [];
      for (let s = after + 1; s <= Math.min(seqs.get(t)!, after + limit); s++) out.push({ seq: s, records: log.get(t)!.get(s)!, count: 1 });
      return out;
    },
    startSnapshot: () => {
      throw new Error('no snapshot expected: the subscriber starts current');
    },
  };
  const stream: SubscriberStream = {
    write(ev: SubscribeEvent) {
      if (ev.change) r.sent.push({ table: ev.change.table, seq: ev.change.seq });
      return --room > 0;
    },
    onDrain: (cb) => (drainCb = cb),
    end: () => undefined,
    fail: (e) => assert.fail(`subscription failed: ${e.message}`),
  };
  // Subscribed with one batch of each table already held, so it starts live and current.
  for (const t of tables) {
    seqs.set(t, 1);
    log.get(t)!.set(1, Buffer.alloc(1));
  }
  r.sub = new Subscription('s1', 'FOLLOW', host, stream, () => undefined);
  r.sub.start(tables, Object.fromEntries(tables.map((t) => [t, 1])));
  r.logReads = 0; // start() looks at the log to plan; count from here
  return r;
}

/** Every table's sequences 2..n arrive once each, in order. */
function assertInOrder(sent: { table: string; seq: number }[], last: Record<string, number>): void {
  for (const [t, n] of Object.entries(last)) {
    const got = sent.filter((e) => e.table === t).map((e) => e.seq);
    assert.deepEqual(
      got,
      Array.from({ length: n - 1 }, (_, i) => i + 2),
      `table ${t}`,
    );
  }
}

describe('Subscription: a live subscriber whose transport is full', () => {
  it('gets the changes applied meanwhile from memory, in order, once the transport drains', () => {
    const r = rig(1 << 20);
    r.apply('a', 100);
    r.block();
    r.apply('b', 100); // written, and the transport says wait
    for (let i = 0; i < 20; i++) r.apply(i % 3 === 0 ? 'b' : 'a', 1000);
    const readsBefore = r.logReads;
    const sentWhileBlocked = r.sent.length;
    assert.equal(sentWhileBlocked, 2, 'nothing goes out while the transport is full');
    r.drain();
    assert.equal(r.logReads, readsBefore, 'held changes come from memory, not the log');
    assertInOrder(r.sent, { a: 15, b: 9 });
    // Live again: the next batch goes straight out.
    r.apply('a', 10);
    assert.deepEqual(r.sent.at(-1), { table: 'a', seq: 16 });
  });

  it('holds changes only within the window; the rest come from the log, after the held ones, in order', () => {
    const r = rig(10_000);
    r.block();
    r.apply('a', 1000); // sent; the transport says wait
    // 1000 unacknowledged + 8 held = 9000 bytes; the 10th and later do not fit.
    for (let i = 0; i < 30; i++) r.apply(i % 2 ? 'a' : 'b', 1000);
    assert.equal(r.sent.length, 1);
    r.drain();
    assert.equal(r.logReads, 0);
    assert.equal(r.sent.length, 10, 'the held changes go out, and fill the window');
    // The subscriber applies what it got: the window opens, the rest comes from the log.
    for (let round = 0; round < 10 && r.sent.length < 31; round++) {
      for (const t of ['a', 'b']) r.sub.onAck(t, Math.max(0, ...r.sent.filter((e) => e.table === t).map((e) => e.seq)));
    }
    assert.ok(r.logReads > 0, 'what did not fit in the window is read from the log');
    assertInOrder(r.sent, { a: 17, b: 16 });
  });

  it('sends held changes only while the transport takes them, and resumes on the next drain', () => {
    const r = rig(1 << 20);
    r.block();
    for (let i = 0; i < 10; i++) r.apply('a', 100);
    assert.equal(r.sent.length, 1);
    r.drain(2); // takes two, then is full again
    assert.equal(r.sent.length, 3);
    r.apply('a', 100); // applied while held ones wait: behind them
    r.drain();
    assertInOrder(r.sent, { a: 12 });
  });
});
