/**
 * Checkpoint replication between real OS processes: hitlessd plus example daemons (active and
 * standby) on a unix socket, with the active churning its table throughout.
 */
import assert from 'node:assert/strict';
import { startAgent, stopAllAgents, AgentHandle } from '../../harness/agent-process';
import { startDaemon, stopAllDaemons, DaemonHandle } from '../../harness/daemon-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';

interface StatusResp {
  processes: {
    process: string;
    tables: { name: string; seq: number; records: number }[];
    peers: { instanceId: string; role: string; ready: boolean; lag: number }[];
  }[];
}

async function agentStatus(agent: AgentHandle, process = 'bgp'): Promise<StatusResp['processes'][0]> {
  const c = rawClient('hitless.v1.Checkpoint', agent.socket);
  try {
    const r = await unaryCall<StatusResp>(c, 'Status', { process });
    return r.processes[0];
  } finally {
    c.close();
  }
}

/** Stops the active's churn, waits until everything it wrote is acknowledged, returns its seq. */
async function quiesce(active: DaemonHandle): Promise<number> {
  const n = active.events.length;
  active.send('stop');
  const e = await active.waitFor((x) => x.event === 'stopped', 60_000, n);
  return e.seq as number;
}

async function standbyAt(standby: DaemonHandle, seq: number): Promise<void> {
  await until(`standby at seq ${seq}`, async () => (await standby.digest()).seq === seq, 60_000, 50);
}

describe('checkpoint: replication between processes', function () {
  this.timeout(180_000);
  afterEach(async () => {
    await stopAllDaemons();
    await stopAllAgents();
  });

  it('bulk snapshot then incremental changes give the standby an exact copy while the active churns', async () => {
    const agent = await startAgent();
    const active = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '60000', '--churn', '20000']);
    await active.waitFor((e) => e.event === 'loaded');
    const standby = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby']);
    const snap = await standby.waitFor((e) => e.event === 'snapshot');
    assert.ok((snap.records as number) >= 60000, 'the snapshot carried the loaded table');
    await until('standby READY at the agent', async () => (await agentStatus(agent)).peers.some((p) => p.instanceId === 'bgp@vm2' && p.ready));
    await new Promise((r) => setTimeout(r, 1000)); // changes keep flowing after the snapshot
    const seq = await quiesce(active);
    assert.ok(seq > 60, `churn produced batches after the load (seq ${seq})`);
    await standbyAt(standby, seq);
    const [a, s] = [await active.digest(), await standby.digest()];
    assert.equal(s.sha256, a.sha256);
    assert.equal(s.records, a.records);
    assert.equal(a.failed, 0);
  });

  it('a standby killed in the middle of its snapshot and restarted ends with an exact copy', async () => {
    const agent = await startAgent();
    const active = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '300000', '--churn', '5000']);
    await active.waitFor((e) => e.event === 'loaded');
    const first = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby']);
    await first.waitFor((e) => e.event === 'snapshot-begin');
    await first.kill9();
    await until('the agent forgot the killed standby', async () => !(await agentStatus(agent)).peers.some((p) => p.instanceId === 'bgp@vm2'));
    const second = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby']);
    await second.waitFor((e) => e.event === 'snapshot');
    const seq = await quiesce(active);
    await standbyAt(second, seq);
    assert.equal((await second.digest()).sha256, (await active.digest()).sha256);
  });

  it('an active killed and restarted recovers every acknowledged change from the agent', async () => {
    const agent = await startAgent();
    const active = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '50000', '--churn', '20000']);
    await active.waitFor((e) => e.event === 'loaded');
    await new Promise((r) => setTimeout(r, 500));
    const seq = await quiesce(active);
    const before = await active.digest();
    await active.kill9();
    await until('the agent has no active', async () => !(await agentStatus(agent)).peers.some((p) => p.role === 'ACTIVE'));
    const restarted = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1']);
    const started = await restarted.waitFor((e) => e.event === 'started');
    assert.equal(started.role, 'ACTIVE');
    assert.equal(started.seq, seq, 'recovered up to the last acknowledged batch');
    const after = await restarted.digest();
    assert.equal(after.sha256, before.sha256);
    assert.equal(after.records, before.records);
    // It keeps writing from there: the next batch continues the sequence.
    restarted.send('churn 5000');
    await new Promise((r) => setTimeout(r, 300));
    const seq2 = await quiesce(restarted);
    assert.ok(seq2 > seq);
    assert.equal((await agentStatus(agent)).tables[0].seq, seq2);
  });

  it('after the agent is killed and restarted, clients resync and nothing acknowledged is lost', async () => {
    const agent = await startAgent();
    const active = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '50000', '--churn', '20000']);
    await active.waitFor((e) => e.event === 'loaded');
    const standby = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby']);
    await standby.waitFor((e) => e.event === 'snapshot');
    // Mid-churn, at a moment of its own each run: batches are in flight between the active, the
    // agent's event loop and its store's writer thread, in varying proportions.
    const killAfterMs = 50 + Math.floor(Math.random() * 1450);
    await new Promise((r) => setTimeout(r, killAfterMs));
    await agent.kill9();
    await active.waitFor((e) => e.event === 'disconnected');
    await new Promise((r) => setTimeout(r, 300));
    const again = await startAgent({ stateDir: agent.stateDir });
    await until('both clients back', async () => (await agentStatus(again)).peers.length === 2, 30_000, 100);
    await new Promise((r) => setTimeout(r, 500));
    const seq = await quiesce(active);
    await standbyAt(standby, seq);
    const a = await active.digest();
    assert.equal(a.failed, 0, `no write was refused or lost across the restart (agent killed ${killAfterMs} ms into the churn)`);
    assert.equal((await standby.digest()).sha256, a.sha256, `standby equals the active (agent killed ${killAfterMs} ms into the churn)`);
    // A standby joining now is served the agent's recovered table: it must equal the active's.
    const late = startDaemon('bgp-rib', ['--agent', again.socket, '--vm', 'vm3', '--role', 'standby']);
    await standbyAt(late, seq);
    assert.equal((await late.digest()).sha256, a.sha256);
    const st = await agentStatus(again);
    assert.equal(st.tables[0].seq, seq);
    assert.equal(st.tables[0].records, a.records);
  });

  it('the OSPF-like LSDB replicates too', async () => {
    const agent = await startAgent();
    const active = startDaemon('ospf-lsdb', ['--agent', agent.socket, '--vm', 'vm1', '--records', '20000', '--churn', '5000']);
    await active.waitFor((e) => e.event === 'loaded');
    const standby = startDaemon('ospf-lsdb', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby']);
    await standby.waitFor((e) => e.event === 'snapshot');
    await new Promise((r) => setTimeout(r, 300));
    const seq = await quiesce(active);
    await standbyAt(standby, seq);
    assert.equal((await standby.digest()).sha256, (await active.digest()).sha256);
  });
});
