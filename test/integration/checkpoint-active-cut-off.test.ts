/**
 * An active cut off from the agent (a partition of its VM) while another instance took the active
 * role and wrote, and that comes back still running: it reloads what it lacks before it writes
 * (from the log, or the whole table when it holds batches the agent never acknowledged, which it
 * then rejects instead of resending them on top of the other instance's), and when that reload
 * fails it registers again until it can. Real agent, real SDK clients, real sockets: a TCP relay
 * in front of the gRPC socket is cut and healed; one in front of the bulk socket drops its first
 * connection, as a guest's relay does when it restarts.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import type { AuditResponse, StatusResponse } from '../../agent/checkpoint/messages';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import { AgentHandle, startAgent } from '../../harness/agent-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';
import { TcpRelay, tcpRelay } from '../../harness/tcp-relay';
import { until } from '../../harness/wait';
import { agentAndBulkRelay, bgpClient, closedAfterEach, writeBatches } from '../helpers/bgp-checkpoint';

describe('checkpoint: an active cut off from the agent while another instance wrote', function () {
  this.timeout(60_000);
  const { open, relays } = closedAfterEach();

  /**
   * An active reaching the agent through a relay that can be cut (a partition of its VM), and a
   * relay to the bulk socket that counts connections. On gRPC streams that socket carries only
   * snapshots, and the relay drops its first connection; on frame channels (the SDK's default)
   * it carries every stream, and drops nothing.
   */
  async function activeBehindRelays(
    channels: 'grpc' | 'frames' = 'grpc',
  ): Promise<{ agent: AgentHandle; first: CheckpointClient; link: TcpRelay; bulkRelay: TcpRelay; errors: Error[] }> {
    const [agent, bulkRelay] = await agentAndBulkRelay({ drop: channels === 'grpc' ? 1 : 0 });
    relays.push(bulkRelay);
    const link = await tcpRelay(() => net.connect(agent.socket));
    relays.push(link);
    const first = bgpClient(agent, 'vm1', 'ACTIVE', { address: link.address, bulkAddress: bulkRelay.address, channels });
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
    const other = bgpClient(agent, 'vm3', 'ACTIVE');
    open.push(other);
    await other.start();
    await writeBatches(other, from, to);
    const digest = other.digest('rib');
    await other.close();
    open.splice(open.indexOf(other), 1);
    return digest;
  }

  for (const channels of ['grpc', 'frames'] as const) {
    it(`a running active that is behind loads the batches it lacks from the log before it writes again (${channels})`, async () => {
      const { agent, first, link, bulkRelay, errors } = await activeBehindRelays(channels);
      await writeBatches(first, 1, 3);
      const before = bulkRelay.accepted();
      const digest = await writeWhileCutOff(agent, link, 4, 5);
      link.heal();
      await until('the first active loaded batches 4 and 5', () => first.table('rib').seq === 5);
      assert.deepEqual(first.digest('rib'), digest);
      await writeBatches(first, 6, 7);
      // Counted once it wrote again: the table is loaded before the write channel opens.
      const opened = bulkRelay.accepted() - before;
      if (channels === 'grpc') assert.equal(opened, 0, 'from the log: no snapshot');
      else assert.ok(opened >= 2, `a recovery channel and a new write channel (${opened} connections)`);
      assert.equal(first.table('rib').records.size, 70);
      assert.deepEqual(errors, []);
    });
  }

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
      // And the agent holds what the active holds (an audit compares their digests).
      const c = rawClient('hitless.v1.Checkpoint', agent.socket);
      try {
        const audit = await unaryCall<AuditResponse>(c, 'Audit', { process: 'bgp' });
        assert.ok(audit.consistent, audit.detail);
        assert.deepEqual(
          audit.agent.map((d) => [d.table, d.seq, d.records]),
          [['rib', last + 2, (last + 2) * 10]],
        );
      } finally {
        c.close();
      }
    });
  }
});
