/**
 * Every kind of bad input gets the right gRPC status and a message naming the problem, and
 * nothing already acknowledged changes. Uses raw gRPC calls, because the SDK never sends these.
 */
import * as grpc from '@grpc/grpc-js';
import assert from 'node:assert/strict';
import { RecordBuilder, OP_PUT } from '../../agent/checkpoint/records';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, registerRaw, unaryCall, registration } from '../../harness/grpc-client';
import { until } from '../../harness/wait';

function batch(fill: (b: RecordBuilder) => void): { records: Buffer; count: number } {
  const b = new RecordBuilder();
  fill(b);
  return b.take();
}

/** A hand-made record: op, key, value, with lengths that may lie. */
function rawRecord(op: number, key: Buffer, value: Buffer | null, lens?: { keyLen?: number; valLen?: number }): Buffer {
  const h = Buffer.alloc(7);
  h[0] = op;
  h.writeUInt16BE(lens?.keyLen ?? key.length, 1);
  h.writeUInt32BE(lens?.valLen ?? (value ? value.length : 0), 3);
  return Buffer.concat([h, key, value ? Buffer.concat([Buffer.from([0, 1]), value]) : Buffer.alloc(0)]);
}

describe('checkpoint: bad input is refused and loses nothing', function () {
  this.timeout(60_000);
  let agent: AgentHandle;
  let c: AnyClient;
  let sessionId: string;
  let session: grpc.ClientDuplexStream<unknown, Record<string, unknown>>;
  let standby: CheckpointClient;

  const write = (seq: number, b: { records: Buffer; count: number }, table = 'rib', sid = sessionId) =>
    unaryCall(c, 'Write', { sessionId: sid, table, seq, records: b.records, count: b.count });
  const status = async () =>
    (await unaryCall<{ processes: { tables: { seq: number; records: number }[] }[] }>(c, 'Status', { process: 'bgp' })).processes[0].tables[0];

  before(async () => {
    agent = await startAgent({ args: ['--max-key-bytes', '64', '--max-value-bytes', '256', '--stall-timeout-ms', '1500'] });
    c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const r = await registerRaw(c, registration());
    sessionId = r.registered.sessionId;
    session = r.call;
    // Acknowledged state every refusal below must leave unchanged.
    await write(
      1,
      batch((b) => {
        for (let i = 0; i < 100; i++) b.put(`10.0.${i}.0/24`, 1, Buffer.from(`attrs-${i}`));
      }),
    );
    await write(
      2,
      batch((b) => b.delete('10.0.0.0/24')),
    );
    standby = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@vm2',
      vmId: 'vm2',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [],
      role: 'STANDBY',
    });
    await standby.start();
    await until('standby holds seq 2', () => standby.table('rib').seq === 2);
  });

  after(async () => {
    await standby?.close();
    session?.end();
    c?.close();
    await stopAllAgents();
  });

  afterEach(async () => {
    const t = await status();
    assert.equal(t.seq, 2, 'the table sequence is unchanged');
    assert.equal(t.records, 99, 'the acknowledged records are unchanged');
  });

  it('refuses an invalid registration with INVALID_ARGUMENT', async () => {
    await expectStatus(registerRaw(c, registration({ process: '', instanceId: 'x' })), grpc.status.INVALID_ARGUMENT, /process name '' is not valid/);
    await expectStatus(registerRaw(c, registration({ instanceId: 'y', schemaWrites: 0 })), grpc.status.INVALID_ARGUMENT, /schema_writes/);
    await expectStatus(registerRaw(c, registration({ instanceId: 'z', wantedRole: 'ROLE_UNSPECIFIED' })), grpc.status.INVALID_ARGUMENT, /wanted_role/);
  });

  it('refuses a second active with FAILED_PRECONDITION naming the current one', async () => {
    await expectStatus(
      registerRaw(c, registration({ instanceId: 'bgp@vm9', vmId: 'vm9' })),
      grpc.status.FAILED_PRECONDITION,
      /already has an active instance 'bgp@vm1'/,
    );
  });

  it('ends a session that sends a malformed SessionNotice with INVALID_ARGUMENT naming the field', async () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ session: '', outcome: 'NONSTOP', durationMs: 1, detail: '' }, /SessionNotice.session must name the session/],
      [{ session: 'bgp 198.51.100.2', outcome: 'OUTCOME_UNSPECIFIED', durationMs: 1, detail: '' }, /outcome must be NONSTOP, GRACEFUL_RESTART or RESET/],
      [{ session: 'bgp 198.51.100.2', outcome: 'NONSTOP', durationMs: 1, detail: 'x'.repeat(1001) }, /detail is over 1,000 bytes/],
    ];
    for (const [i, [notice, want]] of cases.entries()) {
      const r = await registerRaw(c, registration({ instanceId: `bgp@vm-notice-${i}`, vmId: `vm-notice-${i}`, wantedRole: 'STANDBY' }));
      const ended = new Promise<grpc.ServiceError>((resolve) => r.call.on('error', resolve));
      r.call.write({ notice });
      const e = await ended;
      assert.equal(e.code, grpc.status.INVALID_ARGUMENT, e.message);
      assert.match(e.details, want);
    }
  });

  it('refuses a duplicate instance id with ALREADY_EXISTS', async () => {
    await expectStatus(registerRaw(c, registration({ wantedRole: 'STANDBY' })), grpc.status.ALREADY_EXISTS, /instance 'bgp@vm1' is already registered/);
  });

  it('refuses, at registration, a standby that cannot read the active schema, naming both versions', async () => {
    const r = await registerRaw(c, {
      ...registration({ process: 'ospf', instanceId: 'ospf@vm1', schemaWrites: 2, schemaReads: [2], tables: [{ name: 'lsdb' }] }),
    });
    try {
      await expectStatus(
        registerRaw(
          c,
          registration({ process: 'ospf', instanceId: 'ospf@vm2', vmId: 'vm2', wantedRole: 'STANDBY', schemaWrites: 1, schemaReads: [1], tables: [] }),
        ),
        grpc.status.FAILED_PRECONDITION,
        /reads schema versions \[1\] but the active 'ospf@vm1' .* writes schema 2/,
      );
    } finally {
      r.call.end();
    }
  });

  it('refuses writes without a session, from a standby, and to an unknown table', async () => {
    const b = batch((x) => x.put('k', 1, Buffer.from('v')));
    await expectStatus(write(3, b, 'rib', 'nope'), grpc.status.FAILED_PRECONDITION, /unknown session 'nope'/);
    await expectStatus(write(3, b, 'rib', standby.sessionId), grpc.status.FAILED_PRECONDITION, /is STANDBY .* only the active instance writes/);
    await expectStatus(write(3, b, 'routes'), grpc.status.NOT_FOUND, /unknown table 'routes' .*known: rib/);
  });

  it('refuses empty and oversize keys and values with INVALID_ARGUMENT naming the record', async () => {
    await expectStatus(
      write(3, { records: rawRecord(OP_PUT, Buffer.alloc(0), Buffer.from('v')), count: 1 }),
      grpc.status.INVALID_ARGUMENT,
      /record 0: empty key/,
    );
    await expectStatus(write(3, { records: rawRecord(OP_PUT, Buffer.from('k'), Buffer.alloc(0)), count: 1 }), grpc.status.INVALID_ARGUMENT, /empty value/);
    await expectStatus(
      write(3, { records: rawRecord(OP_PUT, Buffer.alloc(65, 97), Buffer.from('v')), count: 1 }),
      grpc.status.INVALID_ARGUMENT,
      /key of 65 bytes exceeds the limit of 64/,
    );
    const two = Buffer.concat([rawRecord(OP_PUT, Buffer.from('ok'), Buffer.from('v')), rawRecord(OP_PUT, Buffer.from('big'), Buffer.alloc(257))]);
    await expectStatus(write(3, { records: two, count: 2 }), grpc.status.INVALID_ARGUMENT, /record 1: value of 257 bytes exceeds the limit of 256/);
    // The valid first record of that batch was not applied either.
    assert.equal(standby.table('rib').get('ok'), undefined);
  });

  it('refuses malformed record bytes: truncated, wrong count, unknown op', async () => {
    const good = rawRecord(OP_PUT, Buffer.from('k'), Buffer.from('value'));
    await expectStatus(write(3, { records: good.subarray(0, good.length - 2), count: 1 }), grpc.status.INVALID_ARGUMENT, /truncated/);
    await expectStatus(write(3, { records: good, count: 2 }), grpc.status.INVALID_ARGUMENT, /declares 2 records but holds 1/);
    await expectStatus(write(3, { records: rawRecord(9, Buffer.from('k'), null), count: 1 }), grpc.status.INVALID_ARGUMENT, /unknown op 9/);
    await expectStatus(write(3, { records: Buffer.alloc(0), count: 0 }), grpc.status.INVALID_ARGUMENT, /no records/);
  });

  it('answers a duplicate sequence with ALREADY_EXISTS and a gap with OUT_OF_RANGE', async () => {
    const b = batch((x) => x.put('10.0.1.0/24', 1, Buffer.from('changed')));
    await expectStatus(write(2, b), grpc.status.ALREADY_EXISTS, /seq 2 .* already applied \(table is at 2\); nothing changed/);
    await expectStatus(write(1, b), grpc.status.ALREADY_EXISTS, /already applied/);
    await expectStatus(write(5, b), grpc.status.OUT_OF_RANGE, /leaves a gap: the table is at 2, the next batch must be 3/);
    assert.equal(standby.table('rib').get('10.0.1.0/24')!.toString(), 'attrs-1');
  });

  it('answers a message that is not protobuf with INVALID_ARGUMENT, not a bare INTERNAL', async () => {
    const err = await expectStatus(
      new Promise((resolve, reject) =>
        c.makeUnaryRequest(
          '/hitless.v1.Checkpoint/Write',
          (x: Buffer) => x,
          (x: Buffer) => x,
          Buffer.from([0xff, 0xff, 0xff, 0xff]),
          (e, v) => (e ? reject(e) : resolve(v)),
        ),
      ),
      grpc.status.INVALID_ARGUMENT,
      /malformed Write request/,
    );
    assert.ok(err.details.length > 20);
  });
});

describe('checkpoint: a subscriber that stops reading', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('is dropped with RESOURCE_EXHAUSTED while a healthy standby keeps up and nothing acknowledged changes', async () => {
    const agent = await startAgent({ args: ['--stall-timeout-ms', '1500', '--subscriber-window-bytes', '2000000'] });
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const active = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@vm1',
      vmId: 'vm1',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [{ name: 'rib', durability: 'ASYNC' }],
      role: 'ACTIVE',
    });
    const healthy = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@vm2',
      vmId: 'vm2',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [],
      role: 'STANDBY',
    });
    const slow = await registerRaw(c, registration({ instanceId: 'bgp@slow', vmId: 'slow', wantedRole: 'STANDBY', tables: [] }));
    try {
      await active.start();
      await healthy.start();
      const sub = (c.Subscribe as (req: unknown) => grpc.ClientReadableStream<unknown>).call(c, {
        sessionId: slow.registered.sessionId,
        have: {},
        mode: 'FOLLOW',
      });
      const ended = new Promise<grpc.ServiceError>((resolve) => sub.on('error', resolve));
      sub.pause(); // reads nothing from now on
      // ~16 MB of changes: far more than the HTTP/2 windows and socket buffers hold.
      const payload = Buffer.alloc(200, 1);
      const pending: Promise<number>[] = [];
      for (let i = 0; i < 80; i++) {
        const b = active.batch('rib');
        for (let j = 0; j < 1000; j++) b.put(`10.${i}.${j >> 8}.${j & 255}/32`, payload);
        pending.push(b.commit());
      }
      const last = Math.max(...(await Promise.all(pending)));
      const before = active.digest('rib');
      await until('healthy standby caught up', () => healthy.table('rib').seq === last);
      assert.equal(healthy.digest('rib').sha256, before.sha256);
      sub.resume();
      const err = await ended;
      assert.equal(err.code, grpc.status.RESOURCE_EXHAUSTED);
      assert.match(err.details, /stopped reading for 1500 ms/);
      const t = (await unaryCall<{ processes: { tables: { seq: number; records: number }[] }[] }>(c, 'Status', { process: 'bgp' })).processes[0].tables[0];
      assert.equal(t.seq, last);
      assert.equal(t.records, before.records);
    } finally {
      slow.call.end();
      await active.close();
      await healthy.close();
      c.close();
    }
  });
});
