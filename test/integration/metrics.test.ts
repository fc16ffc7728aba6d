/**
 * --metrics: the Prometheus endpoint reports the checkpoint tables (records, bytes), upgrade
 * phase, VMs and gRPC calls, read at scrape time; histograms of what happened; and every metric
 * the Grafana dashboard in deploy/grafana/ queries.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Metrics } from '../../agent/metrics/metrics';
import { silentLogger } from '../../agent/common/logger';
import { until } from '../../harness/wait';
import { scrapeMetrics, startAgent, stopAllAgents } from '../../harness/agent-process';
import { startDaemon, stopAllDaemons } from '../../harness/daemon-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';

const declared = (body: string, family: string) => body.includes(`# TYPE ${family} `);

const sample = (body: string, name: string, labels: string): number | undefined => {
  const line = body.split('\n').find((l) => l.startsWith(`${name}{${labels}} `));
  return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(' ') + 1));
};

describe('metrics: Prometheus endpoint', function () {
  this.timeout(120_000);
  afterEach(async () => {
    await stopAllDaemons();
    await stopAllAgents();
  });

  it('is off unless --metrics is given, and reports per-table records after checkpoint writes', async () => {
    const off = await startAgent();
    assert.equal(off.ready.metrics, null);
    await off.stop();

    const agent = await startAgent({ args: ['--metrics', '127.0.0.1:0'] });
    const address = agent.ready.metrics as string;
    assert.match(address, /^127\.0\.0\.1:\d+$/);
    const active = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '3000']);
    await active.waitFor((e) => e.event === 'loaded');
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const st = await unaryCall<{ processes: { tables: { name: string; records: number; bytes: number }[] }[] }>(c, 'Status', { process: 'bgp' });
    c.close();
    const rib = st.processes[0].tables.find((t) => t.name === 'rib')!;
    assert.equal(rib.records, 3000);
    const body = await scrapeMetrics(address);
    assert.match(body, /# TYPE hitless_checkpoint_records gauge/);
    assert.equal(sample(body, 'hitless_checkpoint_records', 'process="bgp",table="rib"'), 3000);
    assert.equal(sample(body, 'hitless_checkpoint_bytes', 'process="bgp",table="rib"'), rib.bytes);
    assert.ok(rib.bytes > 0);
    assert.equal(sample(body, 'hitless_upgrade_phase', 'phase="COMMITTED"'), 0, 'no upgrade yet');
    assert.ok((sample(body, 'hitless_grpc_calls_total', 'method="/hitless.v1.Checkpoint/Status",code="OK"') ?? 0) >= 1, 'the Status call is counted');
    // The daemon's batches went on a frame channel: its end is counted with the calls.
    await active.stop();
    await until(
      'the ended write channel is counted',
      async () => (sample(await scrapeMetrics(address), 'hitless_grpc_calls_total', 'method="/hitless.v1.Checkpoint/OpenChannel/write",code="OK"') ?? 0) >= 1,
    );
  });

  it('has every metric the Grafana dashboard queries in a real scrape after a small workload', async () => {
    const dashboard = JSON.parse(fs.readFileSync(path.resolve(__dirname, '../../../deploy/grafana/hitless-dashboard.json'), 'utf8')) as {
      panels: { title: string; targets: { expr: string }[] }[];
    };
    const exprs = dashboard.panels.flatMap((p) => p.targets.map((t) => t.expr));
    const named = [...new Set(exprs.flatMap((e) => e.match(/\b(?:hitless|nodejs|process)_[a-z0-9_]+/g) ?? []))];
    assert.ok(named.length >= 15, `the dashboard names ${named.length} metrics`);

    // The workload: an active writing a SYNC table with churn, a standby that gets a bulk
    // snapshot and follows, a switchover, a few unary calls.
    const agent = await startAgent({ args: ['--metrics', '127.0.0.1:0'] });
    const address = agent.ready.metrics as string;
    const active = startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm1', '--records', '2000', '--churn', '500', '--sync']);
    await active.waitFor((e) => e.event === 'loaded');
    startDaemon('bgp-rib', ['--agent', agent.socket, '--vm', 'vm2', '--role', 'standby', '--sync']);
    const c = rawClient('hitless.v1.Checkpoint', agent.socket);
    type St = { processes: { peers: { instanceId: string; ready: boolean }[] }[] };
    await until(
      'the standby is READY',
      async () => (await unaryCall<St>(c, 'Status', { process: 'bgp' })).processes[0]?.peers.find((p) => p.instanceId === 'bgp@vm2')?.ready,
    );
    await unaryCall(c, 'Switchover', { process: 'bgp', toInstanceId: 'bgp@vm2' });
    await unaryCall(c, 'Status', { process: 'nothing' }).catch(() => undefined); // an error for the error panel
    c.close();
    const body = await scrapeMetrics(address);

    // Families with a sample after this workload; the VM and upgrade-duration families need VMs
    // and an upgrade (the VM tests), here they must at least be declared.
    const declaredOnly = new Set(['hitless_vm_state', 'hitless_upgrade_phase_duration_seconds']);
    const family = (name: string) => name.replace(/_(bucket|sum|count)$/, '');
    for (const name of named) {
      const f = declared(body, name) ? name : family(name);
      assert.ok(declared(body, f), `the scrape declares ${f} (dashboard query: ${exprs.find((e) => e.includes(name))})`);
      if (declaredOnly.has(f)) continue;
      assert.ok(
        body.split('\n').some((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `)),
        `the scrape has samples of ${name}`,
      );
    }
    assert.ok((sample(body, 'hitless_switchover_freeze_seconds_count', 'process="bgp"') ?? 0) === 1, 'one switchover, one freeze window');
    assert.ok((sample(body, 'hitless_checkpoint_sync_ack_seconds_count', 'process="bgp",table="rib"') ?? 0) > 0);
    assert.ok((sample(body, 'hitless_bulk_snapshot_records_total', 'process="bgp",table="rib"') ?? 0) >= 2000);
    assert.ok((sample(body, 'hitless_grpc_call_duration_seconds_count', 'method="/hitless.v1.Checkpoint/Switchover",code="OK"') ?? 0) === 1);
  });

  it('times each upgrade phase when the upgrade leaves it', async () => {
    const m = new Metrics({ checkpoint: () => [], upgradePhase: () => null, vms: () => [] }, silentLogger);
    const ev = (phase: string, at: number) => m.upgradeEvent({ type: 'PHASE', upgradeId: 'u1', phase, at });
    ev('LOADING', 1_000);
    ev('LOADED', 31_000);
    m.upgradeEvent({ type: 'PROGRESS', upgradeId: 'u1', phase: 'LOADED', at: 35_000 });
    ev('SWITCHING', 40_000);
    ev('SWITCHED', 40_500);
    ev('COMMITTED', 50_500);
    const body = await m.render();
    assert.equal(sample(body, 'hitless_upgrade_phase_duration_seconds_sum', 'phase="LOADING"'), 30);
    assert.equal(sample(body, 'hitless_upgrade_phase_duration_seconds_sum', 'phase="LOADED"'), 9);
    assert.equal(sample(body, 'hitless_upgrade_phase_duration_seconds_sum', 'phase="SWITCHING"'), 0.5);
    assert.equal(sample(body, 'hitless_upgrade_phase_duration_seconds_sum', 'phase="SWITCHED"'), 10);
    assert.equal(sample(body, 'hitless_upgrade_phase_duration_seconds_count', 'phase="COMMITTED"'), undefined, 'a final phase is not left');
  });
});
