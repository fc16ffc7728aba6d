/**
 * Runs the agent's external commands (iproute2, nsenter, QEMU) from a small helper process
 * (command-runner.child.ts) instead of from the agent itself.
 *
 * Why: Node starts a command with fork(), on the calling thread, and fork() copies the page
 * tables of the whole process. Its cost grows with the agent's resident memory. Measured on the
 * development machine, the synchronous part of starting `true` took 6 ms from a 45 MB process,
 * 14 ms from 150 MB and 23 ms from 360 MB; inside the agent during an upgrade under TCG, with
 * the guests competing for the CPUs, 20-70 ms each (CPU profiles of `npm run demo`: the port
 * refresh every 5 s, FIB programming and read-back, tap adoption, QEMU's launch). Every
 * acknowledgement and switchover waits for the agent's event loop, so that was a stall each time.
 * The helper is forked once, early, while the agent is small; it forks the commands from its own
 * ~40 MB, and the agent only exchanges messages with it.
 *
 * Invariants:
 * - A request's reply comes back once: `exit` ends it (also for a command that could not start).
 * - If the helper dies, every command waiting on it fails with a message saying so, and the next
 *   request starts a new helper. Detached commands (QEMU) keep running; their exit is then no
 *   longer reported here (their owners also poll the pid).
 * - The helper keeps the agent alive only while a command runs that the agent waits for (not a
 *   detached one, not a background watcher).
 */
import { fork, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import path from 'node:path';

export type RunnerRequest =
  | {
      t: 'run';
      id: number;
      cmd: string;
      args: string[];
      cwd?: string;
      /** setsid(): the command survives the agent (QEMU). */
      detached: boolean;
      stdin: boolean;
      /** Send stdout as it arrives ('out' replies) instead of with the exit. */
      streamStdout: boolean;
      collectStdout: boolean;
      /** stdout and stderr appended to this file instead (detached commands). */
      logPath?: string;
      /** Killed (SIGKILL) after this long, ms; 0: never. */
      timeoutMs: number;
      /** Limit of the collected stdout (killed past it) and of stderr (its end kept). */
      maxBufferBytes: number;
    }
  | { t: 'in'; id: number; data: string }
  | { t: 'end'; id: number }
  | { t: 'kill'; id: number; signal: NodeJS.Signals };

export type RunnerReply =
  | { t: 'spawned'; id: number; pid: number }
  | { t: 'out'; id: number; data: Uint8Array }
  | { t: 'wrote'; id: number }
  | {
      t: 'exit';
      id: number;
      code: number | null;
      signal: NodeJS.Signals | null;
      stdout: Uint8Array | null;
      stderr: string;
      timedOut: boolean;
      /** Why the command could not start or was cut short; empty when it just exited. */
      error: string;
      /** The errno name of a start failure (ENOENT: no such command). */
      errno: string;
    };

export interface CommandResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  /** stderr, whole up to maxBufferBytes (then its end). */
  stderr: string;
  timedOut: boolean;
  error: string;
  errno: string;
}

export interface RunOptions {
  /** Killed after this long, ms (default 10 s; 0: never). */
  timeoutMs?: number;
  maxBufferBytes?: number;
  cwd?: string;
}

/** A command whose stdin is written and whose stdout is read while it runs. */
export interface RunningCommand {
  /** Resolves once the command has taken `text` (backpressure: write the next after that). */
  write(text: string): Promise<void>;
  end(): void;
  kill(signal?: NodeJS.Signals): void;
  readonly done: Promise<CommandResult>;
}

/** A detached command (QEMU): the subset of ChildProcess its owner watches. */
export interface DetachedProcess extends EventEmitter {
  readonly pid: number;
  exitCode: number | null;
  signalCode: NodeJS.Signals | null;
}

interface Pending {
  detached: boolean;
  /** The command's pid once it runs. */
  pid?: number;
  /** Does not keep the agent alive (a watcher that runs as long as the agent). */
  background?: boolean;
  spawned?: boolean;
  onSpawned?: (pid: number) => void;
  onOut?: (data: Buffer) => void;
  wrote: (() => void)[];
  onExit: (r: CommandResult) => void;
}

const DEFAULT_TIMEOUT_MS = 10_000;
const DEFAULT_MAX_BUFFER = 64 * 1024 * 1024;

export class CommandRunner {
  private helper: ChildProcess | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  /** Non-detached commands in flight: the helper keeps the agent alive only while > 0. */
  private waiting = 0;

  /** The CPU priority the helper and its commands run at (the agent may run at another). */
  private nice: number | null = null;

  /**
   * Starts the helper now: call it early, while the agent is still small (one fork). `nice`: the
   * priority it and everything it starts run at (default: the agent's own at that moment).
   */
  start(nice?: number): void {
    if (nice !== undefined) this.nice = nice;
    if (this.helper) return;
    const helper = fork(path.join(__dirname, 'command-runner.child.js'), this.nice === null ? [] : [String(this.nice)], {
      serialization: 'advanced',
      // Not the agent's flags (--cpu-prof, --max-old-space-size): the helper is small.
      execArgv: [],
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    this.helper = helper;
    helper.on('message', (m: RunnerReply) => this.onReply(m));
    helper.on('exit', (code, signal) => this.onHelperExit(helper, code, signal));
    helper.on('error', () => undefined); // followed by exit
    this.updateRef();
  }

  /** Ends the helper (agent shutdown); commands still waiting fail. */
  stop(): void {
    this.helper?.kill('SIGKILL');
  }

  /** Runs a command to its end; rejects only when it could not be run at all. */
  run(cmd: string, args: string[], opts: RunOptions = {}): Promise<CommandResult> {
    return new Promise((resolve) => {
      this.request(
        {
          cmd,
          args,
          cwd: opts.cwd,
          detached: false,
          stdin: false,
          streamStdout: false,
          collectStdout: true,
          timeoutMs: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
          maxBufferBytes: opts.maxBufferBytes ?? DEFAULT_MAX_BUFFER,
        },
        { detached: false, wrote: [], onExit: resolve },
      );
    });
  }

  /** run(), and its stdout when it exits 0; otherwise an Error naming the command and why. */
  async output(cmd: string, args: string[], opts: RunOptions = {}): Promise<string> {
    const r = await this.run(cmd, args, opts);
    if (r.code === 0 && !r.error) return r.stdout;
    throw new Error(`${cmd} ${args.join(' ')}: ${failureText(r)}`);
  }

  /** Starts a command whose stdin the caller writes and whose stdout arrives in `onStdout`. */
  stream(cmd: string, args: string[], opts: RunOptions & { stdin?: boolean; onStdout?: (chunk: Buffer) => void; background?: boolean } = {}): RunningCommand {
    let id = 0;
    const done = new Promise<CommandResult>((resolve) => {
      id = this.request(
        {
          cmd,
          args,
          cwd: opts.cwd,
          detached: false,
          stdin: !!opts.stdin,
          streamStdout: !!opts.onStdout,
          collectStdout: false,
          timeoutMs: opts.timeoutMs ?? 0,
          maxBufferBytes: opts.maxBufferBytes ?? DEFAULT_MAX_BUFFER,
        },
        { detached: false, background: opts.background, wrote: [], onOut: opts.onStdout, onExit: resolve },
      );
    });
    return {
      done,
      write: (text) =>
        new Promise<void>((resolve) => {
          const p = this.pending.get(id);
          // Ended already: its exit says why; the writer stops at that.
          if (!p || !this.helper) return resolve();
          p.wrote.push(resolve);
          this.helper.send({ t: 'in', id, data: text } satisfies RunnerRequest, ignoreSendError);
        }),
      end: () => {
        if (this.pending.has(id)) this.helper?.send({ t: 'end', id } satisfies RunnerRequest, ignoreSendError);
      },
      kill: (signal = 'SIGTERM') => {
        if (this.pending.has(id)) this.helper?.send({ t: 'kill', id, signal } satisfies RunnerRequest, ignoreSendError);
      },
    };
  }

  /**
   * Starts a command in a session of its own that outlives the agent, output appended to
   * `logPath`. Resolves once it runs; rejects when it could not be started.
   */
  launchDetached(cmd: string, args: string[], opts: { cwd?: string; logPath: string }): Promise<DetachedProcess> {
    return new Promise((resolve, reject) => {
      let proc: (EventEmitter & { pid: number; exitCode: number | null; signalCode: NodeJS.Signals | null }) | null = null;
      this.request(
        {
          cmd,
          args,
          cwd: opts.cwd,
          detached: true,
          stdin: false,
          streamStdout: false,
          collectStdout: false,
          logPath: opts.logPath,
          timeoutMs: 0,
          maxBufferBytes: 0,
        },
        {
          detached: true,
          wrote: [],
          onSpawned: (pid) => {
            proc = Object.assign(new EventEmitter(), { pid, exitCode: null as number | null, signalCode: null as NodeJS.Signals | null });
            resolve(proc);
          },
          onExit: (r) => {
            if (!proc) return reject(new Error(`${cmd} could not be started: ${failureText(r)}`));
            proc.exitCode = r.code;
            proc.signalCode = r.signal;
            proc.emit('exit', r.code, r.signal);
          },
        },
      );
    });
  }

  private request(req: Omit<Extract<RunnerRequest, { t: 'run' }>, 't' | 'id'>, p: Pending): number {
    this.start();
    const id = this.nextId++;
    this.pending.set(id, p);
    if (!p.detached && !p.background) this.waiting++;
    this.updateRef();
    // A helper that just died fails the request through its exit (onHelperExit).
    this.helper!.send({ t: 'run', id, ...req } satisfies RunnerRequest, ignoreSendError);
    return id;
  }

  private onReply(m: RunnerReply): void {
    const p = this.pending.get(m.id);
    if (!p) return;
    if (m.t === 'spawned') {
      p.spawned = true;
      p.pid = m.pid;
      p.onSpawned?.(m.pid);
    } else if (m.t === 'out') p.onOut?.(Buffer.from(m.data.buffer, m.data.byteOffset, m.data.byteLength));
    else if (m.t === 'wrote') p.wrote.shift()?.();
    else
      this.finish(m.id, p, {
        code: m.code,
        signal: m.signal,
        stdout: m.stdout ? Buffer.from(m.stdout.buffer, m.stdout.byteOffset, m.stdout.byteLength).toString('utf8') : '',
        stderr: m.stderr,
        timedOut: m.timedOut,
        error: m.error,
        errno: m.errno,
      });
  }

  private finish(id: number, p: Pending, r: CommandResult): void {
    this.pending.delete(id);
    if (!p.detached && !p.background) this.waiting--;
    for (const w of p.wrote.splice(0)) w();
    this.updateRef();
    p.onExit(r);
  }

  private onHelperExit(helper: ChildProcess, code: number | null, signal: NodeJS.Signals | null): void {
    if (this.helper !== helper) return;
    this.helper = null;
    const why = `the agent's command runner process ended (code ${code}, signal ${signal}) while the command ran; it is started again for the next command`;
    for (const [id, p] of [...this.pending]) {
      // A detached command that runs keeps running; only its exit can no longer be reported.
      if (p.detached && p.spawned) continue;
      // The helper could not end it (killed outright): a watcher would run forever.
      if (p.pid !== undefined) {
        try {
          process.kill(p.pid, 'SIGKILL');
        } catch {
          // ended with the helper
        }
      }
      this.finish(id, p, { code: null, signal: null, stdout: '', stderr: '', timedOut: false, error: why, errno: '' });
    }
    this.pending.clear();
    this.waiting = 0;
  }

  private updateRef(): void {
    const h = this.helper;
    if (!h) return;
    const channel = h.channel as { ref(): void; unref(): void } | undefined;
    if (this.waiting > 0) {
      h.ref();
      channel?.ref();
    } else {
      h.unref();
      channel?.unref();
    }
  }
}

const ignoreSendError = (): void => undefined;

/** Why a command failed, in one line: its own last words when it said any. */
export function failureText(r: CommandResult): string {
  if (r.timedOut) return `no answer within the time limit (killed)${r.stderr.trim() ? `: ${r.stderr.trim()}` : ''}`;
  const said = r.stderr.trim();
  if (said) return said;
  if (r.error) return r.error;
  return r.signal ? `killed by ${r.signal}` : `exited with ${r.code}`;
}

/** The agent's one runner (every external command goes through it). */
export const hostCommands = new CommandRunner();
