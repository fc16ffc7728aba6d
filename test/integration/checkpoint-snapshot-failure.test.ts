/**
 * A bulk snapshot that cannot be loaded (its connection to the agent's bulk socket breaks): a
 * standby subscribes again and ends up holding everything; an active recovering its tables does
 * not start writing on a partial table. Real agent, real SDK clients, real sockets; the break is
 * a TCP relay in front of the bulk socket that drops the first connection it accepts, as a
 * guest's relay does when it restarts. And a snapshot whose bytes the relay passes on in pieces
 * of 1 byte to 64 KiB loads exactly.
 */
import assert from 'node:assert/strict';
import type { AuditResponse } from '../../agent/checkpoint/messages';
import type { AgentHandle } from '../../harness/agent-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';
import { TcpRelay } from '../../harness/tcp-relay';
import { until } from '../../harness/wait';
import { agentAndBulkRelay, bgpClient, closedAfterEach, writeBatches, writeBigBatches } from '../helpers/bgp-checkpoint';

describe('checkpoint: a bulk snapshot whose connection breaks', function () {
  this.timeout(60_000);
  const { open, relays } = closedAfterEach();

  /** An agent, and a relay to its bulk socket that drops the first connection. */
  async function agentAndRelay(): Promise<[AgentHandle, TcpRelay]> {
    const [agent, relay] = await agentAndBulkRelay({ drop: 1 });
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

describe('checkpoint: a bulk snapshot that arrives in pieces of every size', function () {
  this.timeout(60_000);
  const { open, relays } = closedAfterEach();

  it('a standby loads it exactly, frame headers cut anywhere included', async () => {
    // Bytes from the agent reach the standby in writes of 1 to 65,537 bytes: its snapshot's
    // 8-byte frame headers and its frames are cut at many offsets, and so are the frames of its
    // subscribe channel (the relay carries every bulk-socket connection).
    const [agent, relay] = await agentAndBulkRelay({ pieces: [1, 2, 9, 4093, 7, 30_000, 3, 8, 65_537, 5] });
    relays.push(relay);
    const a = bgpClient(agent, 'vm1', 'ACTIVE');
    open.push(a);
    await a.start();
    // 1.5 MB of records: two snapshot frames (of at most 1 MiB each).
    await writeBigBatches(a, 1, 15);
    const b = bgpClient(agent, 'vm2', 'STANDBY', { bulkAddress: relay.address });
    open.push(b);
    const errors: Error[] = [];
    b.on('error', (e: Error) => errors.push(e));
    const snapshots: number[] = [];
    b.on('snapshot', (_t: string, seq: number, records: number) => snapshots.push(seq, records));
    await b.start();
    await until('the standby loaded the snapshot', () => b.table('rib').seq === 15);
    assert.deepEqual(snapshots, [15, 15_000], 'loaded from one bulk snapshot');
    assert.deepEqual(errors, []);
    assert.deepEqual(b.digest('rib'), a.digest('rib'));
    // And it follows on its subscribe channel, cut the same way.
    await writeBatches(a, 16, 18);
    await until('the standby applied the later changes', () => b.table('rib').seq === 18);
    assert.deepEqual(b.digest('rib'), a.digest('rib'));
  });

  it('an audit right after an active restarts compares the table it reloads, not the empty one it started with', async () => {
    // Every bulk-socket connection (its frame channels, the snapshot) is relayed 300 ms late, as
    // by a slow guest: the audit's REPORT reaches the process before the reload's first event.
    const [agent, relay] = await agentAndBulkRelay({ delayMs: 300 });
    relays.push(relay);
    const first = bgpClient(agent, 'vm1', 'ACTIVE');
    open.push(first);
    await first.start();
    await writeBigBatches(first, 1, 15);
    const digest = first.digest('rib');
    await first.close();
    open.splice(open.indexOf(first), 1);

    // The process restarts with nothing and reloads 15,000 records through the relay; the audit
    // is asked for as soon as it is registered, while it is still reloading. On frame channels
    // its reload's subscription is late too, not only the snapshot.
    const again = bgpClient(agent, 'vm1', 'ACTIVE', { bulkAddress: relay.address, channels: 'frames' });
    open.push(again);
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    try {
      const audit = new Promise<AuditResponse>((resolve, reject) =>
        again.once('registered', () => unaryCall<AuditResponse>(c, 'Audit', { process: 'bgp' }).then(resolve, reject)),
      );
      await again.start();
      const r = await audit;
      assert.ok(r.consistent, r.detail);
      const rib = r.peers[0].digests.find((d) => d.table === 'rib')!;
      assert.deepEqual([rib.seq, rib.records, rib.sha256], [15, 15_000, digest.sha256]);
    } finally {
      c.close();
    }
  });
});
