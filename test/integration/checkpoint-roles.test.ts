/**
 * Acknowledgement semantics (SYNC vs ASYNC) and agent-driven role changes (switchover: freeze,
 * drain, promote, demote, unfreeze), with real processes and real gRPC.
 */
import * as grpc from '@grpc/grpc-js';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import { RecordBuilder } from '../../agent/checkpoint/records';
import { startAgent, stopAllAgents } from '../../harness/agent-process';
import { startDaemon, stopAllDaemons } from '../../harness/daemon-process';
import { rawClient, registerRaw, unaryCall, registration } from '../../harness/grpc-client';
import { until } from '../../harness/wait';

describe('checkpoint: SYNC and ASYNC acknowledgements', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('acknowledges ASYNC once the agent applied it, SYNC only after the in-sync standby applied it', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const active = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@vm1',
      vmId: 'vm1',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [
        { name: 'async', durability: 'ASYNC' },
        { name: 'sync', durability: 'SYNC' },
      ],
      role: 'ACTIVE',
    });
    // The standby is driven by hand so the test decides when it acknowledges.
    const sb = await registerRaw(c, registration({ instanceId: 'bgp@vm2', vmId: 'vm2', wantedRole: 'STANDBY', tables: [] }));
    const order: string[] = [];
    try {
      await active.start();
      const sub = (c.Subscribe as (r: unknown) => grpc.ClientReadableStream<{ change?: { table: string; seq: number } }>).call(c, {
        sessionId: sb.registered.sessionId,
        have: {},
        mode: 'FOLLOW',
      });
      const received: { table: string; seq: number }[] = [];
      sub.on('data', (ev) => {
        if (ev.change) {
          received.push(ev.change);
          order.push(`standby received ${ev.change.table}/${ev.change.seq}`);
        }
      });
      sub.on('error', () => undefined);
      await until('standby READY', async () => {
        const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
        return st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2')?.ready;
      });
      const acks = (c.Ack as (cb: () => void) => grpc.ClientWritableStream<unknown>).call(c, () => undefined);

      // ASYNC: acknowledged although the standby never acknowledges it.
      const a = active
        .batch('async')
        .put('k', Buffer.from('v'))
        .commit()
        .then((s) => order.push(`async acked ${s}`));
      await a;
      await until('standby received async/1', () => received.some((r) => r.table === 'async'));

      // SYNC: not acknowledged while the standby holds it unacknowledged.
      let syncAcked = false;
      const s = active
        .batch('sync')
        .put('k', Buffer.from('v'))
        .commit()
        .then((q) => {
          syncAcked = true;
          order.push(`sync acked ${q}`);
        });
      await until('standby received sync/1', () => received.some((r) => r.table === 'sync'));
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(syncAcked, false, 'SYNC batch acknowledged before the standby applied it');
      order.push('standby acks sync/1');
      acks.write({ sessionId: sb.registered.sessionId, table: 'async', seq: 1 });
      acks.write({ sessionId: sb.registered.sessionId, table: 'sync', seq: 1 });
      await s;
      assert.ok(order.indexOf('async acked 1') < order.indexOf('standby acks sync/1'));
      assert.ok(order.indexOf('standby acks sync/1') < order.indexOf('sync acked 1'));
      acks.end();
      sub.cancel();
    } finally {
      sb.call.end();
      await active.close();
      c.close();
    }
  });

  it('releases a SYNC write when the standby leaves, instead of blocking the active forever', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const active = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@vm1',
      vmId: 'vm1',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [{ name: 'sync', durability: 'SYNC' }],
      role: 'ACTIVE',
    });
    const sb = await registerRaw(c, registration({ instanceId: 'bgp@vm2', vmId: 'vm2', wantedRole: 'STANDBY', tables: [] }));
    try {
      await active.start();
      const sub = (c.Subscribe as (r: unknown) => grpc.ClientReadableStream<unknown>).call(c, { sessionId: sb.registered.sessionId, have: {}, mode: 'FOLLOW' });
      sub.on('error', () => undefined);
      await until('standby READY', async () => {
        const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
        return st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2')?.ready;
      });
      const pending = active.batch('sync').put('k', Buffer.from('v')).commit();
      await new Promise((r) => setTimeout(r, 200));
      sb.call.end(); // the standby's session ends: it is no longer in sync
      sub.cancel();
      assert.equal(await pending, 1);
    } finally {
      await active.close();
      c.close();
    }
  });
});

describe('checkpoint: switchover driven by the agent', function () {
  this.timeout(120_000);
  afterEach(async () => {
    await stopAllDaemons();
    await stopAllAgents();
  });

  it('freezes the active, drains, promotes the standby and demotes the old active, with exact tables both ways', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const v1 = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '30000', '--churn', '10000']);
    await v1.waitFor((e) => e.event === 'loaded');
    const v2 = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby', '--churn', '10000', '--version', '2.0.0']);
    await v2.waitFor((e) => e.event === 'snapshot');
    await until('v2 READY', async () => {
      const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
      return st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2')?.ready;
    });
    const sw = await unaryCall<{ freezeMicros: number; tableSeqs: Record<string, number> }>(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' });
    assert.ok(sw.freezeMicros > 0);
    // Both role events were already printed when the RPC returned (PROMOTE was acknowledged).
    await v2.waitFor((e) => e.event === 'role' && e.role === 'ACTIVE', 10_000, 0);
    await v1.waitFor((e) => e.event === 'role' && e.role === 'STANDBY', 10_000, 0);
    // v2 writes now (its churn runs while ACTIVE); v1 follows from the log without a new snapshot.
    await new Promise((r) => setTimeout(r, 800));
    const n = v2.events.length;
    v2.send('stop');
    const stopped = await v2.waitFor((e) => e.event === 'stopped', 30_000, n);
    assert.ok((stopped.seq as number) > sw.tableSeqs.rib, 'the new active wrote after the switch');
    v1.send('stop'); // v1's churn timer must not write while STANDBY
    await until('v1 follows v2', async () => (await v1.digest()).seq === stopped.seq, 30_000, 50);
    assert.equal((await v1.digest()).sha256, (await v2.digest()).sha256);
    assert.equal(v1.events.filter((e) => e.event === 'snapshot').length, 0, 'the demoted active resumed without a snapshot');
    // And back again: the rollback direction is just as hitless.
    const back = await unaryCall<{ freezeMicros: number }>(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm1' });
    assert.ok(back.freezeMicros > 0);
    await v1.waitFor((e) => e.event === 'role' && e.role === 'ACTIVE', 10_000, v1.events.findIndex((e) => e.role === 'STANDBY') + 1);
    assert.equal((await v1.digest()).sha256, (await v2.digest()).sha256);
    c.close();
  });

  // The client logic is one; what the recorder can see differs: gRPC calls, or OpenChannel
  // requests (a frame channel's traffic is not gRPC).
  for (const channels of ['grpc', 'frames'] as const) {
    it(`a standby takes over on the write channel it opened while following, answering PROMOTE before anything else (${channels})`, async () => {
      const agent = await startAgent();
      const c = rawClient('hitless.v1.Checkpoint', agent.socket);
      const opts = {
        address: agent.socket,
        process: 'bgp',
        softwareVersion: '1.0.0',
        schema: 1,
        tables: [{ name: 'rib', durability: 'ASYNC' as const }],
        channels,
      };
      const a = new CheckpointClient({ ...opts, instanceId: 'bgp@vm1', vmId: 'vm1', role: 'ACTIVE' });
      // What the standby's gRPC calls do, in order, as its own interceptor sees them.
      const seen: string[] = [];
      const b = new CheckpointClient({ ...opts, instanceId: 'bgp@vm2', vmId: 'vm2', role: 'STANDBY', interceptors: [callRecorder(seen)] });
      const at = (entry: RegExp, from = 0) => seen.findIndex((e, i) => i >= from && entry.test(e));
      const writeChannel = channels === 'grpc' ? /^start WriteStream#/ : /^open write channel/;
      const ready = (id: string) =>
        until(`${id} READY`, async () => {
          const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
          return st.processes[0].peers.find((p) => p.instanceId === id)?.ready;
        });
      try {
        await a.start();
        for (let i = 0; i < 5; i++)
          await a
            .batch('rib')
            .put(`10.0.${i}.0/24`, Buffer.from(`nh${i}`))
            .commit();
        await b.start();
        await ready('bgp@vm2');
        const spare = at(writeChannel);
        assert.ok(spare >= 0, `the standby holds a write channel while following: ${seen.join(', ')}`);
        const spareId = seen[spare].split(' ').pop();
        // What a frame channel carries is not gRPC: only the gRPC run sees the writes on it.
        if (channels === 'grpc') assert.equal(at(new RegExp(`^write ${spareId}`)), -1, 'a standby writes nothing on it');

        await unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' });
        const promote = at(/^command PROMOTE/);
        const answered = at(/^result PROMOTE ok/, promote);
        assert.ok(promote > spare && answered > promote, seen.join(', '));
        // Between PROMOTE and its answer: no new call and no cancelled subscription (both cost tens
        // of ms in a slow guest, inside the freeze window). The agent ends the subscription itself.
        assert.deepEqual(
          seen.slice(promote + 1, answered).filter((e) => /^(start|cancel|open) /.test(e)),
          [],
        );
        if (channels === 'grpc') {
          await until('the agent ended the old subscription', () => at(/^status Subscribe#\d+ OK/) >= 0);
          assert.equal(at(/^cancel Subscribe#/), -1, seen.join(', '));
        }

        // The new active writes on the channel it already had.
        assert.equal(await b.batch('rib').put('10.9.0.0/16', Buffer.from('nh9')).commit(), 6);
        if (channels === 'grpc') assert.ok(at(new RegExp(`^write ${spareId}`)) > answered, seen.join(', '));
        assert.equal(seen.filter((e) => writeChannel.test(e)).length, 1, seen.join(', '));

        // Back: demoted, it follows again and opens a fresh spare for the next promotion.
        await ready('bgp@vm1');
        await unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm1' });
        const demote = at(/^command DEMOTE/);
        await until('a new spare write channel', () => at(writeChannel, demote) > demote);
        await a.batch('rib').delete('10.0.0.0/24').commit();
        await until('vm2 follows vm1 again', () => b.table('rib').seq === a.table('rib').seq);
        assert.deepEqual(b.digest('rib'), a.digest('rib'));
        assert.equal(b.table('rib').size, 5);
      } finally {
        await b.close();
        await a.close();
        c.close();
      }
    });
  }

  it('freezes the active right after its next batch, not in the middle of its work', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    // The active is driven by hand, so the test decides when it writes.
    const act = await registerRaw(c, registration());
    let seq = 0;
    const write = () => {
      const b = new RecordBuilder();
      b.put(`10.1.${seq}.0/24`, 1, Buffer.from(`nh${seq}`));
      return unaryCall(c, 'Write', { sessionId: act.registered.sessionId, table: 'rib', seq: ++seq, ...b.take() });
    };
    const commands: string[] = [];
    act.call.on('data', (m) => {
      const cmd = m.command as { commandId: number; kind: string } | undefined;
      if (!cmd) return;
      commands.push(cmd.kind);
      act.call.write({ result: { commandId: cmd.commandId, ok: true, tableSeqs: cmd.kind === 'FREEZE' ? { rib: seq } : {} } });
    });
    const standby = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      instanceId: 'bgp@vm2',
      vmId: 'vm2',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [{ name: 'rib', durability: 'ASYNC' }],
      role: 'STANDBY',
    });
    try {
      await write();
      await standby.start();
      await until('vm2 READY', async () => {
        const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
        return st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2')?.ready;
      });
      const switched = unaryCall<{ tableSeqs: Record<string, number> }>(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' });
      await until('the command-path check (UNFREEZE)', () => commands.includes('UNFREEZE'));
      // The agent waits up to 100 ms for the active's next batch before it freezes it.
      await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(commands, ['UNFREEZE'], 'FREEZE came before the active wrote again');
      await write();
      const r = await switched;
      assert.deepEqual(commands.slice(0, 2), ['UNFREEZE', 'FREEZE']);
      assert.deepEqual(r.tableSeqs, { rib: 2 });
      assert.equal(standby.role, 'ACTIVE');
      assert.equal(standby.table('rib').seq, 2);
      assert.equal(standby.table('rib').get('10.1.1.0/24')?.toString(), 'nh1');
    } finally {
      await standby.close();
      act.call.end();
      c.close();
    }
  });

  it('an audit asks every instance for its digests at the same time, and unfreezes the active once all answered', async function () {
    // One after the other, the first instance below would never answer (it waits for the other
    // to be asked too), and the audit would fail after the 60 s REPORT timeout.
    this.timeout(90_000);
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const act = await registerRaw(c, registration());
    const sb = await registerRaw(c, registration({ instanceId: 'bgp@vm2', vmId: 'vm2', wantedRole: 'STANDBY' }));
    const empty = { table: 'rib', seq: 0, records: 0, sha256: crypto.createHash('sha256').digest('hex') };
    const asked: { call: typeof act.call; commandId: number }[] = [];
    const log: string[] = [];
    for (const [who, s] of [
      ['active', act],
      ['standby', sb],
    ] as const) {
      s.call.on('data', (m) => {
        const cmd = m.command as { commandId: number; kind: string } | undefined;
        if (!cmd) return;
        log.push(`${who} ${cmd.kind}`);
        if (cmd.kind !== 'REPORT') return s.call.write({ result: { commandId: cmd.commandId, ok: true, tableSeqs: { rib: 0 } } });
        // Answered only once both were asked.
        asked.push({ call: s.call, commandId: cmd.commandId });
        if (asked.length === 2) for (const a of asked) a.call.write({ result: { commandId: a.commandId, ok: true, tableSeqs: { rib: 0 }, digests: [empty] } });
      });
    }
    try {
      const r = await unaryCall<{ consistent: boolean; detail: string; peers: unknown[] }>(c, 'Audit', { process: 'bgp' });
      assert.ok(r.consistent, r.detail);
      assert.equal(r.peers.length, 2);
      await until('the active unfrozen', () => log.includes('active UNFREEZE'));
      assert.deepEqual(log.slice(0, 1), ['active FREEZE']);
      assert.ok(log.indexOf('active UNFREEZE') > log.lastIndexOf('standby REPORT'), log.join(', '));
    } finally {
      act.call.end();
      sb.call.end();
      c.close();
    }
  });

  it('refuses to switch to a standby that is not READY, and leaves the active in charge', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const v1 = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '1000']);
    await v1.waitFor((e) => e.event === 'loaded');
    const sb = await registerRaw(c, registration({ instanceId: 'bgp@vm2', vmId: 'vm2', wantedRole: 'STANDBY', tables: [] }));
    await assert.rejects(
      unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' }),
      (e: grpc.ServiceError) => e.code === grpc.status.FAILED_PRECONDITION && /not READY/.test(e.details),
    );
    const n = v1.events.length;
    v1.send('load 100');
    await v1.waitFor((e) => e.event === 'loaded', 10_000, n);
    sb.call.end();
    c.close();
  });

  it('puts the old active back in charge, unfrozen, when the standby refuses PROMOTE', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const v1 = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1']);
    await v1.waitFor((e) => e.event === 'started');
    // A standby that follows the (empty) table, then answers PROMOTE with a refusal.
    const sb = await registerRaw(c, registration({ instanceId: 'bgp@vm2', vmId: 'vm2', wantedRole: 'STANDBY' }));
    const sub = (c.Subscribe as (r: unknown) => grpc.ClientReadableStream<unknown>).call(c, { sessionId: sb.registered.sessionId, have: {}, mode: 'FOLLOW' });
    sub.on('error', () => undefined);
    const commands: string[] = [];
    sb.call.on('data', (m: Record<string, unknown>) => {
      const cmd = m.command as { commandId: number; kind: string } | undefined;
      if (!cmd) return;
      commands.push(cmd.kind);
      sb.call.write({ result: { commandId: cmd.commandId, ok: cmd.kind !== 'PROMOTE', error: cmd.kind === 'PROMOTE' ? 'refused by the test' : '' } });
    });
    await until('vm2 READY', async () => {
      const st = await unaryCall<{ processes: { peers: { instanceId: string; ready: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
      return st.processes[0].peers.find((p) => p.instanceId === 'bgp@vm2')?.ready;
    });
    await assert.rejects(
      unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' }),
      (e: grpc.ServiceError) => e.code === grpc.status.FAILED_PRECONDITION && /refused PROMOTE: refused by the test/.test(e.details),
    );
    const st = await unaryCall<{ processes: { peers: { instanceId: string; role: string; frozen: boolean }[] }[] }>(c, 'Status', { process: 'bgp' });
    const peers = Object.fromEntries(st.processes[0].peers.map((p) => [p.instanceId, p]));
    assert.equal(peers['bgp@vm1'].role, 'ACTIVE');
    assert.equal(peers['bgp@vm1'].frozen, false);
    assert.equal(peers['bgp@vm2'].role, 'STANDBY');
    // The refusing standby is told it is a standby, and the old active writes again.
    await until('vm2 got DEMOTE', async () => commands.includes('DEMOTE'));
    const n = v1.events.length;
    v1.send('load 500');
    const loaded = await v1.waitFor((e) => e.event === 'loaded', 10_000, n);
    assert.equal(loaded.records, 500);
    assert.equal((await v1.digest()).seq, loaded.seq);
    sub.cancel();
    sb.call.end();
    c.close();
  });
});

/**
 * A client interceptor that writes what each call does into `log`, in order: "start M#n",
 * "write M#n", "cancel M#n", "status M#n CODE", plus the role commands a Session receives
 * ("command KIND") and the answers it sends ("result KIND ok|refused").
 */
function callRecorder(log: string[]): grpc.Interceptor {
  let n = 0;
  const kinds = new Map<number, string>();
  return (options, nextCall) => {
    const method = options.method_definition.path.split('/').pop()!;
    const id = `${method}#${++n}`;
    log.push(`start ${id}`);
    return new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        next(metadata, {
          onReceiveMessage(msg: { command?: { commandId: number; kind: string } }, nextMsg) {
            if (method === 'Session' && msg?.command) {
              kinds.set(Number(msg.command.commandId), msg.command.kind);
              log.push(`command ${msg.command.kind}`);
            }
            nextMsg(msg);
          },
          onReceiveStatus(status, nextStatus) {
            log.push(`status ${id} ${grpc.status[status.code]}`);
            nextStatus(status);
          },
        });
      },
      sendMessage(msg: { result?: { commandId: number; ok: boolean }; write?: unknown; subscribe?: unknown }, next) {
        if (method === 'Session' && msg?.result) log.push(`result ${kinds.get(Number(msg.result.commandId))} ${msg.result.ok ? 'ok' : 'refused'}`);
        if (method === 'OpenChannel') log.push(`open ${msg.write ? 'write' : 'subscribe'} channel ${id}`);
        if (method === 'WriteStream') log.push(`write ${id}`);
        next(msg);
      },
      cancel(next) {
        log.push(`cancel ${id}`);
        next();
      },
    });
  };
}
