/**
 * Ending a child process the harness started: one place for "signal it unless it is gone, then
 * wait for its exit" (agents and example daemons alike).
 */
import type { ChildProcess } from 'node:child_process';

/** Resolves when `proc` has exited (at once if it already has); create it right after spawn. */
export function exitOf(proc: ChildProcess): Promise<void> {
  return new Promise<void>((r) => (proc.exitCode !== null || proc.signalCode !== null ? r() : proc.once('exit', () => r())));
}

/** Sends `signal` to `proc` unless it already exited, then waits for `exited` (from exitOf). */
export async function endProcess(proc: ChildProcess, signal: NodeJS.Signals, exited: Promise<void>): Promise<void> {
  if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
  await exited;
}
