/**
 * Shared body of the example routing daemons: flags, the CheckpointClient, a load generator that
 * keeps changing the table while active, and a line protocol for operators and tests.
 *
 * stdin commands (one per line): digest | status | load N | churn RATE | bgp | stop | quit
 * stdout: one JSON object per line, {"event": ...}; SIGUSR1 also prints the digest.
 * The daemon's table *is* the SDK's local table: what it serves is exactly what it replicates.
 */
import readline from 'node:readline';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { CheckpointClient, Transform } from '../../agent/sdk/checkpoint-client';
import { DEFAULT_FIB_ROUTE_OPTIONS, fibRoutes } from './fib-routes';
import { BGP_TABLES, BgpRouting } from '../bgp-rib/bgp/routing';

/**
 * Churn period, ms: one batch per tick. A role command that arrives during a tick waits for it,
 * and per-batch work is paid on every hop. In a guest under software emulation, 2,000 changes/s
 * kept the vCPU 45% busy with 50 ms ticks and 57% with 20 ms ones, and the demo's switchover
 * freeze did not clearly improve (median 32 ms over six runs with 20 ms ticks, 36 ms over nine
 * with 50 ms ticks).
 */
const CHURN_TICK_MS = 50;

export interface TableModel {
  /** Table name and process name, e.g. ('rib', 'bgp'). */
  process: string;
  table: string;
  /** Initial content: `count` records. */
  generate(count: number, seed: number): Iterable<{ key: string; value: Buffer }>;
  /** A changed value (or null = withdraw) for an existing record, for churn. */
  mutate(key: string, value: Buffer, rand: () => number): Buffer | null;
  /** Schema transforms this build can apply, keyed "from->to". */
  transforms?: Record<string, Transform>;
  /** Renders one value for `show` output. */
  describe?(value: Buffer): string;
}

export const DAEMON_USAGE = (name: string) => `Usage: ${name} [options]
  --agent ADDR        agent gRPC address: a unix socket path or host:port (env HITLESS_AGENT)
  --role ROLE         active | standby (env HITLESS_ROLE; default active)
  --vm ID             VM or slot this process runs in (env HITLESS_VM; default "host")
  --instance ID       unique instance id (default <process>@<vm>)
  --version V         software version reported to the agent (default 1.0.0)
  --schema N          schema version written (default 1); --reads 1,2 adds readable versions
  --records N         active with an empty table: load N records at start (default 0)
  --churn RATE        active: change RATE records per second, continuously (default 0)
  --batch N           records per batch (default 1000)
  --sync              declare the table SYNC (acknowledged when standbys applied it)
  --seed N            generator seed (default 1)
  --fib N             active with an empty FIB: publish N forwarding entries (at most 1024) in
                      the FIB table "fib", programmed into the data plane by the agent
                      (examples/common/fib-routes.ts); default 0 = no FIB table
  --fib-via A4,A6     next hops of those entries (default 198.51.100.2,2001:db8:2::2)
  --fib-dev PORT      data-plane port of those next hops (default port2)
BGP (examples/bgp-rib/bgp/: the active instance speaks BGP-4; RIBs and sessions are tables)
  --bgp-peer ADDR:AS  a BGP neighbour (repeatable); without one the daemon speaks no BGP
  --bgp-as N          our AS (4-octet)            --bgp-router-id A   our BGP identifier
  --bgp-announce P,.. prefixes we originate       --bgp-next-hop A4,A6  their next hops (the
                      data plane's addresses toward the peers)
  --bgp-port PORT     data-plane port toward the peers: FIB entries of learned routes (port2)
  --bgp-local-address A  connect from A           --bgp-hold-time S (90)
  --bgp-graceful-restart S  restart time we advertise (120)
  --json-only         no human text on stderr
  --loop-stats S      every S seconds print the event loop's delay (p50/p99/max ms; default 0 = off)
env HITLESS_BULK      host:port of the agent's bulk snapshot channel when it differs from what
                      the agent advertises (guests: 10.0.2.100:7001)
env HITLESS_RESTARTS  how often a process manager restarted this process; above 0 it asks for
                      ACTIVE and follows the active instance if there is one (--role is ignored)
stdin: digest | status | load N | churn RATE | bgp | stop | quit      SIGUSR1: digest
`;

/** The FIB table of the example daemons (TableSpec.kind FIB). */
const FIB_TABLE = 'fib';

export async function runDaemon(model: TableModel, argv = process.argv.slice(2)): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      agent: { type: 'string' },
      role: { type: 'string', default: process.env.HITLESS_ROLE ?? 'active' },
      vm: { type: 'string' },
      instance: { type: 'string' },
      version: { type: 'string', default: '1.0.0' },
      schema: { type: 'string', default: '1' },
      reads: { type: 'string', default: '' },
      records: { type: 'string', default: '0' },
      churn: { type: 'string', default: '0' },
      batch: { type: 'string', default: '1000' },
      sync: { type: 'boolean', default: false },
      seed: { type: 'string', default: '1' },
      fib: { type: 'string', default: '0' },
      'fib-via': { type: 'string' },
      'fib-dev': { type: 'string' },
      'bgp-peer': { type: 'string', multiple: true },
      'bgp-as': { type: 'string' },
      'bgp-router-id': { type: 'string' },
      'bgp-announce': { type: 'string', default: '' },
      'bgp-next-hop': { type: 'string', default: '' },
      'bgp-port': { type: 'string', default: 'port2' },
      'bgp-local-address': { type: 'string' },
      'bgp-hold-time': { type: 'string', default: '90' },
      'bgp-graceful-restart': { type: 'string', default: '120' },
      'json-only': { type: 'boolean', default: false },
      'loop-stats': { type: 'string', default: '0' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(DAEMON_USAGE(model.process));
    return;
  }
  const out = (o: Record<string, unknown>) => process.stdout.write(JSON.stringify(o) + '\n');
  const agent = values.agent ?? process.env.HITLESS_AGENT;
  if (!agent) {
    process.stderr.write(`${model.process}: no agent address; pass --agent or set HITLESS_AGENT\n`);
    process.exit(2);
  }
  const vm = values.vm ?? process.env.HITLESS_VM ?? 'host';
  const batchSize = Number(values.batch);
  const fibCount = Number(values.fib);
  const bgpPeers = values['bgp-peer'] ?? [];
  if (bgpPeers.length && (!values['bgp-as'] || !values['bgp-router-id'])) {
    process.stderr.write(`${model.process}: --bgp-peer needs --bgp-as and --bgp-router-id\n`);
    process.exit(2);
  }
  const [via4, via6] = (values['fib-via'] ?? '').split(',');
  const fibOpts = {
    via4: via4 || DEFAULT_FIB_ROUTE_OPTIONS.via4,
    via6: via6 || DEFAULT_FIB_ROUTE_OPTIONS.via6,
    dev: values['fib-dev'] ?? DEFAULT_FIB_ROUTE_OPTIONS.dev,
  };
  // Set by the guest init when it restarted this process after it died (0 on the first start). A
  // restarted process takes ACTIVE when nobody holds it, else follows whoever does (rejoin),
  // whatever role it was first started with: the peer may have been promoted meanwhile.
  const restarts = Number(process.env.HITLESS_RESTARTS ?? 0) || 0;
  const client = new CheckpointClient({
    address: agent,
    process: model.process,
    instanceId: values.instance ?? `${model.process}@${vm}`,
    vmId: vm,
    softwareVersion: values.version!,
    schema: Number(values.schema),
    reads: values.reads ? values.reads.split(',').map(Number) : [],
    transforms: model.transforms,
    tables: [
      { name: model.table, durability: values.sync ? 'SYNC' : 'ASYNC' },
      ...(fibCount > 0 || bgpPeers.length ? [{ name: FIB_TABLE, durability: 'ASYNC' as const, kind: 'FIB' as const }] : []),
      ...(bgpPeers.length ? BGP_TABLES.map((name) => ({ name, durability: 'ASYNC' as const })) : []),
    ],
    untransformedTables: bgpPeers.length ? [...BGP_TABLES] : [],
    role: restarts === 0 && values.role === 'standby' ? 'STANDBY' : 'ACTIVE',
    rejoin: restarts > 0,
    bulkAddress: process.env.HITLESS_BULK || undefined,
  });
  const table = client.table(model.table);
  const [nh4, nh6] = values['bgp-next-hop']!.split(',');
  const bgp = bgpPeers.length
    ? new BgpRouting(
        client,
        {
          speaker: {
            as: Number(values['bgp-as']),
            routerId: values['bgp-router-id']!,
            holdTime: Number(values['bgp-hold-time']),
            gracefulRestartTime: Number(values['bgp-graceful-restart']),
            peers: bgpPeers.map((p) => {
              const i = p.lastIndexOf(':');
              return { address: p.slice(0, i), as: Number(p.slice(i + 1)), localAddress: values['bgp-local-address'] };
            }),
            announce: values['bgp-announce']!.split(',').filter(Boolean),
            nextHop4: nh4 || undefined,
            nextHop6: nh6 || undefined,
          },
          port: values['bgp-port']!,
          fibTable: FIB_TABLE,
        },
        out,
      )
    : null;
  let seed = Number(values.seed);
  let rand = mulberry(seed);
  let churnTimer: NodeJS.Timeout | null = null;
  let acked = 0;
  let failed = 0;

  client.on('role', (role) => {
    out({ event: 'role', role, seq: table.seq, records: table.size });
    bgp?.onRole(role);
  });
  // `ms`: snapshot-begin to snapshot, i.e. receiving and applying the bulk snapshot here.
  const snapshotStart = new Map<string, number>();
  client.on('snapshot-begin', (t, seq, records) => {
    snapshotStart.set(t, Date.now());
    out({ event: 'snapshot-begin', table: t, seq, records });
  });
  client.on('snapshot', (t, seq, records) => {
    const t0 = snapshotStart.get(t);
    snapshotStart.delete(t);
    out({ event: 'snapshot', table: t, seq, records, ...(t0 !== undefined ? { ms: Date.now() - t0 } : {}) });
  });
  client.on('disconnected', (e) => out({ event: 'disconnected', reason: e?.details ?? String(e ?? 'closed') }));
  client.on('frozen', () => out({ event: 'frozen', seq: table.seq }));
  client.on('error', (e) => out({ event: 'error', message: (e as Error).message }));

  const commit = (b: ReturnType<CheckpointClient['batch']>) =>
    b.commit().then(
      (seq) => {
        acked = Math.max(acked, seq);
      },
      (e) => {
        failed++;
        out({ event: 'write-failed', message: (e as Error).message });
      },
    );

  async function load(n: number): Promise<void> {
    const t0 = Date.now();
    let b = client.batch(model.table);
    const pending: Promise<void>[] = [];
    for (const r of model.generate(n, seed)) {
      b.put(r.key, r.value);
      if (b.count >= batchSize) {
        pending.push(commit(b));
        b = client.batch(model.table);
        if (pending.length >= 32) await pending.shift();
      }
    }
    if (b.count) pending.push(commit(b));
    await Promise.all(pending);
    out({ event: 'loaded', records: table.size, seq: table.seq, ms: Date.now() - t0 });
  }

  /** Keys of the table, refreshed lazily, so churn picks existing records. */
  let keys: string[] = [];
  const refreshKeys = () => {
    keys = [];
    table.forEach((k) => keys.push(k));
  };
  // A standby collects them once its snapshot is in, while it has time: in a guest under software
  // emulation a pass over 20,000 records takes about 0.4 s, which on the first tick after a
  // promotion held up the new active's writes and role commands (a switch back waited for it).
  client.on('snapshot', () => client.role === 'STANDBY' && setImmediate(refreshKeys));
  const withdrawn: { key: string; value: Buffer }[] = [];
  function churnTick(perTick: number): void {
    if (client.role !== 'ACTIVE' || client.frozen) return;
    if (keys.length === 0 || keys.length < table.size / 2) refreshKeys();
    if (keys.length === 0) return;
    let b = client.batch(model.table);
    for (let i = 0; i < perTick; i++) {
      // Now and then re-announce a withdrawn record, as routes come back.
      if (withdrawn.length && rand() < 0.05) {
        const w = withdrawn.pop()!;
        b.put(w.key, w.value);
        continue;
      }
      const key = keys[Math.floor(rand() * keys.length)];
      const cur = table.get(key);
      if (!cur) continue;
      const next = model.mutate(key, cur, rand);
      if (next) b.put(key, next);
      else {
        b.delete(key);
        withdrawn.push({ key, value: Buffer.from(cur) });
      }
      if (b.count >= batchSize) {
        void commit(b);
        b = client.batch(model.table);
      }
    }
    if (b.count) void commit(b);
  }
  function setChurn(rate: number): void {
    if (churnTimer) clearInterval(churnTimer);
    churnTimer = null;
    if (rate > 0) {
      const perTick = Math.max(1, Math.round((rate * CHURN_TICK_MS) / 1000));
      churnTimer = setInterval(() => churnTick(perTick), CHURN_TICK_MS);
    }
  }
  const digest = () => out({ event: 'digest', process: model.process, table: model.table, role: client.role, acked, failed, ...client.digest(model.table) });

  // Handlers before the first line a supervisor reads: until a process installs one, these
  // signals end it at once (the kernel's default action), SIGUSR1 included.
  process.on('SIGUSR1', digest);
  let stopping = false;
  const shutdown = async () => {
    stopping = true;
    setChurn(0);
    bgp?.stop();
    await client.close();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  await client.start().catch((e) => {
    if (stopping) return new Promise<never>(() => undefined); // the shutdown exits
    out({ event: 'fatal', message: e.message, code: e.code });
    process.exit(3);
  });
  out({ event: 'started', role: client.role, seq: table.seq, records: table.size, pid: process.pid });
  if (client.role === 'ACTIVE' && table.size === 0 && Number(values.records) > 0) await load(Number(values.records));
  if (client.role === 'ACTIVE' && fibCount > 0) {
    // The static entries this active's copy lacks, in one batch (the agent validates and programs
    // it). A promoted standby or a restarted active holds them already and writes nothing; BGP may
    // have written learned routes to the same table first.
    const fib = client.table(FIB_TABLE);
    const b = client.batch(FIB_TABLE);
    for (const r of fibRoutes(fibCount, fibOpts)) if (!fib.records.has(r.key)) b.put(r.key, r.value);
    if (b.count) {
      await b.commit().then(
        (seq) => out({ event: 'fib', routes: fibCount, seq }),
        (e: Error) => out({ event: 'fib-refused', message: e.message }),
      );
    }
  }
  setChurn(Number(values.churn));
  bgp?.onRole(client.role);

  const loopStatsS = Number(values['loop-stats']);
  if (loopStatsS > 0) {
    // How late this process runs its callbacks: role commands wait that long before they are
    // handled, which is what a switchover's freeze window is made of inside a slow guest.
    const h = monitorEventLoopDelay({ resolution: 5 });
    h.enable();
    setInterval(() => {
      const ms = (n: number) => Math.round(n / 1e4) / 100;
      out({ event: 'loop', role: client.role, p50: ms(h.percentile(50)), p99: ms(h.percentile(99)), max: ms(h.max) });
      h.reset();
    }, loopStatsS * 1000).unref();
  }
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', async (line) => {
    const [cmd, arg] = line.trim().split(/\s+/);
    if (cmd === 'digest') digest();
    else if (cmd === 'status') out({ event: 'status', role: client.role, seq: table.seq, records: table.size, inFlight: client.inFlight, acked, failed });
    else if (cmd === 'load') {
      seed = Number(arg ?? 0) ? seed + 1 : seed;
      rand = mulberry(seed);
      await load(Number(arg));
    } else if (cmd === 'churn') setChurn(Number(arg));
    else if (cmd === 'bgp') out({ event: 'bgp', ...(bgp?.summary() as object) });
    else if (cmd === 'stop') {
      setChurn(0);
      // Wait until everything written is acknowledged, then report.
      while (client.inFlight > 0) await new Promise((r) => setTimeout(r, 5));
      out({ event: 'stopped', seq: table.seq, records: table.size, acked });
    } else if (cmd === 'quit') await shutdown();
    else if (cmd) out({ event: 'error', message: `unknown command '${cmd}' (digest, status, load N, churn RATE, bgp, stop, quit)` });
  });
}

/** A small seeded PRNG (mulberry32) returning floats in [0, 1). */
export function mulberry(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
