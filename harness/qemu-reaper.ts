/**
 * Kills every QEMU a test, demo or campaign started, by pid (its process group when it leads
 * one), also when the agent that launched them is already gone.
 */
import fs from 'node:fs';
import path from 'node:path';
import { pidAlive } from '../agent/vm/qemu-hypervisor';
import { onInterrupt } from './interrupt-cleanup';

/** Collects the pids of every QEMU a test starts and SIGKILLs the survivors' groups. */
export class QemuReaper {
  private readonly pids = new Set<number>();

  constructor() {
    // Stopped by a signal: the survivors are killed as reap() would (harness/interrupt-cleanup.ts).
    onInterrupt(() => this.reap());
  }

  track(pid: number | null | undefined): void {
    if (pid) this.pids.add(pid);
  }
  /**
   * Tracks every QEMU an agent with this state dir launched, from the pid files it keeps
   * (<stateDir>/vms/<name>/qemu.pid): works when the agent itself is already gone.
   */
  trackStateDir(stateDir: string): void {
    let names: string[];
    try {
      names = fs.readdirSync(path.join(stateDir, 'vms'));
    } catch {
      return; // no VM was ever created
    }
    for (const name of names) {
      try {
        this.track(Number(fs.readFileSync(path.join(stateDir, 'vms', name, 'qemu.pid'), 'utf8').trim()));
      } catch {
        // no pid file: never launched
      }
    }
  }
  reap(): number {
    let killed = 0;
    for (const pid of this.pids) {
      if (!pidAlive(pid)) continue;
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          continue;
        }
      }
      killed++;
    }
    this.pids.clear();
    return killed;
  }
}
