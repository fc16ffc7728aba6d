/**
 * --metrics: the Prometheus endpoint reports the checkpoint tables (records, bytes), upgrade
 * phase, VMs and gRPC calls, read at scrape time.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { startAgent, stopAllAgents } from '../../harness/agent-process';
import { startDaemon, stopAllDaemons } from '../../harness/daemon-process';
import { rawClient, unaryCall } from '../../harness/grpc-client';

function scrape(address: string): Promise<string> {
  return new Promise((resolve, reject) => {
    http
      .get(`http://${address}/metrics`, (res) => {
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`HTTP ${res.statusCode}: ${body}`))));
      })
      .on('error', reject);
  });
}

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
    const body = await scrape(address);
    assert.match(body, /# TYPE hitless_checkpoint_records gauge/);
    assert.equal(sample(body, 'hitless_checkpoint_records', 'process="bgp",table="rib"'), 3000);
    assert.equal(sample(body, 'hitless_checkpoint_bytes', 'process="bgp",table="rib"'), rib.bytes);
    assert.ok(rib.bytes > 0);
    assert.equal(sample(body, 'hitless_upgrade_phase', 'phase="COMMITTED"'), 0, 'no upgrade yet');
    assert.ok((sample(body, 'hitless_grpc_calls_total', 'method="/hitless.v1.Checkpoint/Status",code="OK"') ?? 0) >= 1, 'the Status call is counted');
  });
});
