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
 * Every `ip` runs through the agent's command runner (host/command-runner.ts): starting a process
 * from the agent itself held its event loop for 20-70 ms each time.
 *
 * Why iproute2 and not a netlink library: `ip -batch` is the reference peer of the FIB benchmark
 * (bench/fib.bench.ts), and the agent's programming is measured against it; a netlink binding
 * would be a native dependency for both architectures for a gain the benchmark does not show.
 */
import crypto from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { CommandRunner, failureText, hostCommands } from '../host/command-runner';
import type { ApplyResult, DataPlane, DataPlaneInterface, DataPlaneProbe, InterfaceAddress, RouteChange } from './data-plane';
import { FibNextHop, addressBytes, joinNextHopKeys, nextHopKey } from './fib-entry';

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
  constructor(
    readonly netns: string | null,
    private readonly commands: CommandRunner = hostCommands,
  ) {
    this.target = netns ? `network namespace ${netns}` : 'host network namespace';
    this.nsArgs = netns ? ['-n', netns] : [];
  }

  async probe(): Promise<DataPlaneProbe> {
    if (process.getuid && process.getuid() !== 0) {
      return { usable: false, reason: 'the agent does not run as root (programming routes needs CAP_NET_ADMIN)' };
    }
    const r = await this.commands.run('ip', [...this.nsArgs, '-j', 'link', 'show']);
    if (r.code === 0) return { usable: true, reason: '' };
    const why = r.errno === 'ENOENT' ? 'iproute2 is not installed (apt-get install iproute2)' : (failureText(r).split('\n').pop() ?? '');
    const hint = this.netns ? ` (create it with 'ip netns add ${this.netns}', or start the agent with --dataplane host)` : '';
    return { usable: false, reason: `${this.target} cannot be read: ${why}${hint}` };
  }

  async interfaces(): Promise<DataPlaneInterface[]> {
    const r = await this.commands.run('ip', [...this.nsArgs, '-j', 'addr', 'show']);
    if (r.code !== 0) throw new Error(`reading the ports of the ${this.target} failed: ${failureText(r)}`);
    return parseInterfaces(r.stdout);
  }

  watchInterfaces(onChange: () => void): () => void {
    // One line per link or address change; the content is not needed, only that one happened.
    let stopped = false;
    let cmd: ReturnType<CommandRunner['stream']> | null = null;
    const watch = () => {
      cmd = this.commands.stream('ip', [...this.nsArgs, '-o', 'monitor', 'link', 'address'], { onStdout: () => onChange(), background: true });
      void cmd.done.then(() => {
        // ip monitor ended (the namespace went away, the runner restarted): the periodic
        // refresh still covers changes; watch again after a pause so a failure cannot spin.
        if (!stopped) setTimeout(() => !stopped && watch(), 5000).unref();
      });
    };
    watch();
    return () => {
      stopped = true;
      cmd?.kill();
    };
  }

  async readRoutes(): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const family of ['-4', '-6'] as const) await this.readFamily(family, out);
    return out;
  }

  /**
   * Reads `ip route show proto N` (a million routes is about 50 MB of text) as it arrives, and
   * parses it a few milliseconds at a time: output can arrive faster than it is parsed, and one
   * turn of the event loop then brings many chunks (one parse of all of them held the loop for
   * 200 ms at 23,000 routes).
   */
  private async readFamily(family: '-4' | '-6', out: Map<string, string>): Promise<void> {
    const chunks: Buffer[] = [];
    let wake: (() => void) | null = null;
    const cmd = this.commands.stream('ip', [...this.nsArgs, family, 'route', 'show', 'table', 'main', 'proto', String(ROUTE_PROTO)], {
      onStdout: (chunk) => {
        chunks.push(chunk);
        wake?.();
      },
    });
    let ended = false;
    void cmd.done.then(() => {
      ended = true;
      wake?.();
    });
    const hostLen = family === '-4' ? 32 : 128;
    // A multipath route's next hops come on the lines after it: collected, then keyed.
    let current: RouteInProgress = null;
    const done = () => {
      if (current) out.set(current.prefix, joinNextHopKeys(current.hops));
      current = null;
    };
    let rest = '';
    let until = performance.now() + PARSE_SLICE_MS;
    for (;;) {
      const chunk = chunks.shift();
      if (!chunk) {
        if (ended) break;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = null;
        until = performance.now() + PARSE_SLICE_MS;
        continue;
      }
      const lines = (rest + chunk.toString('latin1')).split('\n');
      rest = lines.pop()!;
      // A chunk holds up to ~900 routes: the time is looked at every 64.
      for (let i = 0; i < lines.length; i++) {
        current = parseRouteLine(lines[i], family, hostLen, current, done);
        if ((i & 63) === 63 && performance.now() > until) {
          await new Promise<void>((resolve) => setImmediate(resolve));
          until = performance.now() + PARSE_SLICE_MS;
        }
      }
    }
    if (rest) current = parseRouteLine(rest, family, hostLen, current, done);
    done();
    const r = await cmd.done;
    if (r.code !== 0 || r.error) throw new Error(`reading the routes of the ${this.target} failed: ${failureText(r)}`);
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

  private async applyPart(changes: RouteChange[]): Promise<ApplyResult> {
    // -force: a refused line does not stop the rest; ip names each failed line on stderr.
    const cmd = this.commands.stream('ip', [...this.nsArgs, '-force', '-batch', '-'], { stdin: true });
    // Written in chunks, each once ip took the one before: a million lines must not be one string.
    let ended = false;
    void cmd.done.then(() => (ended = true));
    for (let i = 0; i < changes.length && !ended;) {
      let chunk = '';
      for (const end = Math.min(changes.length, i + 2000); i < end; i++) chunk += routeCommand(changes[i]) + '\n';
      await cmd.write(chunk);
    }
    cmd.end();
    const r = await cmd.done;
    // Every failed line is named on stderr (whole: LINES_PER_PROCESS lines of errors fit the
    // runner's 64 MiB limit).
    const failedLines = parseBatchErrors(r.stderr);
    if ((r.code !== 0 || r.error) && failedLines.size === 0) throw new Error(`programming the ${this.target} failed: ${failureText(r)}`);
    const failed: ApplyResult['failed'] = []; // in line order, as ip reports them
    for (const [line, error] of failedLines) {
      const c = changes[line - 1];
      if (!c) continue;
      // Removing a route the kernel no longer holds is what was wanted.
      if (c.entry === null && /No such process/.test(error)) continue;
      failed.push({ prefix: c.prefix, error });
    }
    return { applied: changes.length - failed.length, failed };
  }

  async adoptTap(ownerPid: number, tap: string, bridge: string): Promise<void> {
    // Into the data plane's namespace: by name, or, for the agent's own, by the agent's pid.
    const where = this.netns ?? String(process.pid);
    const run = (cmd: string, args: string[]) => this.commands.output(cmd, args);
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

/** `ip -batch` lines: `route replace P proto N via G dev I` or with `nexthop ...` per hop. */
export function routeCommand(c: RouteChange): string {
  if (!c.entry) return `route del ${c.prefix} proto ${ROUTE_PROTO}`;
  const hops = c.entry.nextHops;
  const hop = (h: FibNextHop) => `${h.gateway ? `via ${h.gateway} ` : ''}dev ${h.interface}`;
  if (hops.length === 1) return `route replace ${c.prefix} proto ${ROUTE_PROTO} ${hop(hops[0])}`;
  return `route replace ${c.prefix} proto ${ROUTE_PROTO} ${hops.map((h) => `nexthop ${hop(h)} weight ${h.weight || 1}`).join(' ')}`;
}

/** Parsing route text yields the event loop after this long, ms. */
const PARSE_SLICE_MS = 4;

/** A route being read: its prefix and the nextHopKey text of each next hop so far. */
type RouteInProgress = { prefix: string; hops: string[] } | null;

/**
 * One line of `ip route show`: a route ("P via G dev I ...": `done` ends the one before, and it
 * is returned as the current one) or a next hop of the current multipath route
 * ("\tnexthop via G dev I weight W"). Reads words in place: a table of a million routes is
 * read after every switchover, and splitting each line into arrays of words and objects gave
 * the collector most of its work then.
 */
function parseRouteLine(line: string, family: '-4' | '-6', hostLen: number, current: RouteInProgress, done: () => void): RouteInProgress {
  const first = line.charCodeAt(0);
  if (first === 9 || first === 32) {
    // "\tnexthop via G dev I weight W": the hop's words follow the first word.
    const hop = hopKeyAt(line, skipWord(line, skipSpace(line, 0)));
    if (current && hop !== null) current.hops.push(hop);
    return current;
  }
  const start = skipSpace(line, 0);
  const end = skipWord(line, start);
  if (end === start) return current;
  done();
  let prefix = line.slice(start, end);
  if (prefix === 'default') prefix = family === '-4' ? '0.0.0.0/0' : '::/0';
  else if (!prefix.includes('/')) prefix = `${prefix}/${hostLen}`;
  const hop = hopKeyAt(line, end);
  return { prefix, hops: hop !== null ? [hop] : [] };
}

function skipSpace(line: string, i: number): number {
  while (i < line.length && (line.charCodeAt(i) === 32 || line.charCodeAt(i) === 9)) i++;
  return i;
}

function skipWord(line: string, i: number): number {
  while (i < line.length && line.charCodeAt(i) !== 32 && line.charCodeAt(i) !== 9) i++;
  return i;
}

/**
 * The next hop described from `i` on ("via G dev I weight W ...", other words ignored) as
 * nextHopKey text, or null without a device.
 */
function hopKeyAt(line: string, i: number): string | null {
  let gateway = '';
  let device = '';
  let weight = 1;
  const word = (): string => {
    i = skipSpace(line, i);
    const s = i;
    i = skipWord(line, i);
    return line.slice(s, i);
  };
  for (;;) {
    i = skipSpace(line, i);
    if (i >= line.length) break;
    if (line.startsWith('via ', i)) {
      i += 4;
      gateway = word();
      if (gateway === 'inet' || gateway === 'inet6') gateway = word();
    } else if (line.startsWith('dev ', i)) {
      i += 4;
      device = word();
    } else if (line.startsWith('weight ', i)) {
      i += 7;
      weight = Number(word()) || 1;
    } else i = skipWord(line, i);
  }
  // The same text as the table side's (fib-entry's nextHopKey): the reconciliation compares them.
  return device ? nextHopKey({ gateway, interface: device, weight }) : null;
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
