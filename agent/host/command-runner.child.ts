/**
 * The command runner's helper process (see command-runner.ts for why it exists): it starts the
 * commands the agent asks for and relays their output and exit over the IPC channel. It holds
 * nothing but the commands in flight, so its own fork() of each command stays cheap.
 *
 * It exits when the agent's channel closes (the agent stopped or died). Detached commands (QEMU)
 * are in sessions of their own and keep running; they are then re-parented to init.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import type { RunnerReply, RunnerRequest } from './command-runner';

// The agent may run at another CPU priority than it was started with; its commands and VMs do
// not. (Going back to a lower priority needs no privilege; to a higher one it does, and without
// it they run at the agent's.)
if (process.argv[2] !== undefined) {
  try {
    os.setPriority(Number(process.argv[2]));
  } catch {
    // left at the agent's priority
  }
}

/** Commands in flight by request id, and whether each is detached (lives on without the agent). */
const running = new Map<number, { child: ChildProcess; detached: boolean }>();

function send(m: RunnerReply): void {
  // The agent is gone: nothing is left to tell.
  if (process.connected) process.send!(m);
}

function start(m: Extract<RunnerRequest, { t: 'run' }>): void {
  let child: ChildProcess;
  let logFd: number | null = null;
  try {
    if (m.logPath) logFd = fs.openSync(m.logPath, 'a');
    const out = logFd ?? (m.streamStdout || m.collectStdout ? 'pipe' : 'ignore');
    child = spawn(m.cmd, m.args, {
      cwd: m.cwd,
      detached: m.detached,
      stdio: [m.stdin ? 'pipe' : 'ignore', out, logFd ?? 'pipe'],
    });
  } catch (e) {
    send({
      t: 'exit',
      id: m.id,
      code: null,
      signal: null,
      stdout: null,
      stderr: '',
      timedOut: false,
      error: (e as Error).message,
      errno: (e as NodeJS.ErrnoException).code ?? '',
    });
    return;
  } finally {
    if (logFd !== null) fs.closeSync(logFd);
  }
  running.set(m.id, { child, detached: m.detached });
  const chunks: Buffer[] = [];
  let outBytes = 0;
  const errChunks: string[] = [];
  let errBytes = 0;
  let error = '';
  let errno = '';
  let timedOut = false;
  let timer: NodeJS.Timeout | null = null;
  if (m.timeoutMs > 0) {
    timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, m.timeoutMs);
  }
  child.stdout?.on('data', (d: Buffer) => {
    if (m.streamStdout) return send({ t: 'out', id: m.id, data: d });
    outBytes += d.length;
    if (outBytes > m.maxBufferBytes) {
      error = `more than ${m.maxBufferBytes} bytes of output`;
      child.kill('SIGKILL');
      return;
    }
    chunks.push(d);
  });
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    errChunks.push(d);
    errBytes += d.length;
    // Past the limit the end is kept: the last words of a long error output say why.
    while (errBytes > m.maxBufferBytes && errChunks.length > 1) errBytes -= errChunks.shift()!.length;
  });
  child.stdin?.on('error', () => undefined); // the command ended early: its exit says why
  child.on('spawn', () => send({ t: 'spawned', id: m.id, pid: child.pid! }));
  child.on('error', (e: NodeJS.ErrnoException) => {
    error = e.message;
    errno = e.code ?? '';
  });
  child.on('close', (code, signal) => {
    if (timer) clearTimeout(timer);
    running.delete(m.id);
    const stdout = m.collectStdout && !m.streamStdout ? Buffer.concat(chunks) : null;
    // A command that never started has no exit code (Node reports the negated errno).
    if (child.pid === undefined) code = null;
    send({ t: 'exit', id: m.id, code, signal, stdout, stderr: errChunks.join(''), timedOut, error, errno });
  });
}

process.on('message', (m: RunnerRequest) => {
  if (m.t === 'run') return start(m);
  const child = running.get(m.id)?.child;
  if (m.t === 'in') {
    if (!child?.stdin || child.stdin.destroyed) return send({ t: 'wrote', id: m.id });
    child.stdin.write(m.data, () => send({ t: 'wrote', id: m.id }));
  } else if (m.t === 'end') child?.stdin?.end();
  else if (m.t === 'kill') child?.kill(m.signal);
});

process.on('disconnect', () => {
  // Commands the agent waits for are of no use to anyone now; detached ones live on.
  for (const c of running.values()) if (!c.detached) c.child.kill('SIGKILL');
  process.exit(0);
});
// A Ctrl-C on the agent's terminal reaches the whole process group: the agent decides.
process.on('SIGINT', () => undefined);
