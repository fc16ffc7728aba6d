/**
 * Starts hitlessd as a real OS process for tests and benchmarks, waits for its ready line, and
 * stops it (SIGTERM, or SIGKILL to simulate a crash). Every started agent is tracked so a test's
 * `after` hook can stop whatever is left, also when the test failed.
 */
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { endProcess, exitOf } from './child-process';
import { onInterrupt } from './interrupt-cleanup';
import { QemuReaper } from './qemu-reaper';

export interface AgentHandle {
  proc: ChildProcess;
  pid: number;
  socket: string;
  stateDir: string;
  tcp: string | null;
  /** The agent's ready line (grpcTls, metrics, ...). */
  ready: Record<string, unknown>;
  stderr: () => string;
  /** stdout after the ready line (normally empty; V8 traces when asked for). */
  stdout: () => string;
  stop(): Promise<void>;
  kill9(): Promise<void>;
}

const running = new Set<AgentHandle>();
export const AGENT_MAIN = path.resolve(__dirname, '../agent/main.js');

let nodeFlags: string[] | null = null;

/**
 * The Node flags hitlessd runs with: those on its first line (`#!/usr/bin/env -S node FLAGS`),
 * which scripts/install.sh's wrapper uses too. An agent started here runs as it does installed.
 * Read once per process.
 */
export function agentNodeFlags(): string[] {
  if (nodeFlags) return nodeFlags;
  const first = fs.readFileSync(AGENT_MAIN, 'utf8').split('\n', 1)[0];
  const m = /^#!\/usr\/bin\/env -S node((?: +-[^ ]+)*) *$/.exec(first);
  if (!m) throw new Error(`${AGENT_MAIN} does not start with '#!/usr/bin/env -S node FLAGS' (found '${first}')`);
  return (nodeFlags = m[1].split(' ').filter(Boolean));
}

/** Directories tempDir() made and removeTempDirs() has not removed yet. */
const madeDirs = new Set<string>();

/** A new directory under the system's temporary one; removeTempDirs() removes it. */
export function tempDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `hitless-${prefix}-`));
  madeDirs.add(dir);
  return dir;
}

/**
 * Removes every directory tempDir() made (agents' state directories among them: a 1M-record
 * benchmark leaves ~240 MB). Call it once nothing runs in them any more: the test run's root
 * `afterAll` (test/helpers/root-hooks.ts) after stopAllAgents(), a benchmark's end.
 */
export function removeTempDirs(): void {
  for (const dir of madeDirs) fs.rmSync(dir, { recursive: true, force: true });
  madeDirs.clear();
}

/** Leaves `dir` (made by tempDir()) in place when the others are removed: to be looked at after the run. */
export function keepTempDir(dir: string): void {
  madeDirs.delete(dir);
}

// A run that ends without its cleanup (an uncaught error, EPIPE on stdout when the reader went,
// a signal: harness/interrupt-cleanup.ts exits after ending the agents) must not leave agents,
// their guests or their directories behind. Every step is synchronous, so it can run on 'exit'.
process.on('exit', () => {
  const reaper = new QemuReaper();
  for (const h of running) {
    h.proc.kill('SIGKILL');
    reaper.trackStateDir(h.stateDir);
  }
  reaper.reap();
  try {
    removeTempDirs();
  } catch {
    // An agent killed just now may still be writing in its directory: left for the OS's cleanup.
  }
});

export async function startAgent(opts: { stateDir?: string; tcp?: boolean; args?: string[]; nodeArgs?: string[] } = {}): Promise<AgentHandle> {
  const stateDir = opts.stateDir ?? tempDir('agent');
  const socket = path.join(stateDir, 'agent.sock');
  const args = [
    ...agentNodeFlags(),
    ...(opts.nodeArgs ?? []),
    AGENT_MAIN,
    '--state-dir',
    stateDir,
    '--grpc-socket',
    socket,
    ...(opts.tcp ? ['--grpc-tcp', '127.0.0.1:0'] : []),
    ...(opts.args ?? []),
  ];
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  let out2 = '';
  proc.stderr!.on('data', (d) => {
    err += d.toString();
    if (err.length > 1_000_000) err = err.slice(-500_000);
  });
  const ready = await new Promise<{ grpcTcp: string | null } & Record<string, unknown>>((resolve, reject) => {
    let out = '';
    const onData = (d: Buffer) => {
      out += d.toString();
      // The ready line is the first JSON line (V8 traces, when asked for, may come before it).
      const m = /^\{"event":"ready".*$/m.exec(out);
      if (m) {
        proc.stdout!.off('data', onData);
        out2 = out.slice(0, m.index);
        // Keep draining: a full pipe would block the agent on its next stdout write.
        proc.stdout!.on('data', (d: Buffer) => {
          out2 += d.toString();
          if (out2.length > 1_000_000) out2 = out2.slice(-500_000);
        });
        resolve(JSON.parse(m[0]));
      }
    };
    proc.stdout!.on('data', onData);
    proc.once('exit', (code) => reject(new Error(`hitlessd exited with ${code} before ready: ${err}`)));
  });
  const exited = exitOf(proc);
  // Stopped by a signal: the agent and every guest it launched (they outlive it by design).
  const unregister = onInterrupt(async () => {
    const reaper = new QemuReaper();
    reaper.trackStateDir(stateDir);
    await endProcess(proc, 'SIGKILL', exited);
    reaper.reap();
  });
  const handle: AgentHandle = {
    proc,
    pid: proc.pid!,
    socket,
    stateDir,
    tcp: ready.grpcTcp,
    ready,
    stderr: () => err,
    stdout: () => out2,
    async stop() {
      running.delete(handle);
      unregister();
      await endProcess(proc, 'SIGTERM', exited);
    },
    async kill9() {
      running.delete(handle);
      unregister();
      await endProcess(proc, 'SIGKILL', exited);
    },
  };
  running.add(handle);
  return handle;
}

export async function stopAllAgents(): Promise<void> {
  await Promise.all([...running].map((h) => h.kill9()));
}

/** The agent's Prometheus text from its --metrics listener (`address` as in its ready line). */
export async function scrapeMetrics(address: string): Promise<string> {
  const res = await fetch(`http://${address}/metrics`);
  const body = await res.text();
  if (res.status !== 200) throw new Error(`HTTP ${res.status}: ${body}`);
  return body;
}
