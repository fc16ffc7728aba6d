/**
 * Frame channels (hitless.v1.Checkpoint OpenChannel) spoken the way a daemon in C, Go or Python
 * would speak them: from the proto's text, with frames built and parsed by hand here (not with
 * agent/checkpoint/frames.ts, so a mistake shared by the agent and the SDK still shows). What a
 * channel does must be what its gRPC twin does: the same acks in the same order, the same
 * statuses and messages, and nothing acknowledged lost or changed by a bad frame.
 */
import * as grpc from '@grpc/grpc-js';
import type { ServiceDefinition } from '@grpc/proto-loader';
import Database from 'better-sqlite3';
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadProtos } from '../../agent/grpc/proto';
import { RecordBuilder } from '../../agent/checkpoint/records';
import { SubscribeEvent } from '../../agent/checkpoint/messages';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import { AgentHandle, scrapeMetrics, startAgent, stopAllAgents } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, registerRaw, registration, unaryCall } from '../../harness/grpc-client';
import { tcpRelay } from '../../harness/tcp-relay';
import { until } from '../../harness/wait';

const WRITE = 1;
const WRITE_ACK = 2;
const CHANGE = 3;
const EVENT = 4;
const ACK = 5;
const STATUS = 6;

interface Frame {
  type: number;
  body: Buffer;
}

/** frame := type:u8 length:u32be body */
function frame(type: number, body: Buffer, length = body.length): Buffer {
  const h = Buffer.alloc(5);
  h[0] = type;
  h.writeUInt32BE(length, 1);
  return Buffer.concat([h, body]);
}

/** WRITE / CHANGE body: seq:u64 count:u32 table_len:u16 table records */
function batchBody(table: string, seq: number, records: Buffer, count: number): Buffer {
  const h = Buffer.alloc(14);
  h.writeBigUInt64BE(BigInt(seq), 0);
  h.writeUInt32BE(count, 8);
  h.writeUInt16BE(Buffer.byteLength(table), 12);
  return Buffer.concat([h, Buffer.from(table), records]);
}

/** WRITE_ACK / ACK body: seq:u64 table_len:u16 table */
function seqBody(table: string, seq: number): Buffer {
  const h = Buffer.alloc(10);
  h.writeBigUInt64BE(BigInt(seq), 0);
  h.writeUInt16BE(Buffer.byteLength(table), 8);
  return Buffer.concat([h, Buffer.from(table)]);
}

const seqOf = (f: Frame) => Number(f.body.readBigUInt64BE(0));
const statusOf = (f: Frame) => ({ code: f.body.readUInt32BE(0), message: f.body.toString('utf8', 4) });

function records(n: number, tag: string): { records: Buffer; count: number } {
  const b = new RecordBuilder();
  for (let i = 0; i < n; i++) b.put(`${tag}.${i}`, 1, Buffer.from(`${tag}-value-${i}`));
  return b.take();
}

/**
 * The SDK clients of process 'bgp' with one table 'rib': the active bgp@vm1 and the standby
 * bgp@vm2, reaching the agent at `conn.address` (and its bulk socket at `conn.bulkAddress`, if given).
 */
function activeAndStandby(conn: { address: string; bulkAddress?: string }, durability: 'SYNC' | 'ASYNC'): [CheckpointClient, CheckpointClient] {
  const opts = { ...conn, process: 'bgp', softwareVersion: '1.0.0', schema: 1, tables: [{ name: 'rib', durability }] };
  return [
    new CheckpointClient({ ...opts, instanceId: 'bgp@vm1', vmId: 'vm1', role: 'ACTIVE' }),
    new CheckpointClient({ ...opts, instanceId: 'bgp@vm2', vmId: 'vm2', role: 'STANDBY' }),
  ];
}

/** One redeemed channel: frames received in order, and whether the agent closed it. */
class RawChannel {
  private readonly frames: Frame[] = [];
  private buf = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  closed = false;

  constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      while (this.buf.length >= 5 && this.buf.length >= 5 + this.buf.readUInt32BE(1)) {
        const len = this.buf.readUInt32BE(1);
        this.frames.push({ type: this.buf[0], body: this.buf.subarray(5, 5 + len) });
        this.buf = this.buf.subarray(5 + len);
      }
      this.wake?.();
    });
    sock.on('error', () => undefined);
    sock.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
  }

  /** `allowHalfOpen`: this side stays open after the agent ended its side (a client that never closes). */
  static async open(c: AnyClient, req: Record<string, unknown>, allowHalfOpen = false): Promise<RawChannel> {
    const t = await unaryCall<{ unixPath: string; token: Buffer }>(c, 'OpenChannel', req);
    assert.equal(t.token.length, 16);
    const sock = net.connect({ path: t.unixPath, allowHalfOpen });
    await new Promise<void>((res, rej) => sock.once('connect', res).once('error', rej));
    sock.write(t.token);
    return new RawChannel(sock);
  }

  send(bytes: Buffer): void {
    this.sock.write(bytes);
  }

  /** The next frame; fails when the connection closes first. */
  async next(): Promise<Frame> {
    for (;;) {
      const f = this.frames.shift();
      if (f) return f;
      if (this.closed) throw new Error('the agent closed the channel with no frame left to read');
      await new Promise<void>((r) => (this.wake = r));
    }
  }

  /** The final STATUS frame, after which the agent closes the connection. */
  async status(): Promise<{ code: number; message: string }> {
    const f = await this.next();
    assert.equal(f.type, STATUS, `expected STATUS, got a frame of type ${f.type}`);
    await this.closedByAgent();
    return statusOf(f);
  }

  async closedByAgent(): Promise<void> {
    while (!this.closed) await new Promise<void>((r) => (this.wake = r));
    assert.equal(this.frames.length, 0, 'nothing after the last frame');
  }
}

describe('checkpoint: frame channels, as a daemon in another language speaks them', function () {
  this.timeout(60_000);
  let agent: AgentHandle;
  let c: AnyClient;
  let active: string;
  let activeCall: grpc.ClientDuplexStream<unknown, Record<string, unknown>>;
  let seq = 0;
  const decodeEvent = (loadProtos().def['hitless.v1.Checkpoint'] as ServiceDefinition).Subscribe.responseDeserialize as (b: Buffer) => SubscribeEvent;
  const table = async () =>
    (await unaryCall<{ processes: { tables: { seq: number; records: number }[] }[] }>(c, 'Status', { process: 'bgp' })).processes[0].tables[0];

  before(async () => {
    agent = await startAgent();
    c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const r = await registerRaw(c, registration());
    active = r.registered.sessionId;
    activeCall = r.call;
  });

  after(async () => {
    activeCall?.end();
    c?.close();
    await stopAllAgents();
  });

  it('OpenChannel refuses a request without a kind or for an unknown session; an unknown or used token gets the connection closed', async () => {
    await expectStatus(unaryCall(c, 'OpenChannel', {}), grpc.status.INVALID_ARGUMENT, /names no kind of channel: set write .* or subscribe/);
    await expectStatus(unaryCall(c, 'OpenChannel', { write: { sessionId: 'nope' } }), grpc.status.FAILED_PRECONDITION, /unknown session 'nope'/);
    await expectStatus(
      unaryCall(c, 'OpenChannel', { subscribe: { sessionId: 'nope', have: {}, mode: 'FOLLOW' } }),
      grpc.status.FAILED_PRECONDITION,
      /unknown session 'nope'/,
    );
    const t = await unaryCall<{ unixPath: string; token: Buffer }>(c, 'OpenChannel', { write: { sessionId: active } });
    const first = new RawChannel(net.connect(t.unixPath));
    first.send(t.token);
    const again = new RawChannel(net.connect(t.unixPath));
    again.send(t.token);
    await again.closedByAgent();
    const unknown = new RawChannel(net.connect(t.unixPath));
    unknown.send(Buffer.alloc(16, 7));
    await unknown.closedByAgent();
    first.sock.end(); // nothing written: the agent ends the channel cleanly
    assert.deepEqual(await first.status(), { code: 0, message: '' });
  });

  it('a write channel acknowledges pipelined batches in order and, once the writer shut its side down, ends with STATUS 0', async () => {
    const ch = await RawChannel.open(c, { write: { sessionId: active } });
    const sent: number[] = [];
    for (let i = 0; i < 3; i++) {
      const b = records(50, `w${i}`);
      sent.push(++seq);
      ch.send(frame(WRITE, batchBody('rib', seq, b.records, b.count)));
    }
    ch.sock.end();
    for (const s of sent) {
      const f = await ch.next();
      assert.equal(f.type, WRITE_ACK);
      assert.deepEqual(f.body, seqBody('rib', s));
    }
    assert.deepEqual(await ch.status(), { code: 0, message: '' });
    const t = await table();
    assert.equal(t.seq, seq);
    assert.equal(t.records, 150);
  });

  it('a refused batch ends a write channel with its status after the acks of the batches before it; nothing after it is applied', async () => {
    const ch = await RawChannel.open(c, { write: { sessionId: active } });
    const good = records(10, 'g');
    ch.send(frame(WRITE, batchBody('rib', seq + 1, good.records, good.count)));
    ch.send(frame(WRITE, batchBody('rib', seq + 3, good.records, good.count))); // a gap
    ch.send(frame(WRITE, batchBody('rib', seq + 2, good.records, good.count))); // after the refusal: ignored
    const ack = await ch.next();
    assert.equal(ack.type, WRITE_ACK);
    assert.equal(seqOf(ack), ++seq);
    const st = await ch.status();
    assert.equal(st.code, grpc.status.OUT_OF_RANGE);
    assert.match(st.message, new RegExp(`batch seq ${seq + 2} of table 'rib' leaves a gap: the table is at ${seq}, the next batch must be ${seq + 1}`));
    assert.equal((await table()).seq, seq);
  });

  it('a malformed frame ends the channel with INVALID_ARGUMENT naming it, and changes nothing acknowledged', async () => {
    const before = await table();
    const cases: [Buffer, RegExp][] = [
      [frame(9, Buffer.alloc(3)), /frame of type 9 on a write channel, which takes only WRITE \(1\) frames/],
      [frame(ACK, seqBody('rib', 1)), /frame of type 5 on a write channel/],
      [frame(WRITE, Buffer.alloc(6)), /shorter than its 14-byte header/],
      [frame(WRITE, Buffer.alloc(0), 64 * 1024 * 1024), /frame of 67108864 bytes exceeds the limit of \d+/],
    ];
    for (const [bad, want] of cases) {
      const ch = await RawChannel.open(c, { write: { sessionId: active } });
      ch.send(bad);
      const st = await ch.status();
      assert.equal(st.code, grpc.status.INVALID_ARGUMENT, st.message);
      assert.match(st.message, want);
    }
    // A standby's session may open a write channel, but its batches are refused as on WriteStream.
    const sb = await registerRaw(c, registration({ instanceId: 'bgp@vm3', vmId: 'vm3', wantedRole: 'STANDBY', tables: [] }));
    try {
      const ch = await RawChannel.open(c, { write: { sessionId: sb.registered.sessionId } });
      const b = records(1, 'x');
      ch.send(frame(WRITE, batchBody('rib', seq + 1, b.records, b.count)));
      const st = await ch.status();
      assert.equal(st.code, grpc.status.FAILED_PRECONDITION);
      assert.match(st.message, /is STANDBY .* only the active instance writes/);
    } finally {
      sb.call.end();
    }
    assert.deepEqual(await table(), before);
  });

  it('a subscribe channel sends the snapshot ticket as an EVENT and the changes as CHANGE frames, and takes ACK frames', async () => {
    const sb = await registerRaw(c, registration({ instanceId: 'bgp@vm2', vmId: 'vm2', wantedRole: 'STANDBY', tables: [] }));
    try {
      const sub = await RawChannel.open(c, { subscribe: { sessionId: sb.registered.sessionId, have: {}, mode: 'FOLLOW' } });
      const first = await sub.next();
      assert.equal(first.type, EVENT);
      const ev = decodeEvent(first.body);
      assert.equal(ev.snapshot?.table, 'rib');
      assert.equal(ev.snapshot?.seq, seq);
      assert.equal(ev.snapshot?.records, (await table()).records);
      // The snapshot itself is not needed here: acknowledging its sequence says it was applied.
      sub.send(frame(ACK, seqBody('rib', seq)));
      const w = await RawChannel.open(c, { write: { sessionId: active } });
      const b = records(20, 'live');
      w.send(frame(WRITE, batchBody('rib', seq + 1, b.records, b.count)));
      assert.equal((await w.next()).type, WRITE_ACK);
      seq++;
      const change = await sub.next();
      assert.equal(change.type, CHANGE);
      assert.deepEqual(change.body, batchBody('rib', seq, b.records, b.count), 'the records arrive as they were written');
      sub.send(frame(ACK, seqBody('rib', seq)));
      await until('the agent counts the ack', async () => {
        const st = await unaryCall<{ processes: { peers: { instanceId: string; acked: Record<string, number>; ready: boolean }[] }[] }>(c, 'Status', {
          process: 'bgp',
        });
        const peer = st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2');
        return peer?.acked.rib === seq && peer.ready;
      });
      // An ack of a batch the table does not have yet ends the channel, as on the Ack stream.
      sub.send(frame(ACK, seqBody('rib', seq + 5)));
      const st = await sub.status();
      assert.equal(st.code, grpc.status.OUT_OF_RANGE);
      assert.match(st.message, new RegExp(`ack of seq ${seq + 5} for table 'rib' is beyond the table's sequence ${seq}`));
      w.sock.end();
      assert.equal((await w.status()).code, 0);
    } finally {
      sb.call.end();
    }
  });

  it('a RECOVER channel ends with caught_up and STATUS 0', async () => {
    const ch = await RawChannel.open(c, { subscribe: { sessionId: active, have: { rib: seq }, mode: 'RECOVER' } });
    const f = await ch.next();
    assert.equal(f.type, EVENT);
    assert.deepEqual(decodeEvent(f.body).caughtUp?.tableSeqs, { rib: seq });
    assert.deepEqual(await ch.status(), { code: 0, message: '' });
  });

  it('a write channel stops reading once 32 MiB of its batches wait for the store, and acknowledges every one in order once the store takes them', async () => {
    const b = new RecordBuilder();
    for (let i = 0; i < 1000; i++) b.put(`big.${i}`, 1, Buffer.alloc(1000, i));
    const big = b.take(); // about 1 MiB
    const n = 48;
    // Another connection holds the database's write lock: the agent's writer thread waits for it
    // (its busy timeout is 5 s; the lock is held for well under that), so nothing is acknowledged.
    const lock = new Database(path.join(agent.stateDir, 'hitless.db'));
    lock.exec('BEGIN IMMEDIATE');
    const ch = await RawChannel.open(c, { write: { sessionId: active } });
    const first = seq + 1;
    // Frames go out one at a time, each once the kernel took the one before (a write completes
    // only then): `taken` says how far the agent has read, give or take the socket's buffers.
    let taken = 0;
    let sending: Promise<void> = Promise.resolve();
    try {
      sending = (async () => {
        for (let i = 0; i < n; i++) {
          const f = frame(WRITE, batchBody('rib', first + i, big.records, big.count));
          await new Promise<void>((res, rej) => ch.sock.write(f, (e) => (e ? rej(e) : res())));
          taken++;
        }
      })();
      sending.catch(() => undefined);
      // The agent takes batches until 32 MiB wait for an ack, then leaves the rest unread.
      await until('the agent read 32 MiB of batches', () => taken >= 32);
      await sleep(500); // without the pause the agent would take the other 16 MiB in a few ms
      assert.ok(taken < n && taken <= 36, `the agent stopped reading (${taken} of ${n} batches of 1 MiB taken)`);
    } finally {
      lock.exec('ROLLBACK');
      lock.close();
    }
    await sending;
    seq += n;
    for (let s = first; s <= seq; s++) {
      const f = await ch.next();
      assert.equal(f.type, WRITE_ACK);
      assert.equal(seqOf(f), s);
    }
    ch.sock.end();
    assert.deepEqual(await ch.status(), { code: 0, message: '' });
    assert.equal((await table()).seq, seq);
  });

  it('closes a channel whose client never shuts its side down, some seconds after the last STATUS', async () => {
    const ch = await RawChannel.open(c, { write: { sessionId: active } }, true);
    ch.send(frame(9, Buffer.alloc(1)));
    const f = await ch.next();
    assert.equal(f.type, STATUS);
    assert.equal(statusOf(f).code, grpc.status.INVALID_ARGUMENT);
    // This side never ends or destroys the socket: only the agent can close it. A closed peer
    // shows on the next write (EPIPE), so a byte goes out now and then; the agent ignores them.
    await until(
      'the agent closed the socket',
      () => {
        if (!ch.closed) ch.sock.write(Buffer.alloc(1));
        return ch.closed;
      },
      20_000,
      200,
    );
  });
});

describe('checkpoint: an agent with frame channels turned off', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('answers OpenChannel with UNIMPLEMENTED, and SDK clients fall back to the gRPC streams and replicate exactly', async () => {
    const agent = await startAgent({ args: ['--no-frame-channels'] });
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const [a, b] = activeAndStandby({ address: agent.socket }, 'SYNC');
    try {
      await a.start();
      await expectStatus(unaryCall(c, 'OpenChannel', { write: { sessionId: a.sessionId } }), grpc.status.UNIMPLEMENTED, /--no-frame-channels.*WriteStream/);
      await a.batch('rib').put('10.0.0.0/8', Buffer.from('a')).commit();
      await b.start();
      await until('standby READY', async () => {
        const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
        return st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2')?.ready;
      });
      // SYNC: each commit resolves only once the standby applied it, over the gRPC Ack stream.
      for (let i = 0; i < 20; i++)
        await a
          .batch('rib')
          .put(`10.1.${i}.0/24`, Buffer.from(`nh${i}`))
          .commit();
      assert.equal(b.table('rib').seq, 21);
      assert.deepEqual(b.digest('rib'), a.digest('rib'));
    } finally {
      await b.close();
      await a.close();
      c.close();
    }
  });
});

describe('checkpoint: a frame channel that breaks while the session stands', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('the SDK registers again and resends what the agent lacks: every commit resolves once, the standby ends exact', async () => {
    // The agent's bulk socket is reached through a relay, as a guest reaches it through QEMU and
    // socat; the test breaks every relayed connection in the middle of a pipelined load.
    const agent = await startAgent({ tcp: true });
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const probe = await registerRaw(c, registration({ instanceId: 'probe@vm0', process: 'probe', vmId: 'vm0', tables: [] }));
    const { tcpAddress } = await unaryCall<{ tcpAddress: string }>(c, 'OpenChannel', { write: { sessionId: probe.registered.sessionId } });
    probe.call.end();
    const [host, port] = [tcpAddress.slice(0, tcpAddress.lastIndexOf(':')), Number(tcpAddress.slice(tcpAddress.lastIndexOf(':') + 1))];
    const relay = await tcpRelay(() => net.connect({ host, port }));
    const relayed = relay.sockets;
    const bulkAddress = relay.address;
    const [a, b] = activeAndStandby({ address: agent.socket, bulkAddress }, 'ASYNC');
    const restarts: string[] = [];
    a.on('disconnected', () => restarts.push('active'));
    b.on('disconnected', () => restarts.push('standby'));
    try {
      await a.start();
      await b.start();
      const commits: Promise<number>[] = [];
      for (let i = 0; i < 400; i++) {
        const batch = a.batch('rib');
        for (let j = 0; j < 50; j++) batch.put(`10.${i >> 8}.${i & 255}.${j}/32`, Buffer.from(`nh-${i}-${j}`));
        commits.push(batch.commit());
        if (i === 150) {
          // Wait until some of it is across, then break both channels mid-stream.
          await until('batches flowing', () => b.table('rib').seq > 20);
          assert.ok(relayed.size >= 4, `the active's and the standby's channels are relayed (${relayed.size} sockets)`);
          // Half of the clients first read what a relay writes when it cannot reach the agent
          // (socat's error line, as a guest reads it through QEMU): text that is no frame.
          let i = 0;
          for (const s of relay.clientSides)
            if (i++ % 2 === 0) s.write('2026/11/29 10:26:49 socat[77] E connect(5, AF=1 "bulk.sock", 11): Connection refused\n');
          await new Promise((r) => setTimeout(r, 50));
          for (const s of relayed) s.destroy();
        }
      }
      const seqs = await Promise.all(commits);
      assert.deepEqual(
        seqs,
        seqs.map((_s, i) => i + 1),
        'every batch resolved with its own sequence',
      );
      assert.ok(restarts.includes('active') && restarts.includes('standby'), `both registered again: ${restarts.join(', ')}`);
      await until('the standby holds everything', () => b.table('rib').seq === 400);
      assert.deepEqual(b.digest('rib'), a.digest('rib'));
      const st = await unaryCall<{ processes: { tables: { seq: number; records: number }[] }[] }>(c, 'Status', { process: 'bgp' });
      assert.deepEqual({ seq: st.processes[0].tables[0].seq, records: st.processes[0].tables[0].records }, { seq: 400, records: 20_000 });
    } finally {
      await b.close();
      await a.close();
      relay.close();
      c.close();
    }
  });
});

describe('checkpoint: an SDK client with no route to the bulk socket', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('uses the gRPC streams when it reaches the agent over TCP and the bulk socket is on a unix socket only', async () => {
    // The agent listens on its unix socket only (no --grpc-tcp, so no TCP bulk socket); the
    // clients reach its gRPC through a TCP forwarder, as through a port forward.
    const agent = await startAgent({ args: ['--metrics', '127.0.0.1:0'] });
    const forward = await tcpRelay(() => net.connect(agent.socket));
    const [a, b] = activeAndStandby({ address: forward.address }, 'SYNC');
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    try {
      await a.start();
      await b.start();
      // Following before the first batch: a table with records would come as a bulk snapshot,
      // which has no gRPC twin (such a standby needs a route to the bulk socket, or bulkAddress).
      await until('the standby follows', async () => {
        const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
        return st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2')?.ready === true;
      });
      for (let i = 1; i <= 20; i++) {
        const batch = a.batch('rib');
        for (let j = 0; j < 10; j++) batch.put(`10.${i}.${j}.0/24`, Buffer.from(`nh-${i}-${j}`));
        assert.equal(await batch.commit(), i);
      }
      await until('the standby holds everything', () => b.table('rib').seq === 20);
      assert.deepEqual(b.digest('rib'), a.digest('rib'));
    } finally {
      await b.close();
      await a.close();
      c.close();
      forward.close();
    }
    // The channels fell back: the streams were gRPC calls, and no frame channel was redeemed.
    const body = await scrapeMetrics(agent.ready.metrics as string);
    const calls = body.split('\n').filter((l) => l.startsWith('hitless_grpc_calls_total{'));
    assert.ok(
      calls.some((l) => l.includes('method="/hitless.v1.Checkpoint/WriteStream"')),
      `WriteStream was called: ${calls.join('; ')}`,
    );
    assert.ok(
      calls.some((l) => l.includes('method="/hitless.v1.Checkpoint/Subscribe"')),
      `Subscribe was called: ${calls.join('; ')}`,
    );
    assert.ok(!calls.some((l) => l.includes('/OpenChannel/')), `no frame channel was served: ${calls.join('; ')}`);
  });
});
