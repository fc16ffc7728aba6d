/**
 * npm run bench:checkpoint — the checkpoint data path against a Redis replica, in one run.
 *
 * Three OS processes on unix sockets: hitlessd, an active worker and a standby worker, with a
 * full Internet table (RECORDS, default 1,000,000 routes of ~100-byte path attributes). Prints
 * one JSON line per measurement:
 *   bulk         fresh standby subscribe -> all records applied (snapshot over the bulk socket),
 *                beside a fresh Redis replica's full sync of the same records (peer, ratio);
 *   incremental  sustained records/s from the active's submit to the standby's apply, beside the
 *                limit: the same framed bytes moved once through one raw unix socket between the
 *                same two processes (limit_records_per_s; ratio = our seconds / the limit's);
 *   sync-ack     SYNC table ack latency p50/p99 at 50k and at 200k records/s offered (after 1 s
 *                unmeasured warm-up at the same rate), with the rate sustained
 *                (achieved_records_per_s, up to the last ack), the batches still unacknowledged
 *                when the last was offered (backlog_end_batches: a few when it keeps up, a queue
 *                when it does not, and then the latencies are queueing) and kept_up (achieved
 *                >= 95% of offered), the same for the peer, each beside Redis at the same rate: 100
 *                SETs then WAIT 1 on a primary with one replica (peer 'redis-wait'). At 200k/s
 *                neither keeps up on 2 cores, and the peer's writer is this benchmark's one-thread
 *                RESP client: its figure there is bound by that client, not by Redis;
 *   agent-rss    the agent's resident memory holding the table;
 *   audit        an Audit of the process (every table digested at one frozen moment by the agent
 *                and by both instances, in slices): its time and whether the digests agree;
 *   switchover   write-freeze window when the standby takes over the 1M-record table while the
 *                active changes 20k records/s (agent-side: FREEZE sent -> PROMOTE acknowledged).
 * Every line of a load also has `agent_loop_max_ms`: the agent's longest event-loop stall while it
 * ran (from its Prometheus endpoint, 1 ms sampling): a stall there delays every acknowledgement.
 * From the bulk phase on, lines also have `process_loop_max_ms`: the same for the routing
 * processes (the active and the standby worker, the longer of the two), whose SDK applies
 * snapshots and changes and computes digests on their event loops; and `process_busy_max_ms`,
 * the longest such stall less the time the process's main thread waited for a CPU meanwhile (from
 * /proc/self/schedstat). Where the cores are saturated (bulk, incremental) a stall is mostly that
 * waiting; the busy figure is the work that held the loop.
 */
import { ChildProcess, execFile, fork } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { keepTempDir, removeTempDirs, scrapeMetrics, startAgent } from '../harness/agent-process';
import { generateRib } from '../examples/bgp-rib/rib-generator';
import { measureRedisReplicaFullSync } from './peers/redis-replica';
import { measureRedisWait } from './peers/redis-wait';
import { rawClient, unaryCall } from '../harness/grpc-client';

const RECORDS = Number(process.env.RECORDS ?? 1_000_000);
const BATCH = 1000;
/** Extra V8 flags for every process of the run (e.g. BENCH_NODE_FLAGS=--max-semi-space-size=64). */
const NODE_FLAGS = (process.env.BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean);
/** Extra V8 flags for hitlessd only (e.g. BENCH_AGENT_NODE_FLAGS=--initial-old-space-size=256). */
const AGENT_NODE_FLAGS = (process.env.BENCH_AGENT_NODE_FLAGS ?? '').split(' ').filter(Boolean);
/**
 * Phases to run (BENCH_PHASES=incremental,sync, say, to profile one): load always runs, and one
 * standby always follows; `bulk` adds the further bulk samples and the Redis full syncs.
 */
/** Offered rates of the sync-ack phase, records/s (BENCH_SYNC_RATES=200000 for one). */
const SYNC_RATES = (process.env.BENCH_SYNC_RATES ?? '50000,200000').split(',').map(Number);
const PHASES = new Set((process.env.BENCH_PHASES ?? 'bulk,incremental,sync,audit,switchover').split(','));

interface Worker {
  proc: ChildProcess;
  call<T = Record<string, number>>(cmd: Record<string, unknown>): Promise<T>;
}

function worker(): Worker {
  const proc = fork(path.join(__dirname, 'checkpoint-worker.js'), [], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    execArgv: ['--expose-gc', ...NODE_FLAGS, ...(process.env.BENCH_TRACE_GC ? ['--trace-gc'] : [])],
  });
  let queue = Promise.resolve<unknown>(undefined);
  return {
    proc,
    call<T>(cmd: Record<string, unknown>) {
      const p = queue.then(
        () =>
          new Promise<T>((resolve, reject) => {
            // A worker that dies (the kernel's OOM killer, say) fails the call, and so the run: its
            // answer would otherwise never come and the benchmark would end quietly, lines missing.
            const died = (code: number | null, signal: string | null) =>
              cmd.op === 'exit' && code === 0
                ? resolve({ ok: true } as T) // asked to; its answer may come after its exit
                : reject(
                    new Error(`benchmark worker ${proc.pid} exited (code ${code}, signal ${signal}) during '${String(cmd.op)}'; see dmesg if it was killed`),
                  );
            if (proc.exitCode !== null || proc.signalCode !== null) return died(proc.exitCode, proc.signalCode);
            proc.once('exit', died);
            proc.once('message', (m: { ok: boolean; error?: string }) => {
              proc.off('exit', died);
              if (m.ok) resolve(m as T);
              else reject(new Error(m.error));
            });
            proc.send(cmd);
          }),
      );
      queue = p.catch(() => undefined);
      return p;
    },
  };
}

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** CPU seconds a process has used so far (all its threads), from /proc. */
function cpuSeconds(pid: number): number {
  let f: string;
  try {
    f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return 0; // exited
  }
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime + stime, clock ticks (USER_HZ 100)
}

/**
 * Waits until the run's processes are idle (together under 5% of a core over 0.5 s; at most 60 s):
 * background work left from one measurement (a compaction, the store catching up) must not be
 * charged to the next one, ours or the peer's. The kernel's work too: what the store wrote sits
 * in the page cache until the kernel writes it out ~30 s later (140 MB after the load), which
 * then lands in whatever measurement runs at that moment; `sync` writes it out first.
 */
async function quiesce(pids: number[]): Promise<void> {
  await new Promise<void>((resolve) => execFile('sync', () => resolve()));
  const used = () => pids.reduce((a, p) => a + cpuSeconds(p), 0);
  for (const deadline = Date.now() + 60_000; Date.now() < deadline;) {
    const before = used();
    await new Promise((r) => setTimeout(r, 500));
    if (used() - before < 0.025) return;
  }
}

const print = (o: Record<string, unknown>) => process.stdout.write(JSON.stringify(o) + '\n');

/**
 * The agent's longest event-loop stall since the previous call, ms: its Prometheus endpoint's
 * nodejs_eventloop_lag_max_seconds (the longest time between two fires of a 1 ms timer; every
 * scrape resets it) less that 1 ms interval, as the upgrade phases' figure (LoopStallWatch) counts.
 * Call it before a phase to start the window, after it to read the phase's figure.
 */
async function agentLoopMaxMs(metrics: string): Promise<number> {
  const m = /^nodejs_eventloop_lag_max_seconds\S* ([\d.e+-]+)$/m.exec(await scrapeMetrics(metrics));
  return m ? Math.max(0, Math.round((Number(m[1]) * 1e3 - 1) * 10) / 10) : -1;
}
const round = (x: number, d = 3) => Math.round(x * 10 ** d) / 10 ** d;

/** A line's event-loop figures for the routing processes (see the header and processLoops). */
type ProcessLoops = { process_loop_max_ms: number; process_busy_max_ms: number };
const maxLoops = (a: ProcessLoops, b: ProcessLoops): ProcessLoops => ({
  process_loop_max_ms: Math.max(a.process_loop_max_ms, b.process_loop_max_ms),
  process_busy_max_ms: Math.max(a.process_busy_max_ms, b.process_busy_max_ms),
});

async function main(): Promise<void> {
  const agent = await startAgent({
    nodeArgs: [...NODE_FLAGS, ...AGENT_NODE_FLAGS, ...(process.env.BENCH_TRACE_GC ? ['--trace-gc'] : [])],
    args: ['--metrics', '127.0.0.1:0', ...(process.env.BENCH_DEBUG ? ['--log-level', 'debug'] : [])],
  });
  const metrics = agent.ready.metrics as string;
  const loopMax = () => agentLoopMaxMs(metrics);
  const workers: Worker[] = [];
  const settle = () => quiesce([agent.pid, ...workers.map((w) => w.proc.pid!)]);
  try {
    const active = worker();
    workers.push(active);
    await active.call({ op: 'start', role: 'ACTIVE', socket: agent.socket, instance: 'bgp-a' });
    await loopMax();
    const load = await active.call({ op: 'load', records: RECORDS, batch: BATCH, window: 16 });
    print({
      bench: 'checkpoint-load',
      records: RECORDS,
      seconds: round(load.seconds),
      records_per_s: Math.round(RECORDS / load.seconds),
      agent_loop_max_ms: await loopMax(),
    });
    print({ bench: 'agent-rss', records: RECORDS, seconds: 0, rss_bytes: rssBytes(agent.pid), rss_mb: round(rssBytes(agent.pid) / 2 ** 20, 1) });

    // Bulk: a fresh standby (process already running) subscribes; time until it holds everything.
    const standby = worker();
    workers.push(standby);
    /**
     * The fields of a line for routing processes `ws` since their previous call (the longer of
     * them), ms: their longest event-loop stall as loopMax counts the agent's (each worker samples
     * its loop every 1 ms), and that stall less the time their main thread waited for a CPU in it
     * (which two busy cores make long). Call it before a phase to start the window, after it to
     * read the phase's figures.
     */
    const processLoops = async (ws = [active, standby]): Promise<ProcessLoops> => {
      let wall = 0;
      let busy = 0;
      for (const w of ws) {
        const r = await w.call<{ p99: number; max: number; busyMax: number }>({ op: 'loopDelay', reset: true });
        if (process.env.BENCH_DEBUG)
          process.stderr.write(`worker ${w.proc.pid}: event-loop p99 ${round(r.p99 - 1, 1)} max ${round(r.max - 1, 1)} ms, busy ${round(r.busyMax, 1)} ms\n`);
        wall = Math.max(wall, r.max - 1);
        busy = Math.max(busy, r.busyMax);
      }
      return { process_loop_max_ms: round(Math.max(0, wall), 1), process_busy_max_ms: round(busy, 1) };
    };
    const bulkSamples: number[] = [];
    let bulkProcessLoops: ProcessLoops = { process_loop_max_ms: 0, process_busy_max_ms: 0 };
    await settle();
    await loopMax();
    await processLoops();
    for (let i = 0; i < (PHASES.has('bulk') ? 3 : 1); i++) {
      const sb = i === 0 ? standby : worker();
      if (i > 0) {
        workers.push(sb);
        await processLoops([sb]); // from here: its start (loading modules) is not the load
      }
      const st = await sb.call({ op: 'start', role: 'STANDBY', socket: agent.socket, instance: `bgp-s${i}` });
      const w = await sb.call({ op: 'waitSeq', table: 'rib', seq: load.seq });
      bulkSamples.push(st.seconds + w.seconds);
      if (i > 0) {
        bulkProcessLoops = maxLoops(bulkProcessLoops, await processLoops([sb]));
        await sb.call({ op: 'exit' });
      }
    }
    const bulkLoopMax = await loopMax();
    bulkProcessLoops = maxLoops(bulkProcessLoops, await processLoops());
    bulkSamples.sort((a, b) => a - b);
    const bulk = bulkSamples[1];
    const dA = await active.call<{ sha256: string; records: number }>({ op: 'digest', table: 'rib' });
    const dS = await standby.call<{ sha256: string; records: number }>({ op: 'digest', table: 'rib' });
    if (dA.sha256 !== dS.sha256 || dS.records !== RECORDS) throw new Error(`standby digest differs after bulk sync (${dS.records} records)`);

    const redis: number[] = [];
    for (let i = 0; i < (PHASES.has('bulk') ? 3 : 0); i++) {
      await settle();
      const r = await measureRedisReplicaFullSync(() => generateRib(RECORDS));
      redis.push(r.syncSeconds);
    }
    redis.sort((a, b) => a - b);
    if (PHASES.has('bulk'))
      print({
        bench: 'bulk',
        records: RECORDS,
        seconds: round(bulk),
        samples: bulkSamples.map((x) => round(x)),
        peer: 'redis-replica',
        peer_seconds: round(redis[1]),
        peer_samples: redis.map((x) => round(x)),
        ratio: round(bulk / redis[1]),
        agent_loop_max_ms: bulkLoopMax,
        ...bulkProcessLoops,
      });

    if (PHASES.has('incremental')) {
      // Incremental: churn the table while the standby follows; time until the standby applied the last.
      await active.call({ op: 'churnPrepare', records: RECORDS });
      await settle();
      await loopMax();
      await processLoops();
      const churn = active.call({ op: 'churn', records: RECORDS, batch: BATCH, window: 16 });
      const done = await churn;
      const t = await standby.call({ op: 'waitSeq', table: 'rib', seq: done.seq });
      const incSeconds = done.seconds + t.seconds;
      const incLoopMax = await loopMax();
      const incProcessLoops = await processLoops();
      const d2A = await active.call<{ sha256: string }>({ op: 'digest', table: 'rib' });
      const d2S = await standby.call<{ sha256: string }>({ op: 'digest', table: 'rib' });
      // The limit beside it: the same changes, framed as the active frames them, moved once from
      // the active's process to the standby's through one unix socket and nothing else (no
      // agent, no store, no apply). Timed from the receiver's first byte to its last.
      const rawPath = path.join(os.tmpdir(), `hitless-bench-raw-${process.pid}.sock`);
      const prepared = await active.call<{ bytes: number }>({ op: 'rawPrepare', records: RECORDS, batch: BATCH });
      await standby.call({ op: 'rawListen', path: rawPath });
      await settle();
      const [, raw] = await Promise.all([active.call({ op: 'rawSend', path: rawPath }), standby.call({ op: 'rawDrain', bytes: prepared.bytes })]);
      fs.rmSync(rawPath, { force: true });
      print({
        bench: 'incremental',
        records: RECORDS,
        seconds: round(incSeconds),
        records_per_s: Math.round(RECORDS / incSeconds),
        digest_match: d2A.sha256 === d2S.sha256,
        agent_loop_max_ms: incLoopMax,
        ...incProcessLoops,
        limit: 'raw-unix-hop',
        limit_bytes: prepared.bytes,
        limit_seconds: round(raw.seconds),
        limit_records_per_s: Math.round(RECORDS / raw.seconds),
        ratio: round(incSeconds / raw.seconds),
      });
    }
    if (PHASES.has('sync')) {
      // SYNC acks at 50k and 200k records/s offered (100-record batches every 2 ms / 0.5 ms), each
      // beside Redis: 100 SETs then WAIT 1 on a primary with one replica, at the same rate.
      const peerKeys: Buffer[] = [];
      const peerValues: Buffer[] = [];
      for (const r of generateRib(50_000)) {
        peerKeys.push(Buffer.from(r.key, 'latin1'));
        peerValues.push(r.value);
      }
      for (const rate of SYNC_RATES) {
        await settle();
        await loopMax();
        await processLoops();
        const lat = await active.call({ op: 'syncLatency', rate, batch: 100, seconds: 5, warmup: 1 });
        const syncLoopMax = await loopMax();
        const syncProcessLoops = await processLoops();
        await settle();
        const peer = await measureRedisWait({ rate, batch: 100, seconds: 5, warmup: 1, keys: peerKeys, values: peerValues });
        print({
          bench: 'sync-ack',
          records: lat.records,
          seconds: round(lat.seconds),
          offered_records_per_s: rate,
          warmup_seconds: 1,
          p50_ms: round(lat.p50),
          p99_ms: round(lat.p99),
          max_ms: round(lat.max),
          achieved_records_per_s: Math.round(lat.achieved),
          backlog_end_batches: lat.backlogEnd,
          kept_up: lat.achieved >= 0.95 * rate,
          agent_loop_max_ms: syncLoopMax,
          ...syncProcessLoops,
          peer: 'redis-wait',
          peer_p50_ms: round(peer.p50Ms),
          peer_p99_ms: round(peer.p99Ms),
          peer_max_ms: round(peer.maxMs),
          peer_unreplicated: peer.unreplicated,
          peer_achieved_records_per_s: Math.round(peer.achievedRecordsPerS),
          peer_backlog_end_batches: peer.backlogEnd,
          peer_kept_up: peer.achievedRecordsPerS >= 0.95 * rate,
          ratio_p99: round(lat.p99 / peer.p99Ms),
        });
        if (process.env.BENCH_DEBUG)
          process.stderr.write(`sync spikes at ${rate}/s (start ms after ${lat.measuredFromEpochMs} epoch ms, latency ms): ${JSON.stringify(lat.spikes)}\n`);
      }
      if (process.env.BENCH_DEBUG) {
        const loops = agent
          .stderr()
          .split('\n')
          .filter((l) => l.includes('event loop'))
          .slice(-3);
        process.stderr.write(`agent event loop (last 5 s windows): ${loops.join(' | ')}\n`);
        if (process.env.BENCH_TRACE_GC) {
          const gcs = agent
            .stdout()
            .split('\n')
            .filter((l) => /Mark-Compact|Scavenge/.test(l))
            .slice(-25);
          process.stderr.write(`agent GC (last): \n${gcs.join('\n')}\n`);
        }
      }
    }
    print({ bench: 'agent-rss-end', records: RECORDS, seconds: 0, rss_mb: round(rssBytes(agent.pid) / 2 ** 20, 1) });

    if (PHASES.has('audit')) {
      // An Audit while nothing writes: the agent and both instances digest every table of the
      // process (the agent's replica of the load's table and the sync phase's), in slices.
      const ck = rawClient('hitless.v1.Checkpoint', agent.socket);
      try {
        await settle();
        await loopMax();
        await processLoops();
        const t0 = performance.now();
        const r = await unaryCall<{ consistent: boolean; agent: { table: string; records: string }[] }>(ck, 'Audit', { process: 'bgp' });
        const seconds = (performance.now() - t0) / 1000;
        print({
          bench: 'audit',
          records: r.agent.reduce((a, d) => a + Number(d.records), 0),
          seconds: round(seconds),
          tables: r.agent.length,
          consistent: r.consistent,
          agent_loop_max_ms: await loopMax(),
          ...(await processLoops()),
        });
      } finally {
        ck.close();
      }
    }

    if (PHASES.has('switchover')) {
      // Switchover under load, there and back, three times each way: the freeze window.
      const ck = rawClient('hitless.v1.Checkpoint', agent.socket);
      const freezes: number[] = [];
      await settle();
      await loopMax();
      await processLoops();
      try {
        await active.call({ op: 'churnOn', rate: 20_000 });
        await standby.call({ op: 'churnOn', rate: 20_000 }); // runs only while it is the active
        for (let i = 0; i < 6; i++) {
          await new Promise((r) => setTimeout(r, 500));
          const to = i % 2 === 0 ? 'bgp-s0' : 'bgp-a';
          const r = await unaryCall<{ freezeMicros: number }>(ck, 'Switchover', { process: 'bgp', toInstanceId: to });
          freezes.push(r.freezeMicros / 1000);
        }
        await standby.call({ op: 'churnOff' });
        await active.call({ op: 'churnOff' });
      } finally {
        ck.close();
      }
      freezes.sort((a, b) => a - b);
      print({
        bench: 'switchover',
        records: RECORDS,
        seconds: round(freezes[freezes.length >> 1] / 1000, 6),
        freeze_ms_median: round(freezes[freezes.length >> 1]),
        freeze_ms_max: round(freezes[freezes.length - 1]),
        samples_ms: freezes.map((x) => round(x)),
        agent_loop_max_ms: await loopMax(),
        ...(await processLoops()),
      });
    }
  } finally {
    // Asked to exit first (a --cpu-prof profile is written at exit), killed when they do not.
    for (const w of workers) {
      if (w.proc.exitCode !== null) continue;
      const exited = new Promise((r) => w.proc.once('exit', r));
      w.call({ op: 'exit' }).catch(() => undefined);
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    }
    for (const w of workers) if (w.proc.exitCode === null) w.proc.kill('SIGKILL');
    await agent.stop();
    // BENCH_AGENT_LOG=FILE keeps the agent's whole log (with BENCH_DEBUG: debug level) for diagnosis.
    if (process.env.BENCH_AGENT_LOG) fs.writeFileSync(process.env.BENCH_AGENT_LOG, agent.stderr() + agent.stdout());
    // The agent's state directory (its database holds the whole table) unless asked to keep it.
    if (process.env.BENCH_KEEP_STATE) {
      keepTempDir(agent.stateDir);
      process.stderr.write(`agent state kept in ${agent.stateDir}\n`);
    }
    removeTempDirs();
  }
}

main().catch((e) => {
  process.stderr.write(`bench failed: ${(e as Error).stack}\n`);
  process.exit(1);
});
