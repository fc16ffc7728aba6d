/**
 * An agent or a process killed in the middle of an upgrade: what the agent decided before (which
 * schema the active writes, who holds the role) must not depend on the order in which processes
 * come back, and a process that a process manager restarts must find its place again.
 * Real agent processes (SIGKILL and restart on the same state directory), real gRPC; the order is
 * forced, not left to chance: a process is stopped (SIGSTOP) or its calls held by an interceptor
 * until the other one is registered.
 */
import * as grpc from '@grpc/grpc-js';
import assert from 'node:assert/strict';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import type { AuditResponse, StatusResponse } from '../../agent/checkpoint/messages';
import { AgentHandle, startAgent, stopAllAgents, tempDir } from '../../harness/agent-process';
import { startDaemon, stopAllDaemons } from '../../harness/daemon-process';
import { AnyClient, rawClient, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';

type Peer = StatusResponse['processes'][number]['peers'][number];

describe('checkpoint: restarts in the middle of an upgrade (agent, processes)', function () {
  this.timeout(120_000);
  let agent: AgentHandle;
  let c: AnyClient;
  const peers = async (): Promise<Peer[]> => (await unaryCall<StatusResponse>(c, 'Status', { process: 'bgp' })).processes[0].peers;
  const peer = async (id: string) => (await peers()).find((p) => p.instanceId === id);
  const restartAgent = async () => {
    const stateDir = agent.stateDir;
    await agent.kill9();
    c.close();
    agent = await startAgent({ stateDir });
    c = rawClient('hitless.v1.Checkpoint', agent.socket);
  };

  /** v1 (schema 1) loaded and churning, v2 (schema 2 with transforms) promoted, v1 following it. */
  const switchedOverToV2 = async () => {
    agent = await startAgent({ stateDir: tempDir('restart') });
    c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const v1 = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '5000', '--churn', '2000']);
    await v1.waitFor((e) => e.event === 'loaded');
    const v2 = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby', '--churn', '2000', '--version', '2.0.0', '--schema', '2']);
    await until('v2 READY', async () => (await peer('bgp@vm2'))?.ready);
    await unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' });
    return { v1, v2 };
  };

  afterEach(async () => {
    c?.close();
    await stopAllDaemons();
    await stopAllAgents();
  });

  it('keeps the write schema the old version reads when the new active re-registers first', async () => {
    const { v1 } = await switchedOverToV2();
    assert.equal((await peer('bgp@vm2'))?.schemaWrites, 1, 'v2 writes schema 1 while v1 follows it');

    // The losing order, on purpose: v1 cannot reconnect until v2 registered with the new agent.
    v1.proc.kill('SIGSTOP');
    try {
      await restartAgent();
      const v2back = await until('v2 re-registered as ACTIVE', async () => {
        const p = await peer('bgp@vm2');
        return p?.role === 'ACTIVE' ? p : undefined;
      });
      assert.equal(v2back!.schemaWrites, 1, 'the agreed schema survives the restart: v1 has not re-registered yet, but it still reads only schema 1');
    } finally {
      v1.proc.kill('SIGCONT');
    }
    await until('v1 follows as a READY standby', async () => {
      const p = await peer('bgp@vm1');
      return p?.role === 'STANDBY' && p.ready;
    });
    await new Promise((r) => setTimeout(r, 500)); // v2 churns under the new agent
    const st = await unaryCall<StatusResponse>(c, 'Status', { process: 'bgp' });
    assert.deepEqual(st.processes[0].tables[0].schemas, [1], 'nothing but schema 1 was written before a commit');

    // The abort direction still works: back to v1, every copy equal.
    await unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm1' });
    assert.equal((await peer('bgp@vm1'))?.role, 'ACTIVE');
    const audit = await unaryCall<AuditResponse>(c, 'Audit', { process: 'bgp' });
    assert.ok(audit.consistent, audit.detail);
    assert.equal(audit.peers.length, 2);
  });

  it('when both instances come back believing they are active, the first keeps the role and the other follows it', async () => {
    agent = await startAgent({ stateDir: tempDir('restart') });
    c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const opts = { process: 'bgp', softwareVersion: '1.0.0', schema: 1, tables: [{ name: 'rib', durability: 'ASYNC' as const }] };
    const oldCtl = new CallControl();
    const newCtl = new CallControl();
    const a = new CheckpointClient({
      ...opts,
      address: agent.socket,
      instanceId: 'bgp@vm1',
      vmId: 'vm1',
      role: 'ACTIVE',
      interceptors: [oldCtl.interceptor()],
    });
    const b = new CheckpointClient({
      ...opts,
      address: agent.socket,
      instanceId: 'bgp@vm2',
      vmId: 'vm2',
      role: 'STANDBY',
      interceptors: [newCtl.interceptor()],
      // dropWrites swallows WriteStream messages: this client writes on gRPC, not a frame channel.
      channels: 'grpc',
    });
    try {
      await a.start();
      for (let i = 0; i < 5; i++)
        await a
          .batch('rib')
          .put(`10.0.${i}.0/24`, Buffer.from(`nh${i}`))
          .commit();
      await b.start();
      await until('vm2 READY', async () => (await peer('bgp@vm2'))?.ready);

      // The agent dies between PROMOTE and DEMOTE: the old active never hears that it was
      // demoted and is still frozen; the new one is active and has a batch in flight.
      oldCtl.dropCommands.add('DEMOTE');
      const switching = unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' }).catch((e: grpc.ServiceError) => e);
      await until('vm2 promoted', () => b.role === 'ACTIVE');
      assert.equal(a.role, 'ACTIVE');
      assert.equal(a.frozen, true);
      newCtl.dropWrites = true;
      const unacked = b
        .batch('rib')
        .put('10.99.0.0/16', Buffer.from('never acknowledged'))
        .commit()
        .then(
          () => null,
          (e: Error & { code?: number }) => e,
        );
      await until('the batch is in flight', () => b.inFlight === 1);
      newCtl.holdSessions = true; // vm2 comes back second
      await restartAgent();
      assert.ok((await switching) instanceof Error, 'the switchover RPC failed with the agent');

      await until('vm1 re-registered as ACTIVE', async () => (await peer('bgp@vm1'))?.role === 'ACTIVE');
      assert.equal(a.frozen, false, 'a new session starts unfrozen');
      assert.equal(await a.batch('rib').put('10.1.0.0/16', Buffer.from('after restart')).commit(), 6);

      newCtl.release();
      await until('vm2 follows as a READY standby', async () => {
        const p = await peer('bgp@vm2');
        return p?.role === 'STANDBY' && p.ready;
      });
      assert.equal(b.role, 'STANDBY');
      const refused = await unacked;
      assert.equal(refused?.code, grpc.status.ABORTED, String(refused));
      assert.match(refused!.message, /another instance is active/);
      await until('vm2 holds what vm1 wrote', () => b.table('rib').seq === 6);
      assert.deepEqual(b.digest('rib'), a.digest('rib'));
      assert.equal(b.table('rib').get('10.99.0.0/16'), undefined, 'the change the agent never acknowledged is gone from the standby');
      assert.equal((await peers()).filter((p) => p.role === 'ACTIVE').length, 1);
      const audit = await unaryCall<AuditResponse>(c, 'Audit', { process: 'bgp' });
      assert.ok(audit.consistent, audit.detail);
    } finally {
      newCtl.release();
      await b.close();
      await a.close();
    }
  });

  it('a restarted process takes ACTIVE when nobody holds it, and follows the active when somebody does', async () => {
    const { v1, v2 } = await switchedOverToV2();

    // The new active crashes; its process manager starts it again with the role it first had
    // (standby), as a guest's init does. Nobody holds ACTIVE, so it takes the role back.
    await v2.kill9();
    await until('v2 gone', async () => !(await peer('bgp@vm2')));
    const v2again = startDaemon(
      'bgp-rib',
      ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby', '--churn', '2000', '--version', '2.0.0', '--schema', '2'],
      { HITLESS_RESTARTS: '1' },
    );
    await until('the restarted v2 is ACTIVE', async () => (await peer('bgp@vm2'))?.role === 'ACTIVE');
    assert.equal((await peer('bgp@vm2'))?.schemaWrites, 1, 'and still writes what v1 reads');

    // The standby crashes and comes back asking for ACTIVE: it follows v2 instead.
    await v1.kill9();
    await until('v1 gone', async () => !(await peer('bgp@vm1')));
    startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '5000', '--churn', '2000'], { HITLESS_RESTARTS: '1' });
    await until('the restarted v1 follows as a READY standby', async () => {
      const p = await peer('bgp@vm1');
      return p?.role === 'STANDBY' && p.ready;
    });
    assert.equal((await peers()).filter((p) => p.role === 'ACTIVE').length, 1);
    const seq = (await v2again.digest()).seq as number;
    await until('v2 churns on', async () => ((await v2again.digest()).seq as number) > seq);
    const audit = await unaryCall<AuditResponse>(c, 'Audit', { process: 'bgp' });
    assert.ok(audit.consistent, audit.detail);
  });
});

/**
 * Test-side control of one SDK client's gRPC calls: drop role commands of some kinds (replaced by
 * an empty message, which the SDK ignores), swallow outgoing batches (WriteStream: a client with
 * channels 'grpc'), and hold new Session calls until released.
 */
class CallControl {
  readonly dropCommands = new Set<string>();
  dropWrites = false;
  holdSessions = false;
  private held: (() => void)[] = [];

  release(): void {
    this.holdSessions = false;
    for (const go of this.held.splice(0)) go();
  }

  interceptor(): grpc.Interceptor {
    return (options, nextCall) => {
      const method = options.method_definition.path.split('/').pop()!;
      return new grpc.InterceptingCall(nextCall(options), {
        start: (metadata, listener, next) => {
          const go = () =>
            next(metadata, {
              onReceiveMessage: (msg: { command?: { kind: string } }, nextMsg) => {
                if (method === 'Session' && msg?.command && this.dropCommands.has(msg.command.kind)) return nextMsg({});
                nextMsg(msg);
              },
            });
          if (method === 'Session' && this.holdSessions) this.held.push(go);
          else go();
        },
        sendMessage: (msg, next) => {
          if (method === 'WriteStream' && this.dropWrites) return;
          next(msg);
        },
      });
    };
  }
}
