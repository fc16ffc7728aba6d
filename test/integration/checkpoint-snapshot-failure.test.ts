/**
 * A bulk snapshot that cannot be loaded (its connection to the agent's bulk socket breaks): a
 * standby subscribes again and ends up holding everything; an active recovering its tables does
 * not start writing on a partial table; a running active that is behind the agent (another
 * instance wrote while it was cut off) reloads what it lacks, and registers again until it can. Real agent, real SDK clients, real sockets; the break is a TCP relay in
 * front of the bulk socket that drops the first connection it accepts, as a guest's relay does
 * when it restarts.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { CheckpointClient, CheckpointClientOptions } from '../../agent/sdk/checkpoint-client';
import type { StatusResponse } from '../../agent/checkpoint/messages';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';
import { TcpRelay, tcpRelay } from '../../harness/tcp-relay';
import { until } from '../../harness/wait';

/** A client of process 'bgp' (one SYNC table 'rib'); `channels: 'grpc'` so the bulk socket carries only snapshots. */
function client(
  agent: AgentHandle,
  instance: 'vm1' | 'vm2' | 'vm3',
  role: 'ACTIVE' | 'STANDBY',
  extra: Partial<CheckpointClientOptions> = {},
): CheckpointClient {
  return new CheckpointClient({
    address: agent.socket,
    process: 'bgp',
    instanceId: `bgp@${instance}`,
    vmId: instance,
    role,
    softwareVersion: '1.0.0',
    schema: 1,
    tables: [{ name: 'rib', durability: 'SYNC' }],
    channels: 'grpc',
    ...extra,
  });
}

async function writeBatches(c: CheckpointClient, from: number, to: number): Promise<void> {
  for (let i = from; i <= to; i++) {
    const b = c.batch('rib');
    for (let j = 0; j < 10; j++) b.put(`10.${i}.${j}.0/24`, Buffer.from(`nh-${i}-${j}`));
    assert.equal(await b.commit(), i);
  }
}

describe('checkpoint: a bulk snapshot whose connection breaks', function () {
  this.timeout(60_000);
  const open: CheckpointClient[] = [];
  const relays: TcpRelay[] = [];

  afterEach(async () => {
    for (const c of open.splice(0)) await c.close();
    for (const r of relays.splice(0)) r.close();
    await stopAllAgents();
  });

  /** An agent, and a relay to its bulk socket that drops the first connection. */
  async function agentAndBreakingRelay(): Promise<[AgentHandle, TcpRelay]> {
    const agent = await startAgent();
    const relay = await tcpRelay(() => net.connect(`${agent.socket}.bulk`), { drop: 1 });
    relays.push(relay);
    return [agent, relay];
  }

  it('a standby subscribes again and then holds every change', async () => {
    const [agent, relay] = await agentAndBreakingRelay();
    const a = client(agent, 'vm1', 'ACTIVE');
    open.push(a);
    await a.start();
    // Records in the table before the standby comes: it starts from a bulk snapshot.
    await writeBatches(a, 1, 3);
    const b = client(agent, 'vm2', 'STANDBY', { bulkAddress: relay.address });
    open.push(b);
    const errors: Error[] = [];
    b.on('error', (e: Error) => errors.push(e));
    await b.start();
    await until('the standby loaded the snapshot on a second subscription', () => b.table('rib').seq === 3);
    assert.equal(relay.accepted(), 2, 'one snapshot connection dropped, one served');
    assert.equal(errors.length, 1, `one error reported: ${errors.map((e) => e.message).join('; ')}`);
    assert.match(errors[0].message, /bulk snapshot/);
    // It follows: later changes reach it, and it holds what the active holds.
    await writeBatches(a, 4, 5);
    await until('the standby applied the later changes', () => b.table('rib').seq === 5);
    assert.deepEqual(b.digest('rib'), a.digest('rib'));
    assert.equal(b.table('rib').records.size, 50);
  });

  it('an active recovering its table fails to start instead of writing on a partial table', async () => {
    const [agent, relay] = await agentAndBreakingRelay();
    const first = client(agent, 'vm1', 'ACTIVE');
    open.push(first);
    await first.start();
    await writeBatches(first, 1, 3);
    const digest = first.digest('rib');
    await first.close();
    open.splice(open.indexOf(first), 1);

    // The same instance comes back with nothing (a restarted process): it must recover the table
    // from the agent before writing, and that snapshot's connection breaks.
    const again = client(agent, 'vm1', 'ACTIVE', { bulkAddress: relay.address });
    open.push(again);
    await assert.rejects(again.start(), /bulk snapshot/);
    assert.equal(relay.accepted(), 1);
    await again.close();
    open.splice(open.indexOf(again), 1);

    // Nothing acknowledged was lost: the next start recovers the whole table and writes on.
    const third = client(agent, 'vm1', 'ACTIVE', { bulkAddress: relay.address });
    open.push(third);
    await third.start();
    assert.equal(third.table('rib').seq, 3);
    assert.deepEqual(third.digest('rib'), digest);
    await writeBatches(third, 4, 4);
  });

  /**
   * An active reaching the agent through a relay that can be cut (a partition of its VM), and a
   * bulk socket relay that drops its first connection.
   */
  async function activeBehindRelays(): Promise<{ agent: AgentHandle; first: CheckpointClient; link: TcpRelay; bulkRelay: TcpRelay; errors: Error[] }> {
    const [agent, bulkRelay] = await agentAndBreakingRelay();
    const link = await tcpRelay(() => net.connect(agent.socket));
    relays.push(link);
    const first = client(agent, 'vm1', 'ACTIVE', { address: link.address, bulkAddress: bulkRelay.address });
    open.push(first);
    const errors: Error[] = [];
    first.on('error', (e: Error) => errors.push(e));
    await first.start();
    return { agent, first, link, bulkRelay, errors };
  }

  /**
   * Cuts `link`: the agent ends the session behind it, and another instance takes the active role
   * and writes batches `from`..`to`. The instance cut off, still running, is then behind the agent.
   * Returns the table's digest as the other instance left it.
   */
  async function writeWhileCutOff(agent: AgentHandle, link: TcpRelay, from: number, to: number): Promise<ReturnType<CheckpointClient['digest']>> {
    link.cut();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    try {
      const peers = async () => (await unaryCall<StatusResponse>(c, 'Status', { process: 'bgp' })).processes[0]?.peers ?? [];
      await until('the agent ended the session of the instance cut off', async () => (await peers()).every((p) => p.instanceId !== 'bgp@vm1'));
    } finally {
      c.close();
    }
    const other = client(agent, 'vm3', 'ACTIVE');
    open.push(other);
    await other.start();
    await writeBatches(other, from, to);
    const digest = other.digest('rib');
    await other.close();
    open.splice(open.indexOf(other), 1);
    return digest;
  }

  it('a running active that is behind loads the batches it lacks from the log before it writes again', async () => {
    const { agent, first, link, bulkRelay, errors } = await activeBehindRelays();
    await writeBatches(first, 1, 3);
    const digest = await writeWhileCutOff(agent, link, 4, 5);
    link.heal();
    await until('the first active loaded batches 4 and 5', () => first.table('rib').seq === 5);
    assert.deepEqual(first.digest('rib'), digest);
    assert.equal(bulkRelay.accepted(), 0, 'from the log: no snapshot');
    await writeBatches(first, 6, 7);
    assert.equal(first.table('rib').records.size, 70);
    assert.deepEqual(errors, []);
  });

  it('a running active that must reload its table, and cannot, registers again until it can', async () => {
    // It holds nothing of the table, so it reloads it from a bulk snapshot, whose first connection breaks.
    const { agent, first, link, bulkRelay, errors } = await activeBehindRelays();
    const digest = await writeWhileCutOff(agent, link, 1, 2);
    link.heal();
    await until('the first active loaded the table on a second registration', () => first.table('rib').seq === 2);
    assert.deepEqual(first.digest('rib'), digest);
    assert.equal(bulkRelay.accepted(), 2, 'one snapshot connection dropped, one served');
    assert.equal(errors.length, 1, `one error reported: ${errors.map((e) => e.message).join('; ')}`);
    assert.match(errors[0].message, /bulk snapshot/);
    await writeBatches(first, 3, 4);
    assert.equal(first.table('rib').records.size, 40);
  });
  // Overtaken while cut off: the other instance wrote more batches than this one kept
  // unacknowledged (the agent is ahead of it), or fewer (the agent's sequence alone does not show
  // it; the store must tell who wrote last, also after the agent restarted).
  for (const [otherWrites, restart, ahead] of [
    [3, false, 'the agent is ahead of it'],
    [1, false, 'the agent is not ahead of it'],
    [1, true, 'the agent is not ahead of it, and restarted meanwhile'],
  ] as const) {
    it(`a running active overtaken while it was cut off rejects what it wrote meanwhile and reloads the table (${ahead})`, async () => {
      const setup = await activeBehindRelays();
      const { first, link, bulkRelay, errors } = setup;
      let agent = setup.agent;
      await writeBatches(first, 1, 3);
      // Cut off, it goes on writing: batches 4 and 5 of its own, which the agent never receives.
      link.cut();
      const cutOffWrites = [4, 5].map((i) => {
        const b = first.batch('rib');
        b.put(`10.99.${i}.0/24`, Buffer.from('written while cut off'));
        const p = b.commit();
        p.catch(() => undefined); // asserted below
        return p;
      });
      const last = 3 + otherWrites;
      const digest = await writeWhileCutOff(agent, link, 4, last);
      if (restart) {
        // On the same state directory: the same socket paths the relays forward to.
        await agent.kill9();
        agent = await startAgent({ stateDir: agent.stateDir });
      }
      link.heal();
      // The agent's batches from 4 on are the other instance's: this one's are rejected, not
      // acknowledged as those, nor stored after them.
      for (const p of cutOffWrites) {
        await assert.rejects(p, new RegExp(`another instance wrote table 'rib' \\(to batch ${last}\\) while this one was cut off .*write the change again`));
      }
      // It reloads the whole table (it held batches the agent does not have); the first snapshot
      // connection breaks, and the reload after registering again must not resume from batch 5.
      await until('the first active reloaded the table', () => first.table('rib').seq === last && bulkRelay.accepted() === 2);
      assert.deepEqual(first.digest('rib'), digest);
      assert.equal(first.table('rib').get('10.99.4.0/24'), undefined);
      assert.equal(errors.length, 1, `one error reported: ${errors.map((e) => e.message).join('; ')}`);
      await writeBatches(first, last + 1, last + 2);
      assert.equal(first.table('rib').records.size, (last + 2) * 10);
      // And the agent holds what the active holds.
      const c = rawClient('hitless.v1.Checkpoint', agent.socket);
      try {
        const status = await unaryCall<StatusResponse>(c, 'Status', { process: 'bgp' });
        assert.equal(status.processes[0].tables[0].seq, last + 2);
      } finally {
        c.close();
      }
    });
  }
});
