/**
 * A bulk snapshot that cannot be loaded (its connection to the agent's bulk socket breaks): a
 * standby subscribes again and ends up holding everything; an active recovering its tables does
 * not start writing on a partial table. Real agent, real SDK clients, real sockets; the break is
 * a TCP relay in front of the bulk socket that drops the first connection it accepts, as a
 * guest's relay does when it restarts.
 */
import assert from 'node:assert/strict';
import type { AgentHandle } from '../../harness/agent-process';
import { TcpRelay } from '../../harness/tcp-relay';
import { until } from '../../harness/wait';
import { agentAndBulkRelay, bgpClient, closedAfterEach, writeBatches } from '../helpers/bgp-checkpoint';

describe('checkpoint: a bulk snapshot whose connection breaks', function () {
  this.timeout(60_000);
  const { open, relays } = closedAfterEach();

  /** An agent, and a relay to its bulk socket that drops the first connection. */
  async function agentAndRelay(): Promise<[AgentHandle, TcpRelay]> {
    const [agent, relay] = await agentAndBulkRelay(1);
    relays.push(relay);
    return [agent, relay];
  }

  it('a standby subscribes again and then holds every change', async () => {
    const [agent, relay] = await agentAndRelay();
    const a = bgpClient(agent, 'vm1', 'ACTIVE');
    open.push(a);
    await a.start();
    // Records in the table before the standby comes: it starts from a bulk snapshot.
    await writeBatches(a, 1, 3);
    const b = bgpClient(agent, 'vm2', 'STANDBY', { bulkAddress: relay.address });
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
    const [agent, relay] = await agentAndRelay();
    const first = bgpClient(agent, 'vm1', 'ACTIVE');
    open.push(first);
    await first.start();
    await writeBatches(first, 1, 3);
    const digest = first.digest('rib');
    await first.close();
    open.splice(open.indexOf(first), 1);

    // The same instance comes back with nothing (a restarted process): it must recover the table
    // from the agent before writing, and that snapshot's connection breaks.
    const again = bgpClient(agent, 'vm1', 'ACTIVE', { bulkAddress: relay.address });
    open.push(again);
    await assert.rejects(again.start(), /bulk snapshot/);
    assert.equal(relay.accepted(), 1);
    await again.close();
    open.splice(open.indexOf(again), 1);

    // Nothing acknowledged was lost: the next start recovers the whole table and writes on.
    const third = bgpClient(agent, 'vm1', 'ACTIVE', { bulkAddress: relay.address });
    open.push(third);
    await third.start();
    assert.equal(third.table('rib').seq, 3);
    assert.deepEqual(third.digest('rib'), digest);
    await writeBatches(third, 4, 4);
  });
});
