/**
 * Prometheus metrics (text exposition format 0.0.4) on --metrics HOST:PORT, GET /metrics.
 * Gauges are read from the services at scrape time; the gRPC call counter is fed by GrpcServer.
 * Deliberately small: no client library, no histograms.
 */
import http from 'node:http';
import { Logger } from '../common/logger';
import { splitHostPort } from '../grpc/grpc-server';
import type { ProcessStatus } from '../checkpoint/messages';

export interface MetricsSources {
  checkpoint: () => ProcessStatus[];
  upgradePhase: () => { phase: string; id: string } | null;
  vms: () => { name: string; state: string; imageVersion: string | null }[];
}

const PHASES = ['LOADING', 'LOADED', 'SWITCHING', 'SWITCHED', 'ACCEPTED', 'COMMITTING', 'COMMITTED', 'ABORTING', 'ABORTED', 'ROLLED_BACK'];

const esc = (v: string) => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
const labels = (l: Record<string, string>) => {
  const parts = Object.entries(l).map(([k, v]) => `${k}="${esc(v)}"`);
  return parts.length ? `{${parts.join(',')}}` : '';
};

export class Metrics {
  private readonly calls = new Map<string, { method: string; code: string; n: number }>();
  private server: http.Server | null = null;
  address = '';

  constructor(
    private readonly sources: MetricsSources,
    private readonly log: Logger,
  ) {}

  countCall(method: string, code: string): void {
    const k = `${method} ${code}`;
    const e = this.calls.get(k);
    if (e) e.n++;
    else this.calls.set(k, { method, code, n: 1 });
  }

  render(): string {
    const out: string[] = [];
    const family = (name: string, type: 'gauge' | 'counter', help: string, samples: [Record<string, string>, number][]) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [l, v] of samples) out.push(`${name}${labels(l)} ${Number.isFinite(v) ? v : 0}`);
    };
    const procs = this.sources.checkpoint();
    family(
      'hitless_checkpoint_records',
      'gauge',
      'Records held in the agent replica of a checkpoint table.',
      procs.flatMap((p) => p.tables.map((t) => [{ process: p.process, table: t.name }, t.records] as [Record<string, string>, number])),
    );
    family(
      'hitless_checkpoint_bytes',
      'gauge',
      'Bytes (keys and values) held in the agent replica of a checkpoint table.',
      procs.flatMap((p) => p.tables.map((t) => [{ process: p.process, table: t.name }, t.bytes] as [Record<string, string>, number])),
    );
    family(
      'hitless_checkpoint_seq',
      'gauge',
      'Latest sequence number of a checkpoint table.',
      procs.flatMap((p) => p.tables.map((t) => [{ process: p.process, table: t.name }, t.seq] as [Record<string, string>, number])),
    );
    family(
      'hitless_standby_lag_batches',
      'gauge',
      'Batches a standby instance still has to apply.',
      procs.flatMap((p) =>
        p.peers
          .filter((x) => x.role !== 'ACTIVE')
          .map((x) => [{ process: p.process, instance: x.instanceId, vm: x.vmId }, x.lag] as [Record<string, string>, number]),
      ),
    );
    family(
      'hitless_standby_ready',
      'gauge',
      '1 when a standby instance is in sync (READY).',
      procs.flatMap((p) =>
        p.peers
          .filter((x) => x.role !== 'ACTIVE')
          .map((x) => [{ process: p.process, instance: x.instanceId, vm: x.vmId }, x.ready ? 1 : 0] as [Record<string, string>, number]),
      ),
    );
    const up = this.sources.upgradePhase();
    family(
      'hitless_upgrade_phase',
      'gauge',
      'The phase of the current (or last) upgrade: 1 for its phase, 0 for the others; all 0 before the first upgrade.',
      PHASES.map((ph) => [{ phase: ph }, up?.phase === ph ? 1 : 0] as [Record<string, string>, number]),
    );
    family(
      'hitless_vm_state',
      'gauge',
      'VMs the agent manages, 1 for each VM in its current state.',
      this.sources.vms().map((v) => [{ vm: v.name, state: v.state, version: v.imageVersion ?? '' }, 1] as [Record<string, string>, number]),
    );
    family(
      'hitless_grpc_calls_total',
      'counter',
      'Finished gRPC calls by full method and status code.',
      [...this.calls.values()].map((c) => [{ method: c.method, code: c.code }, c.n] as [Record<string, string>, number]),
    );
    return out.join('\n') + '\n';
  }

  async listen(hostPort: string): Promise<string> {
    const { host, port } = splitHostPort(hostPort);
    const server = http.createServer((req, res) => {
      if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
        return;
      }
      let body: string;
      try {
        body = this.render();
      } catch (e) {
        this.log.error({ err: (e as Error).message }, 'rendering metrics failed');
        res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${(e as Error).message}\n`);
        return;
      }
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' }).end(body);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    this.server = server;
    const a = server.address() as { address: string; port: number };
    this.address = a.address.includes(':') ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
    this.log.info({ address: this.address }, 'metrics listening');
    return this.address;
  }

  async close(): Promise<void> {
    const s = this.server;
    this.server = null;
    if (!s) return;
    s.closeAllConnections?.();
    await new Promise<void>((r) => s.close(() => r()));
  }
}
