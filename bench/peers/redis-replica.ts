/**
 * redis-replica.ts — owns the "peer" measurement for the checkpoint
 * benchmark: how long a fresh Redis replica takes to hold a full copy of a
 * primary's dataset (diskless full sync), using Debian's redis-server.
 *
 * Steps: start a primary (no persistence, diskless replication with no
 * delay) on a free loopback port in a temp dir; bulk-load the records with
 * pipelined SET commands over a raw socket; spawn a fresh replica pointed at
 * it (diskless load where supported) and time from that spawn until the
 * replica reports a live link and holds every key. Both servers are killed
 * by PID and the temp dir removed, on success and on error.
 *
 * CLI: `node dist/bench/peers/redis-replica.js [N]` loads N generated BGP
 * routes (default 1,000,000) and prints one JSON line.
 */
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { generateRib } from '../../examples/bgp-rib/rib-generator';
import { RespClient, RespError } from './resp';

export interface KeyValueRecord {
  key: string | Buffer;
  value: Buffer;
}

export type RecordSource = Iterable<KeyValueRecord> | (() => Iterable<KeyValueRecord>);

export interface RedisReplicaOptions {
  /** Parent directory for the temp dir holding configs/logs (default: os.tmpdir()). */
  workDir?: string;
  /** redis-server binary (default: "redis-server" on PATH). */
  redisServer?: string;
  /** Give up on load or sync after this many milliseconds (default 600,000). */
  timeoutMs?: number;
  /** Interval between replica status polls, in milliseconds (default 2). */
  pollMs?: number;
}

export interface RedisReplicaSyncResult {
  /** Records written to the primary. */
  records: number;
  /** Keys the primary held after loading (less than `records` if keys repeated). */
  keys: number;
  /** Seconds to push all records into the primary, including producing them from the source. */
  loadSeconds: number;
  /** Seconds from spawning the replica until it had a live link and all keys. */
  syncSeconds: number;
  /** Primary's resident set size after loading (INFO used_memory_rss), bytes. */
  primaryRssBytes?: number;
  /** Replica's resident set size once synced, bytes. */
  replicaRssBytes?: number;
  /** e.g. "7.0.15". */
  redisVersion: string;
  /** repl-diskless-load mode used on the replica ("disabled" for servers without it). */
  disklessLoad: string;
}

export interface RedisServer {
  proc: ChildProcess;
  pid: number;
  port: number;
  logFile: string;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const yieldToIo = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Version of the installed redis-server as [major, minor, patch] and text. */
export function redisServerVersion(bin = 'redis-server'): { text: string; major: number; minor: number } {
  let out: string;
  try {
    out = execFileSync(bin, ['--version'], { encoding: 'utf8' });
  } catch (err) {
    throw new Error(`cannot run ${bin} --version (${err instanceof Error ? err.message : String(err)}); ` + 'install it with: apt-get install -y redis-server');
  }
  const m = /v=(\d+)\.(\d+)\.(\d+)/.exec(out);
  if (!m) throw new Error(`unrecognised redis-server --version output: ${out.trim()}`);
  return { text: `${m[1]}.${m[2]}.${m[3]}`, major: Number(m[1]), minor: Number(m[2]) };
}

/** A loopback TCP port that was free a moment ago (the server start retries on a race). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no port assigned'))));
    });
  });
}

function logTail(file: string, lines = 15): string {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

function exited(p: ChildProcess): boolean {
  return p.exitCode !== null || p.signalCode !== null;
}

/** Common flags: loopback only, no RDB/AOF persistence, log to a file in `dir`. */
function baseArgs(port: number, dir: string, name: string): string[] {
  return [
    '--port',
    String(port),
    '--bind',
    '127.0.0.1',
    '--daemonize',
    'no',
    '--save',
    '',
    '--appendonly',
    'no',
    '--dir',
    dir,
    '--dbfilename',
    `${name}.rdb`,
    '--logfile',
    path.join(dir, `${name}.log`),
  ];
}

/** Spawn redis-server; `live` tracks PIDs to kill if the Node process exits early. */
function spawnServer(bin: string, args: string[], port: number, logFile: string, live: Set<number>): RedisServer {
  const proc = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  if (proc.pid === undefined) throw new Error(`failed to spawn ${bin}`);
  const pid = proc.pid;
  live.add(pid);
  proc.once('exit', () => live.delete(pid));
  proc.stderr?.resume(); // drain; errors land in the log file
  return { proc, pid, port, logFile };
}

/** Connect to `server`, retrying every `pollMs` ms until it accepts or `deadline` (ms, performance.now()). */
async function connectWhenUp(server: RedisServer, deadline: number, pollMs: number): Promise<RespClient> {
  for (;;) {
    if (exited(server.proc)) {
      throw new Error(`redis-server on port ${server.port} exited early:\n${logTail(server.logFile)}`);
    }
    try {
      return await RespClient.connect(server.port, '127.0.0.1', 1000);
    } catch (err) {
      if (performance.now() > deadline) {
        throw new Error(`redis-server on port ${server.port} not accepting connections: ${String(err)}`);
      }
      await sleep(pollMs);
    }
  }
}

/** Start a server on a free port and wait until it answers PING; retries a few ports. */
export async function startServer(
  bin: string,
  dir: string,
  name: string,
  extra: string[],
  live: Set<number>,
): Promise<{ server: RedisServer; client: RespClient }> {
  let lastErr: unknown;
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const server = spawnServer(bin, [...baseArgs(port, dir, name), ...extra], port, path.join(dir, `${name}.log`), live);
    try {
      const client = await connectWhenUp(server, performance.now() + 10_000, 5);
      await client.command('PING');
      return { server, client };
    } catch (err) {
      lastErr = err;
      await stopServer(server);
    }
  }
  throw lastErr instanceof Error ? lastErr : new Error(String(lastErr));
}

export async function stopServer(s: RedisServer): Promise<void> {
  if (exited(s.proc)) return;
  const gone = new Promise<void>((r) => s.proc.once('exit', () => r()));
  try {
    process.kill(s.pid, 'SIGKILL');
  } catch {
    return; // already gone
  }
  // Bounded wait (5 s) for the exit event; the timer must not keep Node alive.
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([gone, new Promise<void>((r) => (timer = setTimeout(r, 5000)))]);
  clearTimeout(timer);
}

/** Parse "field:value" lines of an INFO reply. */
export function infoField(info: string, field: string): string | undefined {
  const m = new RegExp(`^${field}:(.*)$`, 'm').exec(info);
  return m ? m[1].trim() : undefined;
}

async function rssBytes(c: RespClient): Promise<number | undefined> {
  const v = infoField(await c.commandText('INFO', 'memory'), 'used_memory_rss');
  return v === undefined ? undefined : Number(v);
}

// --- bulk load --------------------------------------------------------------

const SET_HEADER = Buffer.from('*3\r\n$3\r\nSET\r\n$', 'latin1');
const CHUNK_BYTES = 1 << 20; // 1 MiB socket writes: few syscalls, bounded memory

/** Write `n` (non-negative integer) in decimal at `p`; returns the new position. */
function putDecimal(b: Buffer, p: number, n: number): number {
  if (n < 10) {
    b[p] = 48 + n;
    return p + 1;
  }
  const s = String(n);
  for (let i = 0; i < s.length; i++) b[p + i] = s.charCodeAt(i);
  return p + s.length;
}

/**
 * Pipeline SET key value for every record, one 1 MiB chunk per socket write,
 * honouring backpressure. Returns the number of records sent once the server
 * has answered all of them (a trailing DBSIZE orders after every SET).
 */
async function bulkLoad(client: RespClient, records: Iterable<KeyValueRecord>): Promise<{ sent: number; keys: number }> {
  let chunk = Buffer.allocUnsafe(CHUNK_BYTES);
  let p = 0;
  let inChunk = 0;
  let sent = 0;
  const flush = async (): Promise<void> => {
    if (inChunk === 0) return;
    // The socket keeps a reference to the chunk, so start a fresh one.
    const ok = client.writePipelined(chunk.subarray(0, p), inChunk);
    chunk = Buffer.allocUnsafe(CHUNK_BYTES);
    p = 0;
    inChunk = 0;
    // Wait for the kernel to take it if it is full; otherwise still yield so replies get read.
    if (!ok) await client.drained();
    else await yieldToIo();
  };
  for (const r of records) {
    const klen = typeof r.key === 'string' ? Buffer.byteLength(r.key, 'utf8') : r.key.length;
    const vlen = r.value.length;
    // header + "$"+len+CRLF twice + payloads + CRLF twice; 20 digits is ample for a length.
    const need = SET_HEADER.length + klen + vlen + 2 * 22 + 4;
    if (p + need > chunk.length) {
      await flush();
      if (need > chunk.length) chunk = Buffer.allocUnsafe(need);
    }
    p += SET_HEADER.copy(chunk, p);
    p = putDecimal(chunk, p, klen);
    chunk[p++] = 13;
    chunk[p++] = 10;
    p += typeof r.key === 'string' ? chunk.write(r.key, p, 'utf8') : r.key.copy(chunk, p);
    chunk[p++] = 13;
    chunk[p++] = 10;
    chunk[p++] = 36; // '$'
    p = putDecimal(chunk, p, vlen);
    chunk[p++] = 13;
    chunk[p++] = 10;
    p += r.value.copy(chunk, p);
    chunk[p++] = 13;
    chunk[p++] = 10;
    inChunk++;
    sent++;
  }
  await flush();
  const keys = await client.command('DBSIZE');
  if (client.pipelineErrors.count > 0) {
    throw new Error(`${client.pipelineErrors.count} SET commands failed, e.g. ${client.pipelineErrors.samples.join('; ')}`);
  }
  if (typeof keys !== 'number') throw new Error(`unexpected DBSIZE reply ${JSON.stringify(keys)}`);
  return { sent, keys };
}

// --- measurement ------------------------------------------------------------

/**
 * Load `records` into a fresh primary, then time a fresh replica's full sync.
 * See the file header for the procedure.
 */
export async function measureRedisReplicaFullSync(records: RecordSource, opts?: RedisReplicaOptions): Promise<RedisReplicaSyncResult> {
  const bin = opts?.redisServer ?? 'redis-server';
  const timeoutMs = opts?.timeoutMs ?? 600_000;
  const pollMs = opts?.pollMs ?? 2;
  const version = redisServerVersion(bin);
  // repl-diskless-load exists since 6.0; a fresh replica has an empty DB, so
  // on-empty-db loads straight from the socket without a swap copy.
  const disklessLoad = version.major >= 6 ? 'on-empty-db' : 'disabled';

  const parent = opts?.workDir ?? os.tmpdir();
  fs.mkdirSync(parent, { recursive: true });
  const dir = fs.mkdtempSync(path.join(parent, 'redis-replica-'));
  const live = new Set<number>();
  // Last-resort cleanup if the Node process exits while servers still run.
  const onExit = (): void => {
    for (const pid of live) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
  };
  process.on('exit', onExit);

  const servers: RedisServer[] = [];
  const clients: RespClient[] = [];
  try {
    // Primary: diskless sync with no delay, so the transfer starts at once.
    const primary = await startServer(bin, dir, 'primary', ['--repl-diskless-sync', 'yes', '--repl-diskless-sync-delay', '0'], live);
    servers.push(primary.server);
    clients.push(primary.client);

    const source = typeof records === 'function' ? records() : records;
    const loadStart = performance.now();
    const loaded = await bulkLoad(primary.client, source);
    const loadSeconds = (performance.now() - loadStart) / 1000;
    const primaryRssBytes = await rssBytes(primary.client);

    // Replica: timed from just before spawn.
    const replicaPort = await freePort();
    const replicaArgs = [...baseArgs(replicaPort, dir, 'replica'), '--replicaof', '127.0.0.1', String(primary.server.port)];
    if (disklessLoad !== 'disabled') replicaArgs.push('--repl-diskless-load', disklessLoad);
    const syncStart = performance.now();
    const deadline = syncStart + timeoutMs;
    const replica = spawnServer(bin, replicaArgs, replicaPort, path.join(dir, 'replica.log'), live);
    servers.push(replica);
    const rc = await connectWhenUp(replica, deadline, pollMs);
    clients.push(rc);
    for (;;) {
      if (exited(replica.proc)) throw new Error(`replica exited during sync:\n${logTail(replica.logFile)}`);
      let done = false;
      try {
        const info = await rc.commandText('INFO', 'replication');
        if (infoField(info, 'master_link_status') === 'up') {
          done = (await rc.command('DBSIZE')) === loaded.keys;
        }
      } catch (err) {
        // -LOADING while the RDB streams in is expected; anything else is not.
        if (!(err instanceof RespError && err.message.startsWith('LOADING'))) throw err;
      }
      if (done) break;
      if (performance.now() > deadline) {
        throw new Error(`replica not in sync after ${timeoutMs} ms:\n${logTail(replica.logFile)}`);
      }
      await sleep(pollMs);
    }
    const syncSeconds = (performance.now() - syncStart) / 1000;
    const replicaRssBytes = await rssBytes(rc);
    // Let the primary reap its RDB-streaming fork child (serverCron, ~100 ms)
    // before we kill it, so no orphan is left behind. Not timed.
    const reapDeadline = performance.now() + 3000;
    while (performance.now() < reapDeadline) {
      const info = await primary.client.commandText('INFO', 'persistence');
      if (infoField(info, 'rdb_bgsave_in_progress') !== '1') break;
      await sleep(10);
    }

    return {
      records: loaded.sent,
      keys: loaded.keys,
      loadSeconds,
      syncSeconds,
      primaryRssBytes,
      replicaRssBytes,
      redisVersion: version.text,
      disklessLoad,
    };
  } finally {
    for (const c of clients) c.close();
    await Promise.all(servers.map((s) => stopServer(s)));
    process.off('exit', onExit);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// --- CLI ----------------------------------------------------------------------

if (require.main === module) {
  const arg = process.argv[2];
  const n = arg === undefined ? 1_000_000 : Number(arg);
  if (!Number.isInteger(n) || n < 0) {
    console.error(`usage: redis-replica.js [records]   (got ${arg})`);
    process.exit(2);
  }
  measureRedisReplicaFullSync(() => generateRib(n, { seed: 1 }))
    .then((r) => {
      console.log(
        JSON.stringify({
          bench: 'redis-replica-full-sync',
          records: r.records,
          seconds: r.syncSeconds,
          load_seconds: r.loadSeconds,
          primary_rss_bytes: r.primaryRssBytes,
          replica_rss_bytes: r.replicaRssBytes,
          redis_version: r.redisVersion,
          diskless_load: r.disklessLoad,
        }),
      );
    })
    .catch((err: unknown) => {
      console.error(err instanceof Error ? (err.stack ?? err.message) : String(err));
      process.exitCode = 1;
    });
}
