/**
 * The agent's state database locked by another program (someone running sqlite3 on it, a backup
 * tool holding a transaction open) past the busy timeout: the agent refuses the batches it could
 * not store with UNAVAILABLE naming the database, never with a bare internal error, and loses
 * nothing; the SDK registers again and resends, and every commit resolves once the lock is gone.
 */
import Database from 'better-sqlite3';
import assert from 'node:assert/strict';
import path from 'node:path';
import { CheckpointClient } from '../../agent/sdk/checkpoint-client';
import { startAgent, stopAllAgents } from '../../harness/agent-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';

describe('checkpoint: the state database locked by another program', function () {
  this.timeout(60_000);
  after(stopAllAgents);

  it('refuses what it could not store with UNAVAILABLE naming the database; the SDK resends it and every commit resolves once', async () => {
    const agent = await startAgent();
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const a = new CheckpointClient({
      address: agent.socket,
      process: 'bgp',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [{ name: 'rib', durability: 'ASYNC' }],
      instanceId: 'bgp@vm1',
      vmId: 'vm1',
      role: 'ACTIVE',
    });
    const errors: Error[] = [];
    a.on('error', (e: Error) => errors.push(e));
    let lock: Database.Database | null = null;
    const commit = (i: number) => {
      const batch = a.batch('rib');
      for (let j = 0; j < 20; j++) batch.put(`10.${i}.${j}.0/24`, Buffer.from(`nh-${i}-${j}`));
      return batch.commit();
    };
    try {
      await a.start();
      for (let i = 1; i <= 10; i++) assert.equal(await commit(i), i);
      lock = new Database(path.join(agent.stateDir, 'hitless.db'));
      lock.exec('BEGIN IMMEDIATE');
      const settled: number[] = [];
      const pending = [11, 12, 13, 14, 15].map((i) => commit(i).then((seq) => (settled.push(seq), seq)));
      await until('the agent refused a batch it could not store', () => agent.stderr().includes('stayed locked by another connection'), 20_000);
      const refusal = agent
        .stderr()
        .split('\n')
        .find((l) => l.includes('stayed locked by another connection'))!;
      assert.match(refusal, /"code":"UNAVAILABLE"/);
      assert.ok(
        refusal.includes(`the agent's state database (${path.join(agent.stateDir, 'hitless.db')}) stayed locked by another connection for 5 s`),
        refusal,
      );
      assert.match(refusal, /the writer resends batch 11 of table 'rib' \(the SDK does this by itself\); nothing of this batch was applied/);
      assert.deepEqual(settled, [], 'nothing is acknowledged while the database is locked');
      lock.exec('ROLLBACK');
      lock.close();
      lock = null;
      assert.deepEqual(await Promise.all(pending), [11, 12, 13, 14, 15], 'each commit resolves once, with its own sequence');
      assert.deepEqual(errors, []);
      const st = await unaryCall<{ processes: { tables: { seq: number; records: number }[] }[] }>(c, 'Status', { process: 'bgp' });
      assert.deepEqual({ seq: st.processes[0].tables[0].seq, records: st.processes[0].tables[0].records }, { seq: 15, records: 300 });
    } finally {
      if (lock?.inTransaction) lock.exec('ROLLBACK');
      lock?.close();
      await a.close();
      c.close();
    }
  });
});
