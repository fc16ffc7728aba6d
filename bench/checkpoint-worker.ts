/**
 * A benchmark participant in its own OS process (forked with IPC by checkpoint.bench.ts): an
 * active that loads and churns the RIB, or a standby that follows it. Timings are taken inside
 * the worker so process start-up is not counted; results go back over IPC.
 */
import fs from 'node:fs';
import net from 'node:net';
import { createHistogram } from 'node:perf_hooks';
import { encodeBatch, FrameType } from '../agent/checkpoint/frames';
import { RecordBuilder } from '../agent/checkpoint/records';
import { sharedArenaPool } from '../agent/checkpoint/arena-pool';
import { CheckpointClient } from '../agent/sdk/checkpoint-client';
import { createRng, generateRib, mutateRoute, RibRoute } from '../examples/bgp-rib/rib-generator';

type Cmd =
  | { op: 'start'; role: 'ACTIVE' | 'STANDBY'; socket: string; instance: string }
  | { op: 'load'; records: number; batch: number; window: number }
  | { op: 'churn'; records: number; batch: number; window: number }
  | { op: 'syncLatency'; rate: number; batch: number; seconds: number; warmup?: number }
  | { op: 'waitSeq'; table: string; seq: number }
  | { op: 'digest'; table: string }
  | { op: 'churnOn'; rate: number }
  | { op: 'churnPrepare'; records: number }
  | { op: 'loopDelay'; reset: boolean }
  | { op: 'churnOff' }
  | { op: 'rawPrepare'; records: number; batch: number }
  | { op: 'rawSend'; path: string }
  | { op: 'rawListen'; path: string }
  | { op: 'rawDrain'; bytes: number }
  | { op: 'exit' };

let client: CheckpointClient | null = null;
let churnTimer: NodeJS.Timeout | null = null;
// BENCH_MEM_TRACE=1: this process's memory every second on stderr (RSS, V8 heap, ArrayBuffers,
// the arena pool), to find what grows when a run runs out of memory.
if (process.env.BENCH_MEM_TRACE) {
  const mb = (n: number) => Math.round(n / 2 ** 20);
  setInterval(() => {
    const m = process.memoryUsage();
    process.stderr.write(
      `mem ${process.pid} ${client?.role ?? '-'} rss ${mb(m.rss)} heap ${mb(m.heapUsed)} external ${mb(m.external)} arrayBuffers ${mb(m.arrayBuffers)} arenas allocated ${sharedArenaPool.allocated} reused ${sharedArenaPool.reused} free ${mb(sharedArenaPool.freeBytes)} MB\n`,
    );
  }, 1000).unref();
}
/**
 * This process's event loop, from one 1 ms timer: `gaps` holds the time between its fires (ns; a
 * loop that keeps up shows ~1 ms, a stall its length), and `busyMaxMs` the longest gap less the
 * time the main thread waited for a CPU in it, less the timer's 1 ms. On two busy cores a stall
 * is mostly that waiting (the agent and the other process had both CPUs); the rest is the work
 * that held this loop. The waiting is /proc/self/schedstat's second field (ns, counted as each
 * wait ends, so exact whenever this thread runs; the first field, time on a CPU, is brought up
 * to date only at scheduler ticks and switches, so it is not current for a running thread).
 * BENCH_STALL_TRACE=MS prints every gap longer than MS on stderr with its start and end on the
 * monotonic clock (µs, as a --cpu-prof profile's timestamps), to find in a profile what ran.
 */
const schedstat = fs.openSync('/proc/self/schedstat', 'r');
const schedBuf = Buffer.alloc(64);
const runnableNs = (): number => {
  const n = fs.readSync(schedstat, schedBuf, 0, schedBuf.length, 0);
  return Number(schedBuf.toString('latin1', 0, n).split(' ')[1]);
};
const stallTrace = Number(process.env.BENCH_STALL_TRACE ?? 0);
const gaps = createHistogram();
let busyMaxMs = 0;
let lastTick = process.hrtime.bigint();
let lastRunnable = runnableNs();
/** Starts a new window: what came before (a stall under way included) is not counted. */
const resetLoop = () => {
  gaps.reset();
  busyMaxMs = 0;
  lastTick = process.hrtime.bigint();
  lastRunnable = runnableNs();
};
setInterval(() => {
  const t = process.hrtime.bigint();
  const runnable = runnableNs();
  const gapNs = t - lastTick;
  const gapMs = Number(gapNs) / 1e6;
  const waitedMs = (runnable - lastRunnable) / 1e6;
  gaps.record(gapNs > 0n ? gapNs : 1n);
  busyMaxMs = Math.max(busyMaxMs, gapMs - waitedMs - 1);
  if (stallTrace && gapMs > stallTrace)
    process.stderr.write(
      `stall ${process.pid} ${client?.role ?? '-'} ${gapMs.toFixed(1)} ms (waiting for a CPU ${waitedMs.toFixed(1)} ms) from ${lastTick / 1000n} to ${t / 1000n} us\n`,
    );
  lastTick = t;
  lastRunnable = runnable;
}, 1).unref();
let routes: RibRoute[] = [];
/** The incremental phase's changes, made by churnPrepare ahead of the phase. */
let prepared: RibRoute[] = [];
/** The raw-hop limit (see checkpoint.bench.ts): frames prepared by the sender; the receiver's count. */
let rawFrames: Buffer[] = [];
let rawServer: net.Server | null = null;
let rawReceived = 0;
let rawFirstByte = 0;
let rawLastByte = 0;
let rawWaiter: (() => void) | null = null;
const send = (m: unknown) => process.send!(m);
/**
 * A turn for the client's I/O while the harness prepares millions of routes: a process that holds
 * its event loop for seconds misses the agent's keepalive and loses its connection mid-run.
 */
const yieldTurn = () => new Promise<void>((r) => setImmediate(r));
const now = () => Number(process.hrtime.bigint()) / 1e9;

/** The incremental phase's changes: the same generator and seed every time it is asked. */
async function churnUpdates(records: number): Promise<RibRoute[]> {
  const rng = createRng(7);
  const updates: RibRoute[] = [];
  for (let i = 0; i < records; i++) {
    updates.push(mutateRoute(routes[i % routes.length], rng));
    if (i % 50_000 === 0) await yieldTurn();
  }
  return updates;
}

async function pipelined(
  total: number,
  batch: number,
  window: number,
  fill: (b: ReturnType<CheckpointClient['batch']>, i: number, n: number) => void,
  table = 'rib',
): Promise<void> {
  const c = client!;
  let inflight = 0;
  let wake: (() => void) | null = null;
  for (let i = 0; i < total; i += batch) {
    const n = Math.min(batch, total - i);
    const b = c.batch(table);
    fill(b, i, n);
    inflight++;
    void b.commit().then(() => {
      inflight--;
      wake?.();
    });
    // One batch per turn, as a daemon builds its changes between its other work: acks come in
    // bursts, and refilling the window in one go built up to 16 batches (16,000 records) in one
    // turn of this process's loop, which was the harness's stall, not the SDK's.
    await yieldTurn();
    while (inflight >= window) await new Promise<void>((r) => (wake = r));
  }
  while (inflight > 0) await new Promise<void>((r) => (wake = r));
}

// The benchmark went (it failed, or its reader closed its stdout): nothing will ask this process
// to exit, so it does so itself.
process.on('disconnect', () => process.exit(0));

process.on('message', async (cmd: Cmd) => {
  try {
    if (cmd.op === 'start') {
      const t0 = now();
      client = new CheckpointClient({
        address: cmd.socket,
        process: 'bgp',
        instanceId: cmd.instance,
        vmId: cmd.instance,
        softwareVersion: '1.0.0',
        schema: 1,
        tables: [
          { name: 'rib', durability: 'ASYNC' },
          { name: 'rib-sync', durability: 'SYNC' },
        ],
        role: cmd.role,
      });
      // From here on the event-loop figure is the SDK at work (register, load, follow), not this
      // process starting up: constructing the client loads checkpoint.proto (~25 ms, once).
      resetLoop();
      await client.start();
      send({ ok: true, seconds: now() - t0 });
    } else if (cmd.op === 'load') {
      const t0 = now();
      routes = [];
      for (const r of generateRib(cmd.records)) if (routes.push(r) % 50_000 === 0) await yieldTurn();
      const gen = now() - t0;
      const t1 = now();
      await pipelined(routes.length, cmd.batch, cmd.window, (b, i, n) => {
        for (let j = i; j < i + n; j++) b.put(routes[j].key, routes[j].value);
      });
      send({ ok: true, seconds: now() - t1, generateSeconds: gen, seq: client!.table('rib').seq });
    } else if (cmd.op === 'churnPrepare') {
      // Generated before the phase's window: making a million route objects is the harness's
      // work, not the SDK's, and must not be counted as this process's event-loop stall.
      prepared = await churnUpdates(cmd.records);
      send({ ok: true });
    } else if (cmd.op === 'churn') {
      const updates = prepared.length ? prepared : await churnUpdates(cmd.records);
      prepared = [];
      const t0 = now();
      await pipelined(updates.length, cmd.batch, cmd.window, (b, i, n) => {
        for (let j = i; j < i + n; j++) b.put(updates[j].key, updates[j].value);
      });
      send({ ok: true, seconds: now() - t0, seq: client!.table('rib').seq });
    } else if (cmd.op === 'syncLatency') {
      // Keep 50k keys and drop the million route objects this worker held: a full GC over them
      // would pause this process for ~100 ms and be measured as ack latency.
      routes = routes.slice(0, 50_000);
      (globalThis as { gc?: () => void }).gc?.();
      // Open-loop offered load: a batch every `interval` ms regardless of acks; latency = submit -> ack.
      // The first `warmup` seconds run at the same rate but are not measured (JIT, first arena
      // and index growth of the new table).
      const interval = (cmd.batch / cmd.rate) * 1000;
      const lat: number[] = [];
      const rng = createRng(11);
      // Outstanding batches are counted, not kept: the harness must not hold per-batch objects
      // that the measured processes would then have to collect.
      let outstanding = 0;
      let allAcked: (() => void) | null = null;
      let failure: Error | null = null;
      const spikes: [number, number][] = [];
      const warmup = cmd.warmup ?? 1;
      // The changes are made before the clock starts (the generator must not be what is
      // measured), as packed values in one buffer: thousands of prepared batch objects would be
      // old garbage this process has to collect while it is being measured.
      const total = Math.ceil(((warmup + cmd.seconds) * cmd.rate) / cmd.batch) + 10;
      const values: Buffer[] = [];
      let valueBytes = 0;
      for (let k = 0; k < total * cmd.batch; k++) {
        const v = mutateRoute(routes[k % routes.length], rng).value;
        values.push(v);
        valueBytes += v.length;
        if (k % 50_000 === 0) await yieldTurn();
      }
      const packed = Buffer.allocUnsafe(valueBytes);
      const valueEnd = new Uint32Array(values.length);
      for (let k = 0, off = 0; k < values.length; k++) {
        off += values[k].copy(packed, off);
        valueEnd[k] = off;
      }
      values.length = 0;
      const keys = routes.map((r) => r.key);
      const batchAt = (i: number) => {
        const b = client!.batch('rib-sync');
        for (let j = 0, k = i * cmd.batch; j < cmd.batch; j++, k++) b.put(keys[k % keys.length], packed.subarray(k === 0 ? 0 : valueEnd[k - 1], valueEnd[k]));
        return b;
      };
      (globalThis as { gc?: () => void }).gc?.();
      resetLoop(); // event-loop delay from here on is what the measured batches could meet
      const t0 = now();
      let lastAck = 0;
      const measuredFromEpochMs = Date.now() + warmup * 1000;
      for (let i = 0; now() - t0 < warmup + cmd.seconds && i < total; i++) {
        const due = t0 + (i * interval) / 1000;
        const wait = (due - now()) * 1000;
        if (wait > 0.5) await new Promise((r) => setTimeout(r, wait));
        const b = batchAt(i); // copies 100 prepared records (~13 KB): tens of microseconds
        const s = now();
        const measured = s - t0 >= warmup;
        outstanding++;
        b.commit().then(
          () => {
            if (measured) {
              lastAck = now();
              const l = (lastAck - s) * 1000;
              lat.push(l);
              if (l > 5) spikes.push([Math.round((s - t0 - warmup) * 1000), Math.round(l)]);
            }
            if (--outstanding === 0) allAcked?.();
          },
          (e: Error) => {
            failure ??= e;
            if (--outstanding === 0) allAcked?.();
          },
        );
      }
      // Batches offered and not acknowledged when the last was offered: a few when the path keeps
      // up with the offered rate, a growing queue when it does not (then the latencies are
      // queueing, and `achieved` says what rate it did sustain).
      const backlogEnd = outstanding;
      if (outstanding > 0) await new Promise<void>((r) => (allAcked = r));
      if (failure) throw failure;
      const achieved = lastAck > t0 + warmup ? (lat.length * cmd.batch) / (lastAck - t0 - warmup) : 0;
      lat.sort((a, b) => a - b);
      const q = (p: number) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))];
      send({
        ok: true,
        batches: lat.length,
        records: lat.length * cmd.batch,
        seconds: now() - t0 - warmup,
        p50: q(0.5),
        p99: q(0.99),
        max: lat[lat.length - 1],
        spikes: spikes.slice(0, 60),
        achieved,
        backlogEnd,
        measuredFromEpochMs,
      });
    } else if (cmd.op === 'waitSeq') {
      // Woken by the client's events, not by polling every turn: a loop of setImmediate kept
      // this process spinning on one of the two cores while the agent and the load needed them.
      const t0 = now();
      const c = client!;
      const t = c.table(cmd.table);
      if (t.seq < cmd.seq) {
        await new Promise<void>((resolve) => {
          const check = () => {
            if (t.seq < cmd.seq) return;
            c.off('snapshot', check).off('change', check);
            clearInterval(safety);
            resolve();
          };
          c.on('snapshot', check).on('change', check);
          // A sequence set without an event (a reset) is seen within 50 ms.
          const safety = setInterval(check, 50);
        });
      }
      send({ ok: true, seconds: now() - t0 });
    } else if (cmd.op === 'loopDelay') {
      // Event-loop delay of this process (ms): a stall here is latency every peer sees.
      const r = { ok: true, p99: gaps.count ? gaps.percentile(99) / 1e6 : 0, max: gaps.count ? gaps.max / 1e6 : 0, busyMax: busyMaxMs };
      if (cmd.reset) resetLoop();
      send(r);
    } else if (cmd.op === 'churnOn') {
      // Background load while a switchover happens: a batch every 10 ms while this is the active.
      const rng = createRng(23);
      const per = Math.max(1, Math.round(cmd.rate / 100));
      if (routes.length === 0) {
        // A standby never generated the table: take keys and values from what it replicated, a
        // slice per turn until it has enough (all at once held this process's loop for ~100 ms,
        // which would count as a stall of the SDK).
        const t = client!.table('rib');
        for (let at = 0; at >= 0 && routes.length < 50_000; await yieldTurn()) {
          at = t.forEachIn(at, 4096, (key, _schema, value) => {
            if (routes.length < 50_000) routes.push({ key, value: Buffer.from(value) });
          });
        }
      }
      let k = 0;
      churnTimer = setInterval(() => {
        if (client!.role !== 'ACTIVE' || client!.frozen) return;
        const b = client!.batch('rib');
        for (let j = 0; j < per; j++, k++) b.put(routes[k % routes.length].key, mutateRoute(routes[k % routes.length], rng).value);
        b.commit().catch(() => undefined); // refused once demoted: expected
      }, 10);
      send({ ok: true });
    } else if (cmd.op === 'churnOff') {
      if (churnTimer) clearInterval(churnTimer);
      churnTimer = null;
      while (client!.inFlight > 0) await new Promise((r) => setTimeout(r, 5));
      send({ ok: true, seq: client!.table('rib').seq });
    } else if (cmd.op === 'rawPrepare') {
      // The incremental phase's changes, packed as the SDK packs a batch and framed as WRITE
      // frames: the bytes the active puts on its channel.
      const updates = await churnUpdates(cmd.records);
      rawFrames = [];
      let bytes = 0;
      for (let i = 0, seq = 1; i < cmd.records; i += cmd.batch, seq++) {
        const b = new RecordBuilder();
        for (let j = i; j < Math.min(cmd.records, i + cmd.batch); j++) b.put(updates[j].key, 1, updates[j].value);
        const { records, count } = b.take();
        const f = encodeBatch(FrameType.WRITE, { table: 'rib', seq, count, records });
        rawFrames.push(f);
        bytes += f.length;
        if (seq % 50 === 0) await yieldTurn();
      }
      send({ ok: true, bytes });
    } else if (cmd.op === 'rawSend') {
      const sock = net.connect(cmd.path);
      await new Promise<void>((res, rej) => sock.once('connect', res).once('error', rej));
      for (const f of rawFrames) if (!sock.write(f)) await new Promise<void>((r) => sock.once('drain', r));
      await new Promise<void>((r) => sock.end(r));
      rawFrames = [];
      send({ ok: true });
    } else if (cmd.op === 'rawListen') {
      fs.rmSync(cmd.path, { force: true });
      rawReceived = 0;
      rawServer = net.createServer((sock) =>
        sock.on('data', (d: Buffer) => {
          if (rawReceived === 0) rawFirstByte = now();
          rawReceived += d.length;
          rawLastByte = now();
          rawWaiter?.();
        }),
      );
      await new Promise<void>((res) => rawServer!.listen(cmd.path, res));
      send({ ok: true });
    } else if (cmd.op === 'rawDrain') {
      while (rawReceived < cmd.bytes) await new Promise<void>((r) => (rawWaiter = r));
      rawServer?.close();
      rawServer = null;
      send({ ok: true, seconds: rawLastByte - rawFirstByte });
    } else if (cmd.op === 'digest') {
      send({ ok: true, ...(await client!.digestInSlices(cmd.table)) });
    } else if (cmd.op === 'exit') {
      await client?.close();
      send({ ok: true });
      process.exit(0);
    }
  } catch (e) {
    send({ ok: false, error: (e as Error).message });
  }
});
