/**
 * redis-wait.ts: the peer of the checkpoint benchmark's SYNC-ack line. A Redis primary with one
 * replica (Debian's redis-server, loopback, no persistence); the writer sends `batch` SETs and
 * then `WAIT 1 1000` on one connection, one such round every batch / rate seconds whether or not
 * earlier rounds were answered (open loop, as the SYNC-ack line offers its load). The latency of
 * a round is from its write to the WAIT reply: the primary got the SETs, the replica acknowledged
 * them, the primary told the writer. The same path as a SYNC table's: writer -> agent -> standby
 * -> agent -> writer.
 *
 * Values are the benchmark's own (route attributes of ~100 bytes) over a fixed set of keys,
 * prepared before the clock starts. Both servers are killed by PID, on success and on error.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { encodeCommand } from './resp';
import { RedisServer, infoField, startServer, stopServer } from './redis-replica';

export interface RedisWaitOptions {
  /** Records per second offered. */
  rate: number;
  /** SETs per round (one WAIT each). */
  batch: number;
  /** Measured seconds, after `warmup` unmeasured seconds at the same rate. */
  seconds: number;
  warmup: number;
  keys: Buffer[];
  values: Buffer[];
}

export interface RedisWaitResult {
  rounds: number;
  records: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** Rounds whose WAIT reported fewer than one replica (timed out): 0 when the replica kept up. */
  unreplicated: number;
  /** Records acknowledged in the measured window per second, up to the last acknowledgement. */
  achievedRecordsPerS: number;
  /** Rounds sent and not acknowledged when the last was sent (a growing queue: not keeping up). */
  backlogEnd: number;
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;

export async function measureRedisWait(o: RedisWaitOptions): Promise<RedisWaitResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'redis-wait-'));
  const live = new Set<number>();
  const started: { server: RedisServer; client: { close(): void } }[] = [];
  try {
    const primary = await startServer('redis-server', dir, 'primary', [], live);
    started.push(primary);
    const replica = await startServer('redis-server', dir, 'replica', ['--replicaof', '127.0.0.1', String(primary.server.port)], live);
    started.push(replica);
    for (const deadline = Date.now() + 10_000; ;) {
      if (infoField(await replica.client.commandText('INFO', 'replication'), 'master_link_status') === 'up') break;
      if (Date.now() > deadline) throw new Error('the Redis replica did not link up in 10 s');
      await new Promise((r) => setTimeout(r, 20));
    }
    const pc = primary.client;
    // Every round's commands, encoded before the clock starts.
    const interval = (o.batch / o.rate) * 1000;
    const total = Math.ceil(((o.warmup + o.seconds) * o.rate) / o.batch);
    const rounds: Buffer[] = [];
    for (let i = 0, k = 0; i < total; i++) {
      const cmds: Buffer[] = [];
      for (let j = 0; j < o.batch; j++, k++) cmds.push(encodeCommand(['SET', o.keys[k % o.keys.length], o.values[k % o.values.length]]));
      rounds.push(Buffer.concat(cmds));
    }
    const lat: number[] = [];
    let unreplicated = 0;
    const pending: Promise<void>[] = [];
    let outstanding = 0;
    let lastAck = 0;
    const t0 = performance.now();
    for (let i = 0; i < total; i++) {
      const wait = t0 + i * interval - performance.now();
      if (wait > 0.5) await new Promise((r) => setTimeout(r, wait));
      const s = performance.now();
      const measured = s - t0 >= o.warmup * 1000;
      pc.writePipelined(rounds[i], o.batch);
      outstanding++;
      pending.push(
        pc.command('WAIT', 1, 1000).then((n) => {
          outstanding--;
          if (!measured) return;
          lastAck = performance.now();
          lat.push(lastAck - s);
          if (Number(n) < 1) unreplicated++;
        }),
      );
    }
    const backlogEnd = outstanding;
    await Promise.all(pending);
    lat.sort((a, b) => a - b);
    const window = (lastAck - t0) / 1000 - o.warmup;
    return {
      rounds: lat.length,
      records: lat.length * o.batch,
      p50Ms: percentile(lat, 50),
      p99Ms: percentile(lat, 99),
      maxMs: lat[lat.length - 1] ?? 0,
      unreplicated,
      achievedRecordsPerS: window > 0 ? (lat.length * o.batch) / window : 0,
      backlogEnd,
    };
  } finally {
    for (const x of started) x.client.close();
    await Promise.all(started.map((x) => stopServer(x.server)));
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
