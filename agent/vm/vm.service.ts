/**
 * The VM domain service: starts, stops and tracks the control-plane VMs of this host, keeps
 * their records durable, and re-attaches to them after an agent restart. Transport-free (a
 * plain class; the Nest module / gRPC layer wraps it).
 *
 * Invariants (checked synchronously before the STARTING record is written, so concurrent
 * start() calls cannot race past them):
 *  - two active VMs never share a name, an agent socket path, or a rootfs path when either
 *    attaches it writable;
 *  - every active VM fits the host (HostProbe.admit) next to the other active VMs;
 *  - runtime files of VM <name> live in <stateDir>/vms/<name>/ and nowhere else.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { HostProbe, ResourceAmount } from '../host/host-probe';
import {
  ACTIVE_STATES,
  VmError,
  type Arch,
  type Hypervisor,
  type PowerdownResult,
  type VmEvent,
  type VmEventListener,
  type VmHandle,
  type VmLogger,
  type VmPaths,
  type VmSpec,
  type VmState,
} from './hypervisor';
import type { VmRecord, VmRecordStore } from './vm-record-store';

export interface VmServiceDeps {
  /** One hypervisor per guest arch this host can run. */
  hypervisors: readonly Hypervisor[];
  store: VmRecordStore;
  host: HostProbe;
  logger: VmLogger;
  /** Agent state directory; VM runtime dirs are <stateDir>/vms/<name>/. */
  stateDir: string;
  /** Kept free for the host (agent, routing daemons). Default 512 MiB, 0 CPUs. */
  reserve?: ResourceAmount;
}

/** What list()/get() return: the durable record, flattened for callers. */
export interface VmInfo {
  name: string;
  arch: Arch;
  state: VmState;
  pid: number | null;
  accelerator: string | null;
  imageVersion: string | null;
  imageDir: string | null;
  memoryMiB: number;
  cpus: number;
  paths: VmPaths;
  lastExit: string | null;
  createdAt: number;
  updatedAt: number;
}

export interface RecoverReport {
  reattached: string[];
  markedStopped: { name: string; reason: string }[];
  /** QEMU alive but QMP unanswered: record kept active (name/disk stay taken), not managed. */
  unreachable: { name: string; pid: number; reason: string }[];
}

/** sun_path is 108 bytes including the NUL. */
const MAX_UNIX_PATH = 107;
const NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$/;

/** VM names: what every entry point (gRPC, CLI, start()) accepts. Throws INVALID_ARGUMENT. */
export function checkVmName(name: unknown): string {
  if (typeof name !== 'string' || !NAME_RE.test(name)) {
    throw new VmError(
      'INVALID_ARGUMENT',
      `VM name '${String(name ?? '')}' is invalid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit.`,
    );
  }
  return name;
}

function isActive(state: VmState): boolean {
  return ACTIVE_STATES.includes(state);
}

function realOrResolved(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

function toInfo(r: VmRecord): VmInfo {
  return {
    name: r.name,
    arch: r.arch,
    state: r.state,
    pid: r.pid,
    accelerator: r.accelerator,
    imageVersion: r.spec.imageVersion ?? null,
    imageDir: r.spec.imageDir ?? null,
    memoryMiB: r.spec.memoryMiB,
    cpus: r.spec.cpus,
    paths: r.paths,
    lastExit: r.lastExit,
    createdAt: r.createdAt,
    updatedAt: r.updatedAt,
  };
}

export class VmService {
  private readonly hypervisors = new Map<Arch, Hypervisor>();
  private readonly handles = new Map<string, VmHandle>();
  private readonly unsubscribe = new Map<string, () => void>();
  private readonly listeners = new Set<VmEventListener>();
  private readonly reserve: ResourceAmount;

  constructor(private readonly deps: VmServiceDeps) {
    for (const h of deps.hypervisors) this.hypervisors.set(h.arch, h);
    this.reserve = deps.reserve ?? { memoryMiB: 512, cpus: 0 };
  }

  runtimePaths(name: string, agentSocketPath: string): VmPaths {
    const runDir = path.join(this.deps.stateDir, 'vms', name);
    return {
      runDir,
      qmpSocket: path.join(runDir, 'qmp.sock'),
      consoleSocket: path.join(runDir, 'console.sock'),
      consoleLog: path.join(runDir, 'console.log'),
      qemuLog: path.join(runDir, 'qemu.log'),
      pidFile: path.join(runDir, 'qemu.pid'),
      agentSocket: agentSocketPath,
      bulkSocket: path.join(runDir, 'bulk.sock'),
    };
  }

  /** Subscribe to events of all VMs; returns the unsubscribe function. */
  onEvent(cb: VmEventListener): () => void {
    this.listeners.add(cb);
    return () => this.listeners.delete(cb);
  }

  list(): VmInfo[] {
    return this.deps.store.list().map(toInfo);
  }

  get(name: string): VmInfo {
    return toInfo(this.record(name));
  }

  async start(spec: VmSpec): Promise<VmInfo> {
    const hv = this.validate(spec);
    const paths = this.runtimePaths(spec.name, spec.agentSocketPath);
    const previous = this.deps.store.get(spec.name);
    this.checkConflicts(spec, previous);
    const now = Date.now();
    const record: VmRecord = {
      name: spec.name,
      arch: spec.arch,
      spec: { ...spec },
      pid: null,
      paths,
      state: 'STARTING',
      accelerator: null,
      createdAt: now,
      updatedAt: now,
      lastExit: null,
    };
    // Written in the same tick as the checks: from here on the name, disk and socket are taken.
    this.deps.store.put(record);
    this.notify({ vm: spec.name, type: 'STATE', at: now, data: { state: 'STARTING', previous: previous?.state ?? null } });
    try {
      await this.deps.host.admit({ memoryMiB: spec.memoryMiB, cpus: spec.cpus }, this.reserve, this.committed(spec.name));
    } catch (e) {
      if (previous) this.deps.store.put(previous);
      else this.deps.store.delete(spec.name);
      throw e;
    }
    let handle: VmHandle;
    try {
      handle = await hv.launch(spec, paths);
    } catch (e) {
      this.update(spec.name, { state: 'STOPPED', lastExit: `start failed: ${(e as Error).message}` });
      throw e;
    }
    this.adopt(handle);
    this.update(spec.name, { state: 'RUNNING', pid: handle.pid, accelerator: handle.accelerator });
    this.deps.logger.info({ vm: spec.name, pid: handle.pid, accel: handle.accelerator }, 'VM started');
    return this.get(spec.name);
  }

  /** Graceful stop: guest powerdown, then QMP quit, then SIGKILL. Idempotent on stopped VMs. */
  async stop(name: string, opts: { timeoutMs?: number } = {}): Promise<PowerdownResult> {
    const r = this.record(name);
    let handle = this.handles.get(name);
    if (!isActive(r.state)) return { method: 'already-exited', elapsedMs: 0 };
    if (!handle) {
      // Active record without a handle: recover() could not reach QMP. Try once more.
      handle = await this.reattach(r);
      if (!handle) return { method: 'already-exited', elapsedMs: 0 };
    }
    this.update(name, { state: 'STOPPING' });
    let result: PowerdownResult;
    try {
      result = await handle.powerdown(opts.timeoutMs ?? 30_000);
    } catch (e) {
      this.update(name, { lastExit: `stop failed: ${(e as Error).message}` });
      throw e;
    }
    this.forget(name);
    this.update(name, { state: 'STOPPED', pid: null, lastExit: `stopped (${result.method}, ${result.elapsedMs} ms)` });
    return result;
  }

  /** SIGKILL of the VM's QEMU process group (also works when QMP is unreachable). */
  async kill(name: string): Promise<void> {
    const r = this.record(name);
    const handle = this.handles.get(name);
    if (handle) await handle.kill();
    else if (isActive(r.state) && r.pid !== null) {
      await this.deps.hypervisors.find((h) => h.arch === r.arch)?.killRecorded({ name, arch: r.arch, pid: r.pid, paths: r.paths });
    }
    this.forget(name);
    if (isActive(r.state) || handle) this.update(name, { state: 'STOPPED', pid: null, lastExit: 'killed' });
  }

  async pause(name: string): Promise<void> {
    await this.liveHandle(name, 'pause').pause();
    this.update(name, { state: 'PAUSED' });
  }

  /** The guest-visible link of NIC `device` (QMP set_link). */
  async setLink(name: string, device: string, up: boolean): Promise<void> {
    await this.liveHandle(name, up ? 'bring up a link of' : 'take down a link of').setLink(device, up);
  }

  async resume(name: string): Promise<void> {
    await this.liveHandle(name, 'resume').resume();
    this.update(name, { state: 'RUNNING' });
  }

  /** The last `bytes` bytes of the VM's serial console log (default 64 KiB). */
  async consoleLog(name: string, bytes = 64 * 1024): Promise<string> {
    return (await this.consoleLogBytes(name, bytes)).toString('utf8');
  }

  /** The same as raw bytes (a console may carry non-UTF-8 output). */
  async consoleLogBytes(name: string, bytes = 64 * 1024): Promise<Buffer> {
    const r = this.record(name);
    let fh: fs.promises.FileHandle;
    try {
      fh = await fs.promises.open(r.paths.consoleLog, 'r');
    } catch {
      return Buffer.alloc(0); // never booted far enough to write anything
    }
    try {
      const size = (await fh.stat()).size;
      const len = Math.min(bytes, size);
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, size - len);
      return buf;
    } finally {
      await fh.close();
    }
  }

  /**
   * On agent start: re-attach to every VM whose QEMU is alive and answers QMP; mark the rest
   * STOPPED. A QEMU that is alive but does not answer QMP is left running (it may be a router
   * carrying traffic) and keeps its record active, so its name and disk stay taken and a second
   * QEMU can never be started on them; it is reported as unreachable for an operator to decide
   * (recover again, or kill).
   */
  async recover(): Promise<RecoverReport> {
    const report: RecoverReport = { reattached: [], markedStopped: [], unreachable: [] };
    for (const r of this.deps.store.list()) {
      if (!isActive(r.state) || this.handles.has(r.name)) continue;
      const hv = this.hypervisors.get(r.arch);
      let reason: string;
      if (!hv) reason = `no hypervisor for arch ${r.arch} on this agent`;
      else if (r.pid === null) reason = 'QEMU was never launched (agent stopped during start)';
      else {
        try {
          const handle = await hv.attach({ name: r.name, arch: r.arch, pid: r.pid, paths: r.paths, accelerator: r.accelerator ?? undefined });
          this.adopt(handle);
          const st = await handle.status();
          this.update(r.name, { state: st.runState === 'paused' ? 'PAUSED' : 'RUNNING', accelerator: handle.accelerator });
          report.reattached.push(r.name);
          continue;
        } catch (e) {
          reason = (e as Error).message;
          if (e instanceof VmError && e.grpcCode === 'UNAVAILABLE') {
            this.update(r.name, { lastExit: `agent restart: ${reason}` });
            report.unreachable.push({ name: r.name, pid: r.pid, reason });
            this.deps.logger.warn({ vm: r.name, pid: r.pid, reason }, 'VM alive but QMP unreachable; left running, not managed');
            continue;
          }
        }
      }
      this.update(r.name, { state: 'STOPPED', pid: null, lastExit: `agent restart: ${reason}` });
      report.markedStopped.push({ name: r.name, reason });
      this.deps.logger.warn({ vm: r.name, pid: r.pid, reason }, 'VM not re-attached after agent restart');
    }
    return report;
  }

  /** Agent shutdown: let go of every QEMU without stopping it (they outlive the agent). */
  close(): void {
    for (const name of [...this.handles.keys()]) {
      this.handles.get(name)?.detach();
      this.forget(name);
    }
  }

  // --- internals -------------------------------------------------------------------------

  private record(name: string): VmRecord {
    const r = this.deps.store.get(name);
    if (!r) throw new VmError('NOT_FOUND', `No VM named ${name}; 'list' shows the VMs this host knows.`);
    return r;
  }

  /** Attach to an active record's QEMU; marks it STOPPED (and returns undefined) if it is gone. */
  private async reattach(r: VmRecord): Promise<VmHandle | undefined> {
    const hv = this.hypervisors.get(r.arch);
    if (hv && r.pid !== null) {
      try {
        const h = await hv.attach({ name: r.name, arch: r.arch, pid: r.pid, paths: r.paths, accelerator: r.accelerator ?? undefined });
        this.adopt(h);
        return h;
      } catch (e) {
        if (e instanceof VmError && e.grpcCode === 'UNAVAILABLE') throw e;
      }
    }
    this.update(r.name, { state: 'STOPPED', pid: null, lastExit: 'QEMU gone' });
    return undefined;
  }

  private liveHandle(name: string, what: string): VmHandle {
    const r = this.record(name);
    const h = this.handles.get(name);
    if (!h) throw new VmError('FAILED_PRECONDITION', `Cannot ${what} VM ${name}: it is ${r.state}, not running. Start it first.`);
    return h;
  }

  private update(name: string, patch: Partial<Pick<VmRecord, 'state' | 'pid' | 'accelerator' | 'lastExit'>>): void {
    const r = this.deps.store.get(name);
    if (!r) return;
    this.deps.store.put({ ...r, ...patch, updatedAt: Date.now() });
    if (patch.state && patch.state !== r.state) this.notify({ vm: name, type: 'STATE', at: Date.now(), data: { state: patch.state, previous: r.state } });
  }

  private notify(e: VmEvent): void {
    for (const l of [...this.listeners]) {
      try {
        l(e);
      } catch (err) {
        this.deps.logger.error({ err: (err as Error).message }, 'VM event listener threw');
      }
    }
  }

  private forget(name: string): void {
    this.unsubscribe.get(name)?.();
    this.unsubscribe.delete(name);
    this.handles.delete(name);
  }

  private adopt(handle: VmHandle): void {
    this.handles.set(handle.name, handle);
    this.unsubscribe.set(
      handle.name,
      handle.events.on((e) => this.onHandleEvent(e)),
    );
  }

  private onHandleEvent(e: VmEvent): void {
    try {
      this.recordEvent(e);
    } catch (err) {
      // The event still goes out: the upgrade's monitor must hear of a crash even when the
      // record cannot be stored (a full state disk); the stored state is stale until the next one.
      this.deps.logger.error({ vm: e.vm, event: e.type, err: (err as Error).message }, 'could not store the VM state change');
    }
    this.notify(e);
  }

  private recordEvent(e: VmEvent): void {
    switch (e.type) {
      case 'STOP':
        this.update(e.vm, { state: 'PAUSED' });
        break;
      case 'RESUME':
        this.update(e.vm, { state: 'RUNNING' });
        break;
      case 'SHUTDOWN':
        this.update(e.vm, { state: 'STOPPING' });
        break;
      case 'EXITED':
        this.forget(e.vm);
        this.update(e.vm, { state: 'STOPPED', pid: null, lastExit: 'QEMU exited after a shutdown' });
        break;
      case 'CRASHED':
        this.forget(e.vm);
        this.update(e.vm, { state: 'CRASHED', pid: null, lastExit: `crashed: ${JSON.stringify(e.data ?? {})}` });
        break;
      default:
        break;
    }
  }

  /** Memory and vCPUs held by active VMs other than `except`. */
  private committed(except: string): ResourceAmount {
    let memoryMiB = 0;
    let cpus = 0;
    for (const r of this.deps.store.list()) {
      if (r.name === except || !isActive(r.state)) continue;
      memoryMiB += r.spec.memoryMiB;
      cpus += r.spec.cpus;
    }
    return { memoryMiB, cpus };
  }

  private validate(spec: VmSpec): Hypervisor {
    const bad = (m: string) => new VmError('INVALID_ARGUMENT', m);
    if (!NAME_RE.test(spec.name ?? ''))
      throw bad(`VM name '${spec.name}' is invalid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit.`);
    const hv = this.hypervisors.get(spec.arch);
    if (!hv)
      throw new VmError(
        'FAILED_PRECONDITION',
        `This agent has no hypervisor for arch '${spec.arch}' (has: ${[...this.hypervisors.keys()].join(', ') || 'none'}); run the VM on a host configured for it.`,
      );
    if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 64) throw bad(`memoryMiB must be an integer >= 64, got ${spec.memoryMiB}.`);
    if (!Number.isInteger(spec.cpus) || spec.cpus < 1 || spec.cpus > 255) throw bad(`cpus must be an integer from 1 to 255, got ${spec.cpus}.`);
    for (const [what, p] of [
      ['kernelPath', spec.kernelPath],
      ['initrdPath', spec.initrdPath],
      ['rootfsPath', spec.rootfsPath],
      ['agentSocketPath', spec.agentSocketPath],
    ] as const) {
      if (typeof p !== 'string' || !path.isAbsolute(p)) throw bad(`${what} must be an absolute path, got '${p}'.`);
    }
    for (const [what, p] of [
      ['kernel', spec.kernelPath],
      ['initrd', spec.initrdPath],
      ['rootfs', spec.rootfsPath],
    ] as const) {
      if (!fs.existsSync(p)) throw new VmError('FAILED_PRECONDITION', `The ${what} file ${p} does not exist; build or fetch the image bundle first.`);
    }
    const paths = this.runtimePaths(spec.name, spec.agentSocketPath);
    for (const p of [paths.qmpSocket, paths.consoleSocket, paths.agentSocket, paths.bulkSocket ?? '']) {
      if (Buffer.byteLength(p) > MAX_UNIX_PATH)
        throw bad(`Socket path ${p} is longer than ${MAX_UNIX_PATH} bytes (unix socket limit); use a shorter state directory or VM name.`);
    }
    return hv;
  }

  private checkConflicts(spec: VmSpec, existing: VmRecord | undefined): void {
    if (existing && isActive(existing.state)) {
      throw new VmError(
        'ALREADY_EXISTS',
        `VM ${spec.name} already exists and is ${existing.state} (pid ${existing.pid ?? 'none yet'}); stop it first or choose another name.`,
      );
    }
    const rootfs = realOrResolved(spec.rootfsPath);
    const agentSock = path.resolve(spec.agentSocketPath);
    for (const other of this.deps.store.list()) {
      if (other.name === spec.name || !isActive(other.state)) continue;
      if (path.resolve(other.spec.agentSocketPath) === agentSock) {
        throw new VmError('ALREADY_EXISTS', `Agent socket ${agentSock} is already used by VM ${other.name}; give each VM its own socket path.`);
      }
      if (realOrResolved(other.spec.rootfsPath) === rootfs && (spec.rootfsWritable || other.spec.rootfsWritable)) {
        throw new VmError(
          'FAILED_PRECONDITION',
          `Disk ${rootfs} is attached ${other.spec.rootfsWritable ? 'writable' : 'read-only'} to VM ${other.name}; a writable disk cannot be shared. Use a copy of the image or stop ${other.name} first.`,
        );
      }
    }
  }
}
