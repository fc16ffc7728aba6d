/**
 * Traffic as proof: a sender in the test network's sender namespace and a receiver in its
 * receiver namespace (harness/udp-flow.ts), sequence-numbered UDP through the data plane.
 * start() returns once both sockets are open; stop() stops the sender, gives the last packets
 * time to arrive, stops the receiver and returns the figures.
 */
import { ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { onInterrupt } from './interrupt-cleanup';
import type { NetLab } from './netlab';

const FLOW = path.resolve(__dirname, 'udp-flow.js');
/** After the sender stopped, packets still in queues arrive within this, ms. */
const DRAIN_MS = 500;

export interface TrafficResult {
  packetsSent: number;
  packetsReceived: number;
  packetsLost: number;
  duplicates: number;
  /** Longest time between two packets received, ms. */
  maxGapMs: number;
  /** Longest time between two sends of the sender (its own scheduling), ms: tells a sender pause from a network gap. */
  maxSendGapMs: number;
  sendErrors: number;
  seconds: number;
}

export interface Traffic {
  stop(): Promise<TrafficResult>;
  /** Kills both at once (cleanup after a failure). */
  kill(): void;
}

interface Flow {
  child: ChildProcess;
  next(event: string): Promise<Record<string, unknown>>;
}

function startFlow(ns: string, args: string[]): Flow {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, FLOW, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  // Stopped by a signal: the flow too (deleting its namespace would not end it).
  const unregister = onInterrupt(() => child.exitCode === null && child.kill('SIGKILL'));
  child.once('exit', unregister);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const lines: Record<string, unknown>[] = [];
  const waiters: (() => void)[] = [];
  readline.createInterface({ input: child.stdout! }).on('line', (l) => {
    try {
      lines.push(JSON.parse(l) as Record<string, unknown>);
    } catch {
      return;
    }
    for (const w of waiters.splice(0)) w();
  });
  let exited = false;
  child.on('exit', () => {
    exited = true;
    for (const w of waiters.splice(0)) w();
  });
  return {
    child,
    next: (event) =>
      new Promise((resolve, reject) => {
        const check = () => {
          const i = lines.findIndex((l) => l.event === event);
          if (i >= 0) return resolve(lines.splice(i, 1)[0]);
          if (exited) return reject(new Error(`udp-flow ${args[0]} in ${ns} exited before '${event}': ${stderr.trim()}`));
          waiters.push(check);
        };
        check();
      }),
  };
}

/**
 * Starts `rate` packets/s to `targets` (addresses the FIB routes cover): from the sender
 * namespace to the receiver's, or the other way with `reverse` (through what the receiver's BGP
 * peer learned from the router).
 */
export async function startTraffic(lab: NetLab, targets: string[], rate = 5000, port = 9999, reverse = false): Promise<Traffic> {
  const [from, to] = reverse ? [lab.receiver, lab.sender] : [lab.sender, lab.receiver];
  const rx = startFlow(to, ['recv', '--port', String(port)]);
  let tx: Flow | null = null;
  const kill = () => {
    for (const f of [rx, tx]) if (f && f.child.exitCode === null) f.child.kill('SIGKILL');
  };
  try {
    await rx.next('ready');
    tx = startFlow(from, ['send', '--port', String(port), '--rate', String(rate), '--targets', targets.join(',')]);
    await tx.next('ready');
  } catch (e) {
    kill();
    throw e;
  }
  const t0 = Date.now();
  const sender = tx;
  return {
    kill,
    stop: async () => {
      sender.child.stdin!.end('stop\n');
      const sent = await sender.next('sent');
      await new Promise((r) => setTimeout(r, DRAIN_MS));
      rx.child.stdin!.end('stop\n');
      const got = await rx.next('received');
      const packetsSent = Number(sent.sent);
      const unique = Number(got.unique);
      return {
        packetsSent,
        packetsReceived: unique,
        packetsLost: packetsSent - unique,
        duplicates: Number(got.duplicates),
        maxGapMs: Number(got.max_gap_ms),
        maxSendGapMs: Number(sent.max_send_gap_ms),
        sendErrors: Number(sent.errors),
        seconds: (Date.now() - t0) / 1000,
      };
    },
  };
}
