/**
 * The VM platform port: what the domain (VmService) needs from a hypervisor, and what a
 * platform folder (platform/<name>/index.ts) must provide to plug a new arch/machine in.
 * Nothing here knows about QEMU argv; the generic QEMU launcher is agent/vm/qemu-hypervisor.ts.
 */
import { status } from '@grpc/grpc-js';
import { HitlessError } from '../common/errors';

/** Guest CPU architecture, spelled as `uname -m` prints it inside the guest. */
export type Arch = 'x86_64' | 'aarch64';
export const ARCHES: readonly Arch[] = ['x86_64', 'aarch64'];

export type Accelerator = 'kvm' | 'tcg';

/** What the caller asks for. Paths are host paths; sizes are MiB; cpus are vCPUs. */
export interface VmSpec {
  name: string;
  arch: Arch;
  kernelPath: string;
  initrdPath: string;
  rootfsPath: string;
  /** Default false: the rootfs is attached read-only and may be shared by several VMs. */
  rootfsWritable?: boolean;
  memoryMiB: number;
  cpus: number;
  /** Appended to the kernel command line after the platform's console= argument. */
  cmdlineExtra?: string;
  /** Version of the image bundle, recorded for the upgrade logic; not interpreted here. */
  imageVersion?: string;
  /** Bundle directory the kernel/initrd/rootfs come from (informational; recorded). */
  imageDir?: string;
  /**
   * Unix socket owned by the agent (it listens there). The guest reaches it as
   * tcp 10.0.2.100:7000 through QEMU's user-net guestfwd; nothing else is reachable.
   */
  agentSocketPath: string;
  /**
   * The control-plane NIC: a virtio-net device (id CP_NIC_ID) on a tap QEMU creates under this
   * name in its own namespace; the agent then moves the tap into the data plane (see
   * agent/dataplane). Every VM gets the same MAC, so the neighbours see one router.
   */
  cpNic?: { tap: string; mac: string };
}

/** QEMU device id of the control-plane NIC (QMP set_link names it). */
export const CP_NIC_ID = 'cpnic';

/** Per-VM runtime files, all under <stateDir>/vms/<name>/ except the agent socket. */
export interface VmPaths {
  runDir: string;
  qmpSocket: string;
  consoleSocket: string;
  consoleLog: string;
  qemuLog: string;
  pidFile: string;
  agentSocket: string;
  /**
   * Unix socket of the agent's bulk snapshot server for this VM; the guest reaches it as tcp
   * 10.0.2.100:7001. Optional: records written before it existed lack it (no guestfwd then).
   */
  bulkSocket?: string;
}

export type VmState = 'STARTING' | 'RUNNING' | 'PAUSED' | 'STOPPING' | 'STOPPED' | 'CRASHED';

/** States in which a QEMU process exists (or is being created) for the VM. */
export const ACTIVE_STATES: readonly VmState[] = ['STARTING', 'RUNNING', 'PAUSED', 'STOPPING'];

/**
 * Events of one VM. The QMP ones carry QMP's `data`; EXITED is a QEMU exit after a
 * SHUTDOWN (clean), CRASHED an exit without one (kill -9, segfault, OOM killer). STATE is
 * emitted by VmService (not by hypervisors) when the recorded state changes:
 * data = { state, previous }.
 */
export type VmEventType = 'STATE' | 'SHUTDOWN' | 'POWERDOWN' | 'STOP' | 'RESUME' | 'RESET' | 'GUEST_PANICKED' | 'EXITED' | 'CRASHED';

export interface VmEvent {
  vm: string;
  type: VmEventType;
  /** Host wall clock when the agent saw the event (ms since epoch). */
  at: number;
  data?: Record<string, unknown>;
}

export type VmEventListener = (event: VmEvent) => void;

/** A minimal typed event bus (EventEmitter semantics: synchronous, in subscription order). */
export class VmEventBus {
  private readonly listeners = new Set<VmEventListener>();

  /** Returns the unsubscribe function. */
  on(listener: VmEventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Resolves with the first event matching `pred`, or rejects after timeoutMs. */
  waitFor(pred: (e: VmEvent) => boolean, timeoutMs: number): Promise<VmEvent> {
    return new Promise((resolve, reject) => {
      const off = this.on((e) => {
        if (!pred(e)) return;
        clearTimeout(timer);
        off();
        resolve(e);
      });
      const timer = setTimeout(() => {
        off();
        reject(new Error(`no matching VM event within ${timeoutMs} ms`));
      }, timeoutMs);
    });
  }

  emit(event: VmEvent): void {
    for (const l of [...this.listeners]) {
      try {
        l(event);
      } catch {
        // A faulty listener must not stop the others nor the hypervisor's own bookkeeping.
      }
    }
  }
}

/** What `status()` reports: QMP query-status when reachable, else process liveness only. */
export interface VmRuntimeStatus {
  pid: number;
  alive: boolean;
  /** QMP RunState ('running', 'paused', 'shutdown', ...) or null when QMP is unreachable. */
  runState: string | null;
  qmpConnected: boolean;
}

/** How a powerdown ended: guest ACPI/GPIO shutdown, QMP quit after timeout, or SIGKILL. */
export interface PowerdownResult {
  method: 'guest' | 'quit' | 'sigkill' | 'already-exited';
  elapsedMs: number;
}

/** A live (launched or re-attached) QEMU. */
export interface VmHandle {
  readonly name: string;
  readonly arch: Arch;
  readonly pid: number;
  readonly paths: VmPaths;
  readonly accelerator: Accelerator;
  readonly events: VmEventBus;
  /** Resolves once the QEMU process has gone (clean exit or crash). */
  readonly exited: Promise<'EXITED' | 'CRASHED'>;
  status(): Promise<VmRuntimeStatus>;
  /** QMP system_powerdown, wait for exit; on timeout QMP quit, then SIGKILL of the group. */
  powerdown(timeoutMs: number): Promise<PowerdownResult>;
  /** SIGKILL to QEMU's process group; resolves when the process is gone. */
  kill(): Promise<void>;
  /** QMP stop / cont: vCPUs halt, devices and QMP stay up. */
  pause(): Promise<void>;
  /** QMP set_link on NIC `device`: the guest sees its carrier go, and nothing passes while down. */
  setLink(device: string, up: boolean): Promise<void>;
  resume(): Promise<void>;
  /** Forget the VM without touching it (agent shutdown): closes QMP, stops polling. */
  detach(): void;
}

/** What is persisted to find a QEMU again after an agent restart. */
export interface VmAttachRecord {
  name: string;
  arch: Arch;
  pid: number;
  paths: VmPaths;
  accelerator?: Accelerator;
}

/** The port. One instance per platform (arch + machine type). */
export interface Hypervisor {
  readonly arch: Arch;
  readonly platformId: string;
  /** KVM only when /dev/kvm opens and KVM really works for this QEMU binary; cached. */
  accelerator(): Promise<Accelerator>;
  /** Spawn QEMU detached (own process group, survives the agent), wait for QMP. */
  launch(spec: VmSpec, paths: VmPaths): Promise<VmHandle>;
  /**
   * Re-attach to a QEMU started by an earlier agent process, via pid + QMP socket. Throws
   * VmError NOT_FOUND when the process is gone, FAILED_PRECONDITION when the pid now belongs
   * to another program, UNAVAILABLE when this VM's QEMU is alive but QMP does not answer
   * (another QMP client holds the socket, or QEMU hangs).
   */
  attach(record: VmAttachRecord): Promise<VmHandle>;
  /** SIGKILL the recorded QEMU (process group) without a handle, if it is still this VM's. */
  killRecorded(record: VmAttachRecord): Promise<boolean>;
}

/** Everything a platform folder provides: the QEMU binary and argv for its machine. */
export interface PlatformProfile {
  /** Folder name under platform/, e.g. 'x86-kvm'. */
  readonly id: string;
  readonly arch: Arch;
  readonly qemuBinary: string;
  /** Guest device name of the serial console, for console= on the kernel command line. */
  readonly consoleDevice: string;
  /** Machine/CPU args for the KVM usability probe (must create a vCPU); default per binary. */
  readonly kvmProbeArgs?: string[];
  /** Full argv (without the binary) for one VM. Must put QMP on paths.qmpSocket etc. */
  buildArgv(spec: VmSpec, paths: VmPaths, accel: Accelerator): string[];
}

/** Logger shape shared with pino (obj first, message second). */
export interface VmLogger {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(obj: Record<string, unknown>, msg: string): void;
  error(obj: Record<string, unknown>, msg: string): void;
}

export type VmErrorCode =
  'ALREADY_EXISTS' | 'FAILED_PRECONDITION' | 'RESOURCE_EXHAUSTED' | 'NOT_FOUND' | 'INVALID_ARGUMENT' | 'DEADLINE_EXCEEDED' | 'UNAVAILABLE' | 'INTERNAL';

/** Domain error with a gRPC-like code name and a sentence saying what to do. */
export class VmError extends HitlessError {
  constructor(
    readonly grpcCode: VmErrorCode,
    message: string,
  ) {
    super(status[grpcCode], message);
    this.name = 'VmError';
  }
}
