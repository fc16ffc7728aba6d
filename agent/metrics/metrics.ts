/**
 * Prometheus metrics on --metrics HOST:PORT, GET /metrics, through prom-client with a registry of
 * the agent's own (no global state):
 * - Node process metrics (CPU, memory, event-loop lag, GC, handles), prom-client's defaults;
 * - gauges read from the services at scrape time (tables, standbys, upgrade phase, VMs);
 * - counters and histograms fed as things happen: gRPC calls, SYNC acknowledgements, records
 *   written, switchovers and their freeze windows, bulk snapshots, upgrade phases.
 * Histogram buckets are chosen around the figures measured on this project (README, Benchmark).
 * deploy/grafana/hitless-dashboard.json charts them; a test checks that every metric the
 * dashboard queries is in a real scrape.
 */
import http from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { CheckpointObserver } from '../checkpoint/checkpoint-observer';
import { Logger } from '../common/logger';
import { splitHostPort } from '../grpc/grpc-server';
import type { ProcessStatus } from '../checkpoint/messages';

export interface MetricsSources {
  checkpoint: () => ProcessStatus[];
  upgradePhase: () => { phase: string; id: string } | null;
  vms: () => { name: string; state: string; imageVersion: string | null }[];
}

/** An upgrade's phase changes, as UpgradeService announces them (its 'event' PHASE events). */
export interface PhaseEvent {
  type: string;
  upgradeId: string;
  phase: string;
  at: number;
}

const PHASES = ['LOADING', 'LOADED', 'SWITCHING', 'SWITCHED', 'ACCEPTED', 'COMMITTING', 'COMMITTED', 'ABORTING', 'ABORTED', 'ROLLED_BACK'];

export class Metrics {
  readonly registry = new Registry();
  private server: http.Server | null = null;
  address = '';
  private readonly grpcCalls: Counter<'method' | 'code'>;
  private readonly grpcSeconds: Histogram<'method' | 'code'>;
  private readonly syncAckSeconds: Histogram<'process' | 'table'>;
  private readonly recordsWritten: Counter<'process' | 'table'>;
  private readonly switchoverSeconds: Histogram<'process' | 'result'>;
  private readonly freezeSeconds: Histogram<'process'>;
  private readonly bulkSeconds: Histogram<'process' | 'table' | 'result'>;
  private readonly bulkRecords: Counter<'process' | 'table'>;
  private readonly phaseSeconds: Histogram<'phase'>;
  /** The checkpoint status of the scrape in progress (read once in render()). */
  private processes: ProcessStatus[] = [];
  /** Upgrade id -> the phase it is in and when it entered it (ms since the epoch). */
  private readonly phaseSince = new Map<string, { phase: string; at: number }>();

  constructor(
    private readonly sources: MetricsSources,
    private readonly log: Logger,
  ) {
    const registers = [this.registry];
    // One checkpoint status per scrape, shared by the five families read from it.
    const processes = () => this.processes;
    const tableGauge = (name: string, help: string, pick: (t: ProcessStatus['tables'][number]) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['process', 'table'],
        registers,
        collect() {
          this.reset();
          for (const p of processes()) for (const t of p.tables) this.set({ process: p.process, table: t.name }, pick(t));
        },
      });
    tableGauge('hitless_checkpoint_records', 'Records held in the agent replica of a checkpoint table.', (t) => t.records);
    tableGauge('hitless_checkpoint_bytes', 'Bytes (keys and values) held in the agent replica of a checkpoint table.', (t) => t.bytes);
    tableGauge('hitless_checkpoint_seq', 'Latest sequence number of a checkpoint table.', (t) => t.seq);
    const standbyGauge = (name: string, help: string, pick: (x: ProcessStatus['peers'][number]) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['process', 'instance', 'vm'],
        registers,
        collect() {
          this.reset();
          for (const p of processes())
            for (const x of p.peers) if (x.role !== 'ACTIVE') this.set({ process: p.process, instance: x.instanceId, vm: x.vmId }, pick(x));
        },
      });
    standbyGauge('hitless_standby_lag_batches', 'Batches a standby instance still has to apply.', (x) => x.lag);
    standbyGauge('hitless_standby_ready', '1 when a standby instance is in sync (READY).', (x) => (x.ready ? 1 : 0));
    new Gauge({
      name: 'hitless_upgrade_phase',
      help: 'The phase of the current (or last) upgrade: 1 for its phase, 0 for the others; all 0 before the first upgrade.',
      labelNames: ['phase'],
      registers,
      collect() {
        const up = sources.upgradePhase();
        for (const ph of PHASES) this.set({ phase: ph }, up?.phase === ph ? 1 : 0);
      },
    });
    new Gauge({
      name: 'hitless_vm_state',
      help: 'VMs the agent manages, 1 for each VM in its current state.',
      labelNames: ['vm', 'state', 'version'],
      registers,
      collect() {
        this.reset();
        for (const v of sources.vms()) this.set({ vm: v.name, state: v.state, version: v.imageVersion ?? '' }, 1);
      },
    });
    this.grpcCalls = new Counter({
      name: 'hitless_grpc_calls_total',
      help: 'Finished gRPC calls by full method and status code.',
      labelNames: ['method', 'code'],
      registers,
    });
    // Unary calls: sub-millisecond Status up to multi-second upgrade commands.
    this.grpcSeconds = new Histogram({
      name: 'hitless_grpc_call_duration_seconds',
      help: 'Duration of unary gRPC calls by full method and status code (streams are counted, not timed).',
      labelNames: ['method', 'code'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
      registers,
    });
    // SYNC acks: about 1 ms at the median on a host, a few ms at p99, tens of ms in TCG guests.
    this.syncAckSeconds = new Histogram({
      name: 'hitless_checkpoint_sync_ack_seconds',
      help: 'SYNC batches: from the agent receiving the batch to its acknowledgement (every in-sync standby applied it).',
      labelNames: ['process', 'table'],
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1, 2, 5],
      registers,
    });
    this.recordsWritten = new Counter({
      name: 'hitless_checkpoint_records_written_total',
      help: 'Records (puts and deletes) the agent stored and applied, by table.',
      labelNames: ['process', 'table'],
      registers,
    });
    this.switchoverSeconds = new Histogram({
      name: 'hitless_switchover_duration_seconds',
      help: 'Whole switchovers of a process (warm-up, freeze, promote, demote), by result (ok, failed).',
      labelNames: ['process', 'result'],
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    // The write freeze: 2-3 ms on a host, 20-60 ms in TCG guests; the target is under 50 ms.
    this.freezeSeconds = new Histogram({
      name: 'hitless_switchover_freeze_seconds',
      help: 'Write-freeze window of each successful switchover (FREEZE sent to PROMOTE answered).',
      labelNames: ['process'],
      buckets: [0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1],
      registers,
    });
    // Bulk snapshots: well under a second for 1M records on a host, seconds in a TCG guest.
    this.bulkSeconds = new Histogram({
      name: 'hitless_bulk_snapshot_duration_seconds',
      help: 'Bulk snapshot transfers to a standby, token issued to the end frame, by result (ok, failed).',
      labelNames: ['process', 'table', 'result'],
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120],
      registers,
    });
    this.bulkRecords = new Counter({
      name: 'hitless_bulk_snapshot_records_total',
      help: 'Records sent in completed bulk snapshots (log entries included).',
      labelNames: ['process', 'table'],
      registers,
    });
    // Upgrade phases under TCG: seconds (SWITCHING) to minutes (LOADING boots a VM and syncs).
    this.phaseSeconds = new Histogram({
      name: 'hitless_upgrade_phase_duration_seconds',
      help: 'Time upgrades spent in each phase, observed when they leave it.',
      labelNames: ['phase'],
      buckets: [0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600],
      registers,
    });
  }

  /** A finished RPC; `seconds` only for unary calls. */
  countCall(method: string, code: string, seconds?: number): void {
    this.grpcCalls.inc({ method, code });
    if (seconds !== undefined) this.grpcSeconds.observe({ method, code }, seconds);
  }

  /** The observer the checkpoint service reports to. */
  checkpointObserver(): CheckpointObserver {
    return {
      syncAck: (process, table, seconds) => this.syncAckSeconds.observe({ process, table }, seconds),
      recordsWritten: (process, table, records) => this.recordsWritten.inc({ process, table }, records),
      switchover: (process, seconds, freezeSeconds, ok) => {
        this.switchoverSeconds.observe({ process, result: ok ? 'ok' : 'failed' }, seconds);
        if (ok) this.freezeSeconds.observe({ process }, freezeSeconds);
      },
      bulkSnapshot: (process, table, seconds, records, ok) => {
        this.bulkSeconds.observe({ process, table, result: ok ? 'ok' : 'failed' }, seconds);
        if (ok) this.bulkRecords.inc({ process, table }, records);
      },
    };
  }

  /** Feeds phase durations from the upgrade service's PHASE events (an agent restart loses the phase in progress). */
  upgradeEvent(ev: PhaseEvent): void {
    if (ev.type !== 'PHASE') return;
    const prev = this.phaseSince.get(ev.upgradeId);
    if (prev && prev.phase !== ev.phase) this.phaseSeconds.observe({ phase: prev.phase }, Math.max(0, ev.at - prev.at) / 1000);
    if (['COMMITTED', 'ABORTED', 'ROLLED_BACK'].includes(ev.phase)) this.phaseSince.delete(ev.upgradeId);
    else if (!prev || prev.phase !== ev.phase) this.phaseSince.set(ev.upgradeId, { phase: ev.phase, at: ev.at });
  }

  render(): Promise<string> {
    this.processes = this.sources.checkpoint();
    return this.registry.metrics();
  }

  async listen(hostPort: string): Promise<string> {
    // Node's process metrics start here: their event-loop and GC monitors run only for a scrape.
    // The event-loop figures (nodejs_eventloop_lag_*) are the time between two fires of a timer
    // with this interval, ms: each reads up to one interval more than the loop was held, so 1 ms
    // rather than prom-client's 10 keeps a 20 ms stall from reading as up to 30.
    collectDefaultMetrics({ register: this.registry, eventLoopMonitoringPrecision: 1 });
    const { host, port } = splitHostPort(hostPort);
    const server = http.createServer((req, res) => {
      if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
        return;
      }
      this.render().then(
        (body) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(body),
        (e: Error) => {
          this.log.error({ err: e.message }, 'rendering metrics failed');
          res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${e.message}\n`);
        },
      );
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
