/**
 * One round's world: a real hitlessd on a private state directory, its gRPC clients, and the
 * control-plane VMs it boots (real QEMU). Faults act on it; the round reads it through the same
 * RPCs an NMS uses. close() leaves nothing running, also after a failed round.
 */
import fs from 'node:fs';
import net from 'node:net';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { AgentHandle, startAgent } from '../harness/agent-process';
import { AnyClient, rawClient, unaryCall } from '../harness/grpc-client';
import { bootControlPlane } from '../harness/guest-images';
import { QemuReaper } from '../harness/qemu-reaper';
import type { AuditResponse, StatusResponse } from '../agent/checkpoint/messages';

/** The parts of hitless.v1.UpgradeStatus the campaign reads. */
export interface UpgradeView {
  current?: { id: string; phase: string; fromVm: string; toVm: string; result: string };
  history: { id: string; phase: string; result: string; fromVm: string; toVm: string }[];
}

export interface VmView {
  name: string;
  state: string;
  pid: number;
  imageVersion: string;
}

export const OLD_VM = 'cp-1';

/**
 * The fault found nothing to strike: its target was already gone at the drawn moment (the
 * phase had stopped that VM itself). The round still checks every invariant, and says so.
 */
export class FaultMissed extends Error {}

export class ChaosWorld {
  agent: AgentHandle | null = null;
  private clients: Record<'up' | 'ck' | 'vm', AnyClient> | null = null;
  private readonly reaper = new QemuReaper();
  readonly stateDir: string;

  private tmpfs = false;

  constructor(
    private readonly work: string,
    private readonly trustDir: string,
    private readonly log: (s: string) => void,
    /** Put the state directory on a tmpfs of this many MiB (so that it can be filled), 0 = no. */
    stateTmpfsMiB = 0,
  ) {
    this.stateDir = path.join(work, 'state');
    if (stateTmpfsMiB > 0) {
      fs.mkdirSync(this.stateDir, { mode: 0o700 });
      execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${stateTmpfsMiB}m,mode=0700`, 'hitless-chaos', this.stateDir]);
      this.tmpfs = true;
    }
  }

  /**
   * Fills the state disk (a tmpfs, see the constructor) until writes fail with ENOSPC, keeps it
   * full for `holdMs`, then frees the space again.
   */
  async fillStateDisk(holdMs: number): Promise<void> {
    if (!this.tmpfs) throw new Error('the state directory is not on a tmpfs of its own');
    const filler = path.join(this.stateDir, 'chaos-filler');
    const fd = fs.openSync(filler, 'w');
    const chunk = Buffer.alloc(1024 * 1024);
    let bytes = 0;
    try {
      for (;;) bytes += fs.writeSync(fd, chunk);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOSPC') throw e;
    } finally {
      fs.closeSync(fd);
    }
    this.log(`state disk full (${Math.round(bytes / 1048576)} MiB of filler); freeing it in ${holdMs} ms`);
    await new Promise((r) => setTimeout(r, holdMs));
    fs.rmSync(filler);
  }

  private args(): string[] {
    // The rollback timer must not fire inside a round; loads under TCG with a busy host are slow.
    return ['--trust-dir', this.trustDir, '--rollback-timeout-s', '900', '--load-timeout-s', '240'];
  }

  private connect(): void {
    this.disconnect();
    const sock = this.agent!.socket;
    this.clients = { up: rawClient('hitless.v1.Upgrade', sock), ck: rawClient('hitless.v1.Checkpoint', sock), vm: rawClient('hitless.v1.Vm', sock) };
  }

  private disconnect(): void {
    for (const c of Object.values(this.clients ?? {})) c.close();
    this.clients = null;
  }

  private get c(): Record<'up' | 'ck' | 'vm', AnyClient> {
    if (!this.clients) throw new Error('no agent is running');
    return this.clients;
  }

  /** Starts the agent and boots the old version with its table loaded. */
  async start(oldImage: string, records: number): Promise<number> {
    this.agent = await startAgent({ stateDir: this.stateDir, args: this.args() });
    this.connect();
    const boot = await bootControlPlane(this.c.vm, this.c.ck, OLD_VM, oldImage, records, 300_000);
    this.reaper.track(boot.pid);
    return boot.ms;
  }

  async restartAgent(): Promise<void> {
    await this.trackVms();
    this.disconnect();
    await this.agent?.kill9();
    this.agent = await startAgent({ stateDir: this.stateDir, args: this.args() });
    this.connect();
  }

  /** SIGKILL of the QEMU of the old version's VM or of the new version's VM. */
  async killVm(which: 'from' | 'to'): Promise<void> {
    const vms = await this.vms();
    const target = which === 'from' ? vms.find((v) => v.name === OLD_VM && v.state === 'RUNNING') : vms.find((v) => v.name !== OLD_VM && v.state === 'RUNNING');
    const name = which === 'from' ? 'old' : 'new';
    // The phase itself may have stopped it (commit stops the old VM, an abort the new one).
    if (!target?.pid) throw new FaultMissed(`no running ${name} VM to kill (VMs: ${vms.map((v) => `${v.name} ${v.state}`).join(', ')})`);
    this.log(`SIGKILL QEMU of ${target.name} (pid ${target.pid})`);
    try {
      process.kill(target.pid, 'SIGKILL');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
      throw new FaultMissed(`QEMU of ${target.name} (pid ${target.pid}) had already exited`);
    }
  }

  /**
   * SIGKILL of `process` in the VM that holds its ACTIVE instance, through the guest's fault port
   * (images built with hitless.faults=1 read "HITLESS-FAULT kill NAME" on their console).
   */
  async killActiveProcess(process: string): Promise<void> {
    const active = (await this.processes()).find((p) => p.process === process)?.peers.find((x) => x.role === 'ACTIVE');
    if (!active) throw new Error(`process ${process} has no active instance to kill`);
    const vm = await unaryCall<{ consoleSocket: string }>(this.c.vm, 'Get', { name: active.vmId });
    this.log(`SIGKILL of ${active.instanceId} through the console of ${active.vmId}`);
    await new Promise<void>((resolve, reject) => {
      const sock = net.connect(vm.consoleSocket, () => sock.end(`\nHITLESS-FAULT kill ${process}\n`, () => resolve()));
      sock.on('error', reject);
    });
  }

  upgrade(method: string, req: Record<string, unknown> = {}): Promise<UpgradeView> {
    return unaryCall<UpgradeView>(this.c.up, method, req);
  }

  status(): Promise<UpgradeView> {
    return this.upgrade('Status');
  }

  async processes(): Promise<StatusResponse['processes']> {
    return (await unaryCall<StatusResponse>(this.c.ck, 'Status', { process: '' })).processes;
  }

  audit(process: string): Promise<AuditResponse> {
    return unaryCall<AuditResponse>(this.c.ck, 'Audit', { process });
  }

  async vms(): Promise<VmView[]> {
    const vms = (await unaryCall<{ vms: VmView[] }>(this.c.vm, 'List', {})).vms;
    for (const v of vms) this.reaper.track(v.pid);
    return vms;
  }

  private async trackVms(): Promise<void> {
    await this.vms().catch(() => undefined);
  }

  async close(): Promise<void> {
    await this.trackVms();
    this.disconnect();
    await this.agent?.kill9();
    this.agent = null;
    this.reaper.trackStateDir(this.stateDir);
    this.reaper.reap();
    if (this.tmpfs) execFileSync('umount', [this.stateDir]);
    fs.rmSync(this.work, { recursive: true, force: true });
  }
}
