/**
 * BIRD 2 (Debian's bird2) as a BGP peer in a network namespace: a BGP implementation nobody here
 * wrote. It announces `routes` IPv4 prefixes (and a tenth as many IPv6 ones) from static
 * protocols, learns ours, and is read through its own CLI (birdc on its control socket).
 */
import { ChildProcess, execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { onInterrupt } from './interrupt-cleanup';

export interface BirdPeerOptions {
  netns: string;
  dir: string;
  routerId: string;
  localAddress: string;
  localAs: number;
  neighbor: string;
  neighborAs: number;
  /** IPv4 prefixes BIRD announces (see birdPrefixes). */
  routes: number;
  /** Next hop BIRD gives its IPv6 routes over the IPv4 session. */
  nextHop6: string;
  holdTime?: number;
  /** The neighbor is not on a directly connected subnet (BIRD resolves next hops recursively). */
  multihop?: boolean;
}

export interface BirdPeer {
  proc: ChildProcess;
  socket: string;
  /** BIRD's log file (sessions going up and down, errors). */
  log: string;
  birdc(cmd: string): Promise<string>;
  /** State, since when, and route counts of the BGP protocol `peer`, from `show protocols all`. */
  protocol(): Promise<{ state: string; since: string; imported: number; exported: number; withdrawsReceived: number; text: string }>;
  version(): Promise<string>;
  stop(): Promise<void>;
}

/** Most IPv4 prefixes BIRD can announce here (/28s of 10.0.0.0/8): a full Internet table fits. */
export const BIRD_MAX_ROUTES = 1 << 20;

/**
 * The prefixes BIRD announces, all inside the test's namespaces: `routes` IPv4 prefixes from
 * 10.0.0.0/8 (/24s up to 65,536, /28s beyond, at most BIRD_MAX_ROUTES) and a tenth as many IPv6
 * ones from 2001:db8:f000::/36 (/48s up to 4,096, /56s beyond). Canonical text.
 */
export function birdPrefixes(routes: number): { v4: string[]; v6: string[] } {
  const n4 = Math.min(routes, BIRD_MAX_ROUTES);
  const v4: string[] = [];
  if (n4 <= 65_536) for (let i = 0; i < n4; i++) v4.push(`10.${i >> 8}.${i & 255}.0/24`);
  else for (let i = 0; i < n4; i++) v4.push(`10.${i >> 12}.${(i >> 4) & 255}.${(i & 15) << 4}/28`);
  const n6 = Math.ceil(n4 / 10);
  const v6: string[] = [];
  if (n6 <= 4096) for (let i = 0; i < n6; i++) v6.push(`2001:db8:${(0xf000 + i).toString(16)}::/48`);
  else {
    for (let i = 0; i < n6; i++) {
      const g3 = (0xf000 | (i >> 8)).toString(16);
      const g4 = (i & 0xff) << 8;
      v6.push(g4 ? `2001:db8:${g3}:${g4.toString(16)}::/56` : `2001:db8:${g3}::/56`);
    }
  }
  return { v4, v6 };
}

/** Host addresses inside the first `n` IPv4 prefixes BIRD announces (traffic destinations). */
export function birdTargets(routes: number, n: number): string[] {
  return birdPrefixes(Math.min(routes, n))
    .v4.slice(0, n)
    .map((p) => {
      const o = p.split('/')[0].split('.').map(Number);
      return `${o[0]}.${o[1]}.${o[2]}.${o[3] + 1}`;
    });
}

export async function startBird(o: BirdPeerOptions): Promise<BirdPeer> {
  fs.mkdirSync(o.dir, { recursive: true });
  const conf = path.join(o.dir, 'bird.conf');
  const socket = path.join(o.dir, 'bird.ctl');
  const { v4, v6 } = birdPrefixes(o.routes);
  fs.writeFileSync(
    conf,
    [
      `router id ${o.routerId};`,
      // Its own account of what happened (sessions, errors), kept beside its socket.
      `log "${path.join(o.dir, 'bird.log')}" all;`,
      'debug protocols { states, events };',
      'protocol device {}',
      // Connected subnets: next hops of multihop sessions resolve through them.
      'protocol direct { ipv4; ipv6; }',
      // What BIRD learns goes into its namespace's kernel table: traffic to our prefixes follows
      // it, and stops if BIRD withdraws them.
      'protocol kernel k4 { ipv4 { export where source = RTS_BGP; }; }',
      'protocol kernel k6 { ipv6 { export where source = RTS_BGP; }; }',
      `protocol static s4 { ipv4; ${v4.map((p) => `route ${p} unreachable;`).join(' ')} }`,
      `protocol static s6 { ipv6; ${v6.map((p) => `route ${p} unreachable;`).join(' ')} }`,
      'protocol bgp peer {',
      `  local ${o.localAddress} as ${o.localAs};`,
      `  neighbor ${o.neighbor} as ${o.neighborAs};`,
      ...(o.multihop ? ['  multihop 2;'] : []),
      `  hold time ${o.holdTime ?? 90};`,
      '  graceful restart on;',
      '  ipv4 { import all; export where source = RTS_STATIC; };',
      `  ipv6 { import all; export where source = RTS_STATIC; next hop address ${o.nextHop6}; };`,
      '}',
      '',
    ].join('\n'),
  );
  const proc = spawn('ip', ['netns', 'exec', o.netns, 'bird', '-f', '-c', conf, '-s', socket, '-P', path.join(o.dir, 'bird.pid')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  // Stopped by a signal: BIRD too (deleting its namespace would not end it).
  const unregister = onInterrupt(() => proc.exitCode === null && proc.kill('SIGKILL'));
  proc.once('exit', unregister);
  const birdc = (cmd: string) =>
    new Promise<string>((resolve, reject) =>
      execFile('birdc', ['-s', socket, ...cmd.split(' ')], { timeout: 10_000 }, (err, out) =>
        err ? reject(new Error(`birdc ${cmd}: ${err.message} ${stderr}`)) : resolve(out),
      ),
    );
  for (let i = 0; ; i++) {
    if (proc.exitCode !== null) throw new Error(`bird exited (${proc.exitCode}): ${stderr}`);
    if (fs.existsSync(socket)) {
      try {
        await birdc('show status');
        break;
      } catch {
        // not answering yet
      }
    }
    if (i > 100) throw new Error(`bird did not open its control socket: ${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    proc,
    socket,
    log: path.join(o.dir, 'bird.log'),
    birdc,
    protocol: async () => {
      const text = await birdc('show protocols all peer');
      const line = text.split('\n').find((l) => /^peer\s/.test(l)) ?? '';
      const cols = line.trim().split(/\s+/);
      const state = /BGP state:\s+(\S+)/.exec(text)?.[1] ?? '?';
      let imported = 0;
      let exported = 0;
      for (const m of text.matchAll(/Routes:\s+(\d+) imported, (?:\d+ filtered, )?(\d+) exported/g)) {
        imported += Number(m[1]);
        exported += Number(m[2]);
      }
      let withdrawsReceived = 0;
      for (const m of text.matchAll(/Import withdraws:\s+(\d+)/g)) withdrawsReceived += Number(m[1]);
      return { state, since: `${cols[4] ?? ''} ${cols[5] ?? ''}`.trim(), imported, exported, withdrawsReceived, text };
    },
    version: async () => /BIRD ([\d.]+)/.exec(await birdc('show status'))?.[1] ?? '?',
    stop: async () => {
      if (proc.exitCode !== null) return;
      proc.kill('SIGTERM');
      await new Promise((r) => proc.once('exit', r));
    },
  };
}

export interface BirdWatch {
  /** What BIRD saw while watched (see watchBird). */
  stop(): Promise<{ resets: number; resetMs: number[]; withdrawsReceived: number; importedBefore: number; importedAfter: number }>;
}

/** "2026-11-28 12:00:47.641" in BIRD's log -> epoch ms (BIRD writes local time). */
function logTime(line: string): number {
  const m = /^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{3})/.exec(line);
  return m ? new Date(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], +m[7]).getTime() : NaN;
}

/**
 * Watches BIRD's view of its session while something (an upgrade) runs, from BIRD's own log:
 * every "BGP session closed" is a reset, lasting until its next "BGP session established" (still
 * down when watching stopped: counted to then). Withdrawals are BIRD's own count of withdrawals
 * received; imported counts are read before and after.
 */
export async function watchBird(bird: BirdPeer): Promise<BirdWatch> {
  const first = await bird.protocol();
  const from = fs.existsSync(bird.log) ? fs.statSync(bird.log).size : 0;
  return {
    stop: async () => {
      const end = await bird.protocol();
      const text = fs.readFileSync(bird.log).subarray(from).toString();
      const resetMs: number[] = [];
      let closedAt = NaN;
      for (const line of text.split('\n')) {
        if (/ peer: BGP session closed/.test(line) && Number.isNaN(closedAt)) closedAt = logTime(line);
        else if (/ peer: BGP session established/.test(line) && !Number.isNaN(closedAt)) {
          resetMs.push(logTime(line) - closedAt);
          closedAt = NaN;
        }
      }
      if (!Number.isNaN(closedAt)) resetMs.push(Date.now() - closedAt);
      return {
        resets: resetMs.length,
        resetMs,
        withdrawsReceived: end.withdrawsReceived - first.withdrawsReceived,
        importedBefore: first.imported,
        importedAfter: end.imported,
      };
    },
  };
}
