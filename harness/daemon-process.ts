/**
 * Runs an example routing daemon (examples/*) as a real OS process and talks to it over its
 * stdin/stdout line protocol. Tracked so `stopAllDaemons` can clean up after a failing test.
 */
import { ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { endProcess, exitOf } from './child-process';
import { onInterrupt } from './interrupt-cleanup';

export type DaemonEvent = Record<string, unknown> & { event: string };

export interface DaemonHandle {
  proc: ChildProcess;
  events: DaemonEvent[];
  send(line: string): void;
  /** Resolves with the first event (from now on, or already seen after `since`) matching. */
  waitFor(pred: (e: DaemonEvent) => boolean, timeoutMs?: number, since?: number): Promise<DaemonEvent>;
  /** Asks for the digest and returns it. */
  digest(): Promise<DaemonEvent>;
  kill9(): Promise<void>;
  stop(): Promise<void>;
}

const running = new Set<DaemonHandle>();
const EXAMPLES = path.resolve(__dirname, '../examples');

/**
 * `env` is added to this process's environment (e.g. HITLESS_RESTARTS, as a guest's init sets
 * it); `netns` runs it in that network namespace (it still reaches the agent's unix socket).
 */
export function startDaemon(kind: 'bgp-rib' | 'ospf-lsdb', args: string[], env: Record<string, string> = {}, netns?: string): DaemonHandle {
  // In a network namespace (`ip netns exec` execs the daemon: the pid is the daemon's).
  const argv = [path.join(EXAMPLES, kind, 'daemon.js'), ...args];
  const proc = netns
    ? spawn('ip', ['netns', 'exec', netns, process.execPath, ...argv], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...env } })
    : spawn(process.execPath, argv, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  // Stopped by a signal: the daemon too (it would keep writing to an agent that is gone).
  const unregister = onInterrupt(() => proc.exitCode === null && proc.signalCode === null && proc.kill('SIGKILL'));
  proc.once('exit', unregister);
  const events: DaemonEvent[] = [];
  const waiters: { pred: (e: DaemonEvent) => boolean; resolve: (e: DaemonEvent) => void }[] = [];
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d.toString()));
  readline.createInterface({ input: proc.stdout! }).on('line', (line) => {
    let e: DaemonEvent;
    try {
      e = JSON.parse(line);
    } catch {
      return;
    }
    events.push(e);
    for (const w of [...waiters]) {
      if (w.pred(e)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(e);
      }
    }
  });
  const exited = exitOf(proc);
  const handle: DaemonHandle = {
    proc,
    events,
    send: (line) => proc.stdin!.write(line + '\n'),
    waitFor(pred, timeoutMs = 60_000, since?: number) {
      if (since !== undefined) {
        const seen = events.slice(since).find(pred);
        if (seen) return Promise.resolve(seen);
      }
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(
            new Error(
              `${kind} ${args.join(' ')}: no matching event within ${timeoutMs} ms; last events: ${JSON.stringify(events.slice(-5))} stderr: ${stderr.slice(-2000)}`,
            ),
          );
        }, timeoutMs);
        const w = {
          pred,
          resolve: (e: DaemonEvent) => {
            clearTimeout(t);
            resolve(e);
          },
        };
        waiters.push(w);
        proc.once('exit', (code) => {
          if (waiters.includes(w)) {
            clearTimeout(t);
            waiters.splice(waiters.indexOf(w), 1);
            reject(new Error(`${kind} exited (${code}) while waiting; last events: ${JSON.stringify(events.slice(-5))} stderr: ${stderr.slice(-2000)}`));
          }
        });
      });
    },
    async digest() {
      const p = handle.waitFor((e) => e.event === 'digest');
      handle.send('digest');
      return p;
    },
    async kill9() {
      running.delete(handle);
      await endProcess(proc, 'SIGKILL', exited);
    },
    async stop() {
      running.delete(handle);
      await endProcess(proc, 'SIGTERM', exited);
    },
  };
  running.add(handle);
  return handle;
}

export async function stopAllDaemons(): Promise<void> {
  await Promise.all([...running].map((d) => d.kill9()));
}
