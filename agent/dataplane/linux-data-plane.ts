/**
 * The data plane as a Linux network namespace (a named one, `ip netns`, or the agent's own),
 * programmed with iproute2: `ip -batch` for routes (one process per batch, thousands of routes
 * per process), `ip -j addr` for the ports, `ip route show proto N` to read back what the agent
 * programmed.
 *
 * Every route the agent installs carries the routing protocol number ROUTE_PROTO, so reading and
 * reconciling touch only those: connected routes, and anything an operator added by hand, are
 * never read as ours nor removed.
 *
 * Why iproute2 and not a netlink library: `ip -batch` is the reference peer of the FIB benchmark
 * (bench/fib.bench.ts), and the agent's programming is measured against it; a netlink binding
 * would be a native dependency for both architectures for a gain the benchmark does not show.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import readline from 'node:readline';
import type { ApplyResult, DataPlane, DataPlaneInterface, DataPlaneProbe, InterfaceAddress, RouteChange } from './data-plane';
import { FibEntry, FibNextHop, addressBytes } from './fib-entry';

/**
 * rtnetlink protocol number of the routes the agent programs (`proto 201` in `ip route`).
 * Unassigned in iproute2's rt_protos (0-4 are the kernel's, 8-192 name other daemons).
 */
export const ROUTE_PROTO = 201;

/** Changes per `ip -batch` process: bounds the memory of one batch's text and stderr. */
const LINES_PER_PROCESS = 250_000;

interface IpAddrJson {
  ifname: string;
  operstate?: string;
  flags?: string[];
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

export class LinuxDataPlane implements DataPlane {
  readonly target: string;
  /** `-n NAME` for a named namespace, nothing for the agent's own. */
  private readonly nsArgs: string[];

  /** `netns` null: the agent's own network namespace (a real deployment). */
  constructor(readonly netns: string | null) {
    this.target = netns ? `network namespace ${netns}` : 'host network namespace';
    this.nsArgs = netns ? ['-n', netns] : [];
  }

  probe(): Promise<DataPlaneProbe> {
    return new Promise((resolve) => {
      if (process.getuid && process.getuid() !== 0) {
        return resolve({ usable: false, reason: 'the agent does not run as root (programming routes needs CAP_NET_ADMIN)' });
      }
      execFile('ip', [...this.nsArgs, '-j', 'link', 'show'], { timeout: 10_000 }, (err, _out, stderr) => {
        if (!err) return resolve({ usable: true, reason: '' });
        const why = (stderr || err.message).trim().split('\n').pop() ?? err.message;
        const hint = this.netns ? ` (create it with 'ip netns add ${this.netns}', or start the agent with --dataplane host)` : '';
        resolve({ usable: false, reason: `${this.target} cannot be read: ${why}${hint}` });
      });
    });
  }

  interfaces(): Promise<DataPlaneInterface[]> {
    return new Promise((resolve, reject) => {
      execFile('ip', [...this.nsArgs, '-j', 'addr', 'show'], { timeout: 10_000, maxBuffer: 64 << 20 }, (err, out, stderr) => {
        if (err) return reject(new Error(`reading the ports of the ${this.target} failed: ${(stderr || err.message).trim()}`));
        resolve(parseInterfaces(out));
      });
    });
  }

  interfacesSync(): DataPlaneInterface[] {
    return parseInterfaces(execFileSync('ip', [...this.nsArgs, '-j', 'addr', 'show'], { timeout: 10_000, encoding: 'utf8', maxBuffer: 64 << 20 }));
  }

  async readRoutes(): Promise<Map<string, FibEntry>> {
    const out = new Map<string, FibEntry>();
    for (const family of ['-4', '-6'] as const) await this.readFamily(family, out);
    return out;
  }

  /** Streams `ip route show proto N` line by line: a million routes is about 50 MB of text. */
  private readFamily(family: '-4' | '-6', out: Map<string, FibEntry>): Promise<void> {
    return new Promise((resolve, reject) => {
      const child = spawn('ip', [...this.nsArgs, family, 'route', 'show', 'table', 'main', 'proto', String(ROUTE_PROTO)], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const rl = readline.createInterface({ input: child.stdout, crlfDelay: Infinity });
      let current: { prefix: string; entry: FibEntry } | null = null;
      const hostLen = family === '-4' ? 32 : 128;
      rl.on('line', (line) => {
        if (line.startsWith('\t') || line.startsWith(' ')) {
          // "\tnexthop via 198.51.100.2 dev port2 weight 1"
          const hop = parseHop(line.trim().split(/\s+/).slice(1));
          if (current && hop) current.entry.nextHops.push(hop);
          return;
        }
        const words = line.trim().split(/\s+/);
        if (!words[0]) return;
        let prefix = words[0] === 'default' ? (family === '-4' ? '0.0.0.0/0' : '::/0') : words[0];
        if (!prefix.includes('/')) prefix = `${prefix}/${hostLen}`;
        const hop = parseHop(words.slice(1));
        current = { prefix, entry: { nextHops: hop && hop.interface ? [hop] : [] } };
        out.set(prefix, current.entry);
      });
      child.on('error', reject);
      child.on('close', (code) => {
        if (code === 0) resolve();
        else reject(new Error(`reading the routes of the ${this.target} failed: ${stderr.trim() || `ip exited with ${code}`}`));
      });
    });
  }

  async apply(changes: RouteChange[]): Promise<ApplyResult> {
    const result: ApplyResult = { applied: 0, failed: [] };
    for (let i = 0; i < changes.length; i += LINES_PER_PROCESS) {
      const part = changes.slice(i, i + LINES_PER_PROCESS);
      const r = await this.applyPart(part);
      result.applied += r.applied;
      result.failed.push(...r.failed);
    }
    return result;
  }

  private applyPart(changes: RouteChange[]): Promise<ApplyResult> {
    return new Promise((resolve, reject) => {
      // -force: a refused line does not stop the rest; ip names each failed line on stderr.
      const child = spawn('ip', [...this.nsArgs, '-force', '-batch', '-'], { stdio: ['pipe', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('error', reject);
      child.stdin.on('error', () => undefined); // ip died early: its exit says why
      child.on('close', (code) => {
        const failedLines = parseBatchErrors(stderr);
        if (code !== 0 && failedLines.size === 0) {
          return reject(new Error(`programming the ${this.target} failed: ${stderr.trim() || `ip exited with ${code}`}`));
        }
        const failed: ApplyResult['failed'] = []; // in line order, as ip reports them
        for (const [line, error] of failedLines) {
          const c = changes[line - 1];
          if (!c) continue;
          // Removing a route the kernel no longer holds is what was wanted.
          if (c.entry === null && /No such process/.test(error)) continue;
          failed.push({ prefix: c.prefix, error });
        }
        resolve({ applied: changes.length - failed.length, failed });
      });
      // Written in chunks, with backpressure: a million lines must not be one string.
      let i = 0;
      const writeMore = () => {
        while (i < changes.length) {
          let chunk = '';
          for (const end = Math.min(changes.length, i + 2000); i < end; i++) chunk += routeCommand(changes[i]) + '\n';
          if (!child.stdin.write(chunk)) return child.stdin.once('drain', writeMore);
        }
        child.stdin.end();
      };
      writeMore();
    });
  }

  async adoptTap(ownerPid: number, tap: string, bridge: string): Promise<void> {
    // Into the data plane's namespace: by name, or, for the agent's own, by the agent's pid.
    const where = this.netns ?? String(process.pid);
    await run('nsenter', ['-t', String(ownerPid), '-n', 'ip', 'link', 'set', tap, 'netns', where]);
    const links = await run('ip', [...this.nsArgs, '-j', 'link', 'show']);
    if (!(JSON.parse(links) as { ifname: string }[]).some((l) => l.ifname === bridge)) {
      await run('ip', [...this.nsArgs, 'link', 'add', bridge, 'type', 'bridge']).catch(async (e: Error) => {
        // Two VMs starting at once: the other one created it.
        if (!/File exists/.test(e.message)) throw e;
      });
    }
    await run('ip', [...this.nsArgs, 'link', 'set', bridge, 'up']);
    await run('ip', [...this.nsArgs, 'link', 'set', tap, 'master', bridge, 'up']);
  }
}

/**
 * The MAC every control-plane VM's NIC carries: locally administered (02:...), derived from the
 * bridge name so it is the same on every start of the agent and differs between routers' bridges.
 */
export function controlPlaneMac(bridge: string): string {
  const h = crypto.createHash('sha256').update(`hitless-cp:${bridge}`).digest();
  return ['02', ...[...h.subarray(0, 5)].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: 10_000, encoding: 'utf8' }, (err, out, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${(stderr || err.message).trim()}`));
      else resolve(out);
    });
  });
}

/** `ip -batch` lines: `route replace P proto N via G dev I` or with `nexthop ...` per hop. */
export function routeCommand(c: RouteChange): string {
  if (!c.entry) return `route del ${c.prefix} proto ${ROUTE_PROTO}`;
  const hops = c.entry.nextHops;
  const hop = (h: FibNextHop) => `${h.gateway ? `via ${h.gateway} ` : ''}dev ${h.interface}`;
  if (hops.length === 1) return `route replace ${c.prefix} proto ${ROUTE_PROTO} ${hop(hops[0])}`;
  return `route replace ${c.prefix} proto ${ROUTE_PROTO} ${hops.map((h) => `nexthop ${hop(h)} weight ${h.weight || 1}`).join(' ')}`;
}

/** "via G dev I weight W ..." -> a next hop (other words ignored). */
function parseHop(words: string[]): FibNextHop | null {
  const h: FibNextHop = { gateway: '', interface: '', weight: 1 };
  for (let i = 0; i < words.length - 1; i++) {
    if (words[i] === 'via') h.gateway = words[i + 1] === 'inet' || words[i + 1] === 'inet6' ? words[++i + 1] : words[i + 1];
    else if (words[i] === 'dev') h.interface = words[i + 1];
    else if (words[i] === 'weight') h.weight = Number(words[i + 1]) || 1;
  }
  return h.interface ? h : null;
}

/**
 * `ip -force -batch` stderr: each failed line is reported as its error message(s) followed by
 * "Command failed -:N". Returns line number -> message.
 */
export function parseBatchErrors(stderr: string): Map<number, string> {
  const out = new Map<number, string>();
  let msg: string[] = [];
  for (const line of stderr.split('\n')) {
    const m = /^Command failed -:(\d+)/.exec(line);
    if (m) {
      out.set(Number(m[1]), msg.join('; ') || 'refused');
      msg = [];
    } else if (line.trim()) msg.push(line.trim());
  }
  return out;
}

function parseInterfaces(json: string): DataPlaneInterface[] {
  return (JSON.parse(json) as IpAddrJson[]).map((l) => ({
    name: l.ifname,
    up: (l.flags ?? []).includes('UP'),
    addresses: (l.addr_info ?? [])
      .filter((a) => a.family === 'inet' || a.family === 'inet6')
      .map((a): InterfaceAddress | null => {
        const bytes = addressBytes(a.local);
        return bytes ? { family: a.family === 'inet' ? 4 : 6, bytes, length: a.prefixlen, text: `${a.local}/${a.prefixlen}` } : null;
      })
      .filter((a): a is InterfaceAddress => a !== null),
  }));
}
