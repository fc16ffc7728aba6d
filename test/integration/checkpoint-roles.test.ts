/**
 * Acknowledgement semantics (SYNC vs ASYNC) and agent-driven role changes (switchover: freeze,
 * drain, promote, demote, unfreeze), with real processes and real gRPC.
 */
import * as grpc from '@grpc/grpc-js';
import assert from 'node:assert/strict';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import { startAgent, stopAllAgents } from '../helpers/agent-process';
import { startDaemon, stopAllDaemons } from '../helpers/daemon-process';
import { rawClient, registerRaw, unaryCall } from '../helpers/grpc-client';
import { until } from '../helpers/wait';

describe('checkpoint: SYNC and ASYNC acknowledgements', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('acknowledges ASYNC once the agent applied it, SYNC only after the in-sync standby applied it', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const active = new CheckpointClient({
      address: agent.socket, process: 'bgp', instanceId: 'bgp@vm1', vmId: 'vm1', softwareVersion: '1.0.0', schema: 1,
      tables: [{ name: 'async', durability: 'ASYNC' }, { name: 'sync', durability: 'SYNC' }], role: 'ACTIVE',
    });
    // The standby is driven by hand so the test decides when it acknowledges.
    const sb = await registerRaw(c, { process: 'bgp', instanceId: 'bgp@vm2', vmId: 'vm2', softwareVersion: '1.0.0', schemaWrites: 1, schemaReads: [1], wantedRole: 'STANDBY', tables: [] });
    const order: string[] = [];
    try {
      await active.start();
      const sub = (c.Subscribe as (r: unknown) => grpc.ClientReadableStream<{ change?: { table: string; seq: number } }>).call(c, { sessionId: sb.registered.sessionId, have: {}, mode: 'FOLLOW' });
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
      const a = active.batch('async').put('k', Buffer.from('v')).commit().then((s) => order.push(`async acked ${s}`));
      await a;
      await until('standby received async/1', () => received.some((r) => r.table === 'async'));

      // SYNC: not acknowledged while the standby holds it unacknowledged.
      let syncAcked = false;
      const s = active.batch('sync').put('k', Buffer.from('v')).commit().then((q) => {
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
    const active = new CheckpointClient({ address: agent.socket, process: 'bgp', instanceId: 'bgp@vm1', vmId: 'vm1', softwareVersion: '1.0.0', schema: 1, tables: [{ name: 'sync', durability: 'SYNC' }], role: 'ACTIVE' });
    const sb = await registerRaw(c, { process: 'bgp', instanceId: 'bgp@vm2', vmId: 'vm2', softwareVersion: '1.0.0', schemaWrites: 1, schemaReads: [1], wantedRole: 'STANDBY', tables: [] });
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

  it('refuses to switch to a standby that is not READY, and leaves the active in charge', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const v1 = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '1000']);
    await v1.waitFor((e) => e.event === 'loaded');
    const sb = await registerRaw(c, { process: 'bgp', instanceId: 'bgp@vm2', vmId: 'vm2', softwareVersion: '1.0.0', schemaWrites: 1, schemaReads: [1], wantedRole: 'STANDBY', tables: [] });
    await assert.rejects(unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' }), (e: grpc.ServiceError) => e.code === grpc.status.FAILED_PRECONDITION && /not READY/.test(e.details));
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
    const sb = await registerRaw(c, { process: 'bgp', instanceId: 'bgp@vm2', vmId: 'vm2', softwareVersion: '1.0.0', schemaWrites: 1, schemaReads: [1], wantedRole: 'STANDBY', tables: [{ name: 'rib', durability: 'ASYNC' }] });
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
