/**
 * The agent's VM use case: VmService (QEMU lifecycle, records) plus the two guest channels
 * every VM has while it exists, and the image bundle it boots.
 *
 *  - guest gRPC channel: <stateDir>/vms/<name>/agent.sock, served by the agent's GrpcServer
 *    with calls tagged with the VM (guest 10.0.2.100:7000 through QEMU's guestfwd);
 *  - bulk snapshot channel: <stateDir>/vms/<name>/bulk.sock, served by the BulkServer
 *    (guest 10.0.2.100:7001).
 *
 * Both are opened BEFORE QEMU is launched (a guest that boots fast finds the agent listening)
 * and before re-attaching after an agent restart, and closed once the VM is gone (stop, kill,
 * guest poweroff, crash). On agent shutdown the VMs are let go, not stopped.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { HostInventory, HostProbe } from '../host/host-probe';
import { ACTIVE_STATES, CP_NIC_ID, VmError, type Arch, type Hypervisor, type PowerdownResult, type VmEvent, type VmLogger } from './hypervisor';
import { loadImageBundle } from './image-bundle';
import { AGENT_GUEST_ADDR, AGENT_GUEST_PORT, BULK_GUEST_PORT } from './qemu-argv';
import { checkVmName, type RecoverReport, type VmInfo, type VmService } from './vm.service';

/** Opens/closes the per-VM listeners (GrpcServer.listenVm and BulkServer.listenUnixExtra). */
export interface GuestChannels {
  open(vm: string, agentSocket: string, bulkSocket: string): Promise<void>;
  close(vm: string, agentSocket: string, bulkSocket: string): Promise<void>;
}

/**
 * Control-plane NICs (hitlessd --cp-bridge): what the supervisor gives every VM it starts, and
 * the port that moves the VM's tap into the data plane (LinuxDataPlane.adoptTap).
 */
export interface ControlPlaneNics {
  /** Same MAC for every VM: whichever version is active, the neighbours see one router. */
  mac: string;
  /** Appended to the kernel cmdline: hitless.cpnet=... hitless.cpgw=... */
  cmdline: string;
  adopt(qemuPid: number, tap: string): Promise<void>;
}

/** Tap of VM `name`: "cp-<name>" when that fits an interface name (15 bytes), else a hash. */
export function cpTapName(name: string): string {
  const plain = `cp-${name}`;
  return plain.length <= 15 ? plain : `cp-${crypto.createHash('sha256').update(name).digest('hex').slice(0, 12)}`;
}

export interface StartRequest {
  name: string;
  imageDir: string;
  /** 0 or undefined: the manifest's value. */
  memoryMiB?: number;
  cpus?: number;
  cmdlineExtra?: string;
}

export interface PlatformReport extends HostInventory {
  hostArch: Arch;
  accelerators: { arch: Arch; platformId: string; accelerator: string }[];
}

const RESERVED_CMDLINE = /(^|\s)hitless\.(vm|agent|bulk)=/;

export class VmSupervisor {
  /** Names with a start in progress (between the checks and QEMU running). */
  private readonly starting = new Set<string>();
  private readonly open = new Set<string>();
  /** Per-VM queue so an open and a close of one VM's channels never interleave. */
  private readonly queue = new Map<string, Promise<void>>();
  private readonly offEvents: () => void;

  constructor(
    readonly vms: VmService,
    private readonly deps: {
      hypervisors: readonly Hypervisor[];
      host: HostProbe;
      channels: GuestChannels;
      stateDir: string;
      logger: VmLogger;
      cpNics?: ControlPlaneNics;
    },
  ) {
    this.offEvents = vms.onEvent((e) => {
      if (e.type === 'EXITED' || e.type === 'CRASHED') void this.closeChannels(e.vm);
    });
  }

  socketsOf(name: string): { agentSocket: string; bulkSocket: string } {
    const dir = path.join(this.deps.stateDir, 'vms', name);
    return { agentSocket: path.join(dir, 'agent.sock'), bulkSocket: path.join(dir, 'bulk.sock') };
  }

  list(): VmInfo[] {
    return this.vms.list();
  }

  get(name: string): VmInfo {
    return this.vms.get(checkVmName(name));
  }

  async start(req: StartRequest): Promise<VmInfo> {
    const name = checkVmName(req.name);
    const extra = (req.cmdlineExtra ?? '').trim();
    // eslint-disable-next-line no-control-regex -- control characters are exactly what is refused
    if (/[\x00-\x1f\x7f]/.test(extra))
      throw new VmError('INVALID_ARGUMENT', 'cmdline_extra must be one line of printable characters (no newlines or control characters).');
    if (extra.length > 1024) throw new VmError('INVALID_ARGUMENT', `cmdline_extra is ${extra.length} characters; keep it under 1024.`);
    if (RESERVED_CMDLINE.test(extra))
      throw new VmError('INVALID_ARGUMENT', 'cmdline_extra must not set hitless.vm=, hitless.agent= or hitless.bulk=; the agent sets them for the VM.');
    if (this.starting.has(name)) throw new VmError('ALREADY_EXISTS', `VM ${name} is being started by another request; wait for it, then check 'issu vm list'.`);
    const existing = this.vms.list().find((v) => v.name === name);
    if (existing && ACTIVE_STATES.includes(existing.state)) {
      throw new VmError(
        'ALREADY_EXISTS',
        `VM ${name} already exists and is ${existing.state} (pid ${existing.pid ?? 'none yet'}); stop it first or choose another name.`,
      );
    }
    this.starting.add(name);
    try {
      const bundle = await loadImageBundle(req.imageDir);
      if (!this.deps.hypervisors.some((h) => h.arch === bundle.arch)) {
        throw new VmError(
          'FAILED_PRECONDITION',
          `Image ${req.imageDir} is for ${bundle.arch}, but this agent has no hypervisor for it (has: ${this.deps.hypervisors.map((h) => h.arch).join(', ')}).`,
        );
      }
      const { agentSocket } = this.socketsOf(name);
      const cmdline = [
        bundle.cmdline,
        `hitless.vm=${name}`,
        `hitless.agent=${AGENT_GUEST_ADDR}:${AGENT_GUEST_PORT}`,
        `hitless.bulk=${AGENT_GUEST_ADDR}:${BULK_GUEST_PORT}`,
        this.deps.cpNics?.cmdline ?? '',
        extra,
      ]
        .filter(Boolean)
        .join(' ');
      // Channels first: they must exist before the guest can try to connect.
      await this.openChannels(name);
      const cp = this.deps.cpNics;
      const cpNic = cp ? { tap: cpTapName(name), mac: cp.mac } : undefined;
      let info: VmInfo;
      try {
        info = await this.vms.start({
          name,
          arch: bundle.arch,
          kernelPath: bundle.kernelPath,
          initrdPath: bundle.initrdPath,
          rootfsPath: bundle.rootfsPath,
          memoryMiB: req.memoryMiB || bundle.memoryMiB,
          cpus: req.cpus || bundle.cpus,
          cmdlineExtra: cmdline,
          imageVersion: bundle.version,
          imageDir: bundle.dir,
          agentSocketPath: agentSocket,
          cpNic,
        });
      } catch (e) {
        await this.closeChannels(name);
        // Refused before anything ran (no record left): leave no empty runtime dir behind.
        if (!this.vms.list().some((v) => v.name === name)) fs.rmSync(path.join(this.deps.stateDir, 'vms', name), { recursive: true, force: true });
        throw e;
      }
      if (cp && cpNic && info.pid) {
        // A standby's NIC stays down until its processes are promoted (setControlLink); the
        // guest is still in its firmware or kernel when this runs.
        const standby = /(^|\s)hitless\.role=standby(\s|$)/.test(extra);
        try {
          await this.vms.setLink(name, CP_NIC_ID, !standby);
          await cp.adopt(info.pid, cpNic.tap);
          this.deps.logger.info({ vm: name, tap: cpNic.tap, link: standby ? 'down' : 'up' }, 'control-plane NIC in the data plane');
        } catch (e) {
          this.deps.logger.error(
            { vm: name, tap: cpNic.tap, err: (e as Error).message },
            'the control-plane NIC could not join the data plane: the VM runs, but its routing processes cannot reach the neighbours; stop it, check --cp-bridge and the data plane, and start it again',
          );
        }
      }
      return info;
    } finally {
      this.starting.delete(name);
    }
  }

  async stop(name: string, timeoutMs?: number): Promise<PowerdownResult> {
    const r = await this.vms.stop(checkVmName(name), { timeoutMs });
    await this.closeChannels(name);
    return r;
  }

  async kill(name: string): Promise<void> {
    await this.vms.kill(checkVmName(name));
    await this.closeChannels(name);
  }

  /**
   * The guest-visible link of a VM's control-plane NIC: up on the VM whose processes are active,
   * down on the others (so one MAC and one address answer the neighbours). No-op without
   * control-plane NICs.
   */
  async setControlLink(name: string, up: boolean): Promise<void> {
    if (!this.deps.cpNics) return;
    await this.vms.setLink(checkVmName(name), CP_NIC_ID, up);
  }

  pause(name: string): Promise<void> {
    return this.vms.pause(checkVmName(name));
  }

  resume(name: string): Promise<void> {
    return this.vms.resume(checkVmName(name));
  }

  consoleLog(name: string, bytes: number): Promise<Buffer> {
    return this.vms.consoleLogBytes(checkVmName(name), bytes);
  }

  onEvent(cb: (e: VmEvent) => void): () => void {
    return this.vms.onEvent(cb);
  }

  /**
   * Agent start: open the channels of every VM recorded active, then re-attach. Guests of
   * re-attached VMs reconnect by themselves; VMs found gone lose their channels again.
   * A VM alive but unreachable over QMP keeps its channels (its daemons still need the agent).
   */
  async recover(): Promise<RecoverReport> {
    const active = this.vms.list().filter((v) => ACTIVE_STATES.includes(v.state));
    for (const v of active) {
      try {
        await this.openChannels(v.name);
      } catch (e) {
        this.deps.logger.warn({ vm: v.name, err: (e as Error).message }, 'cannot open the guest channels of a recorded VM');
      }
    }
    const report = await this.vms.recover();
    for (const s of report.markedStopped) await this.closeChannels(s.name);
    return report;
  }

  async platform(): Promise<PlatformReport> {
    const inv = await this.deps.host.inventory();
    const accelerators = await Promise.all(
      this.deps.hypervisors.map(async (h) => ({ arch: h.arch, platformId: h.platformId, accelerator: await h.accelerator() })),
    );
    const hostArch: Arch = process.arch === 'arm64' ? 'aarch64' : 'x86_64';
    return { ...inv, hostArch, accelerators };
  }

  /** Agent shutdown: let go of every VM without stopping it. Listeners are closed by their owners. */
  close(): void {
    this.offEvents();
    this.vms.close();
  }

  private enqueue(name: string, fn: () => Promise<void>): Promise<void> {
    const next = (this.queue.get(name) ?? Promise.resolve()).then(fn, fn);
    this.queue.set(
      name,
      next.catch(() => undefined),
    );
    return next;
  }

  private openChannels(name: string): Promise<void> {
    return this.enqueue(name, async () => {
      const { agentSocket, bulkSocket } = this.socketsOf(name);
      await this.deps.channels.open(name, agentSocket, bulkSocket);
      this.open.add(name);
    });
  }

  private closeChannels(name: string): Promise<void> {
    return this.enqueue(name, async () => {
      if (!this.open.has(name)) return;
      this.open.delete(name);
      const { agentSocket, bulkSocket } = this.socketsOf(name);
      await this.deps.channels.close(name, agentSocket, bulkSocket);
      this.deps.logger.info({ vm: name }, 'guest channels closed');
    });
  }
}
