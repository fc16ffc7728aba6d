/**
 * The generic QEMU launcher behind the Hypervisor port: spawns QEMU detached (own process
 * group + pid file + log file, so it outlives an agent restart), talks QMP, turns QMP events
 * and process death into VmEvents. All arch/machine knowledge comes from a PlatformProfile.
 *
 * Death detection (CRASHED within 1 s): three sources, first one wins — the launched process's
 * 'exit' (only when this agent launched QEMU, reported by its command runner), QMP socket close, and a 250 ms
 * process.kill(pid, 0) poll (the only one left after re-attach, when QEMU is not our child).
 */
import * as fs from 'node:fs';
import { hostCommands, type CommandRunner, type DetachedProcess } from '../host/command-runner';
import {
  VmError,
  VmEventBus,
  type Accelerator,
  type Arch,
  type Hypervisor,
  type PlatformProfile,
  type PowerdownResult,
  type VmAttachRecord,
  type VmEventType,
  type VmHandle,
  type VmLogger,
  type VmPaths,
  type VmRuntimeStatus,
  type VmSpec,
} from './hypervisor';
import { probeAccelerator } from './accelerator-probe';
import { guestLaunchCommand } from './guest-netns';
import { QmpClient, type QmpEvent } from './qmp-client';

export interface QemuHypervisorOptions {
  logger: VmLogger;
  /** Liveness poll period in ms; 250 keeps crash detection under 1 s. */
  pollIntervalMs?: number;
  /** How long launch() waits for QEMU's QMP socket to answer, ms. */
  qmpReadyTimeoutMs?: number;
  /** Override the accelerator (tests, or an operator forcing TCG). */
  forceAccelerator?: Accelerator;
}

/** ms between power-button presses during a graceful powerdown. */
const POWERDOWN_REPEAT_MS = 3000;

const QMP_EVENTS: ReadonlySet<string> = new Set(['SHUTDOWN', 'POWERDOWN', 'STOP', 'RESUME', 'RESET', 'GUEST_PANICKED']);

/** True while `pid` is a live (non-zombie) process. EPERM means it exists but is not ours. */
export function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false; // vanished between the two checks
  }
}

/** argv of a live process, to make sure a recorded pid was not reused by something else. */
export function processArgv(pid: number): string[] | null {
  try {
    return fs
      .readFileSync(`/proc/${pid}/cmdline`, 'utf8')
      .split('\0')
      .filter((s) => s.length > 0);
  } catch {
    return null;
  }
}

function tail(file: string, bytes: number): string {
  try {
    const fd = fs.openSync(file, 'r');
    try {
      const size = fs.fstatSync(fd).size;
      const len = Math.min(bytes, size);
      const buf = Buffer.alloc(len);
      fs.readSync(fd, buf, 0, len, size - len);
      return buf.toString('utf8');
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return '';
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => resolve('timeout'), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
}

export class QemuHypervisor implements Hypervisor {
  private readonly logger: VmLogger;
  private readonly pollIntervalMs: number;
  private readonly qmpReadyTimeoutMs: number;

  constructor(
    private readonly profile: PlatformProfile,
    private readonly opts: QemuHypervisorOptions,
    private readonly commands: CommandRunner = hostCommands,
  ) {
    this.logger = opts.logger;
    this.pollIntervalMs = opts.pollIntervalMs ?? 250;
    this.qmpReadyTimeoutMs = opts.qmpReadyTimeoutMs ?? 15_000;
  }

  get arch(): Arch {
    return this.profile.arch;
  }

  get platformId(): string {
    return this.profile.id;
  }

  accelerator(): Promise<Accelerator> {
    if (this.opts.forceAccelerator) return Promise.resolve(this.opts.forceAccelerator);
    return probeAccelerator(this.profile.qemuBinary, this.logger, this.profile.kvmProbeArgs);
  }

  async launch(spec: VmSpec, paths: VmPaths): Promise<VmHandle> {
    const accel = await this.accelerator();
    fs.mkdirSync(paths.runDir, { recursive: true, mode: 0o750 });
    // Stale sockets from a previous run would make QEMU fail to bind.
    for (const f of [paths.qmpSocket, paths.consoleSocket, paths.pidFile]) fs.rmSync(f, { force: true });
    const argv = this.profile.buildArgv(spec, paths, accel);
    const launch = await guestLaunchCommand(this.profile.qemuBinary, argv, this.logger);
    fs.appendFileSync(
      paths.qemuLog,
      `--- ${new Date().toISOString()} launch ${this.profile.qemuBinary} ${JSON.stringify(argv)}${launch.netns ? ' (private network namespace)' : ''}\n`,
    );
    // Detached: setsid(), so QEMU has its own process group and session and survives the
    // agent's death (and a Ctrl-C on the agent's terminal). stdio goes to qemu.log only.
    // Through the namespace wrapper the pid is still QEMU's: unshare and sh exec into it.
    // Started by the agent's command runner: a fork() from the agent itself held its event
    // loop for tens of ms (see host/command-runner.ts).
    let child: DetachedProcess;
    try {
      child = await this.commands.launchDetached(launch.command, launch.args, { cwd: paths.runDir, logPath: paths.qemuLog });
    } catch (e) {
      throw new VmError(
        'FAILED_PRECONDITION',
        `Cannot run ${this.profile.qemuBinary}: ${(e as Error).message}. Install QEMU (apt-get install qemu-system-x86 qemu-system-arm).`,
      );
    }
    const exitEarly = new Promise<string>((resolve) => {
      const say = (code: number | null, signal: string | null) =>
        resolve(
          code === 127 && launch.netns
            ? `${this.profile.qemuBinary} was not found (install QEMU: apt-get install qemu-system-x86 qemu-system-arm)`
            : `QEMU exited during start (code ${code}, signal ${signal})`,
        );
      if (child.exitCode !== null || child.signalCode !== null) say(child.exitCode, child.signalCode);
      else child.once('exit', say);
    });
    const pid = child.pid;
    this.logger.info({ vm: spec.name, pid, accel, platform: this.profile.id }, 'QEMU spawned');

    let qmp: QmpClient | null = null;
    let failure: string | null = null;
    void exitEarly.then((m) => (failure = m));
    const deadline = Date.now() + this.qmpReadyTimeoutMs;
    while (!qmp && !failure && Date.now() < deadline) {
      if (fs.existsSync(paths.qmpSocket)) {
        try {
          qmp = await QmpClient.connect(paths.qmpSocket, { timeoutMs: 3000 });
          break;
        } catch {
          // QEMU binds the socket a little before it accepts; retry.
        }
      }
      await sleep(50);
    }
    if (!qmp) {
      if (!failure) {
        failure = `QMP socket ${paths.qmpSocket} did not answer within ${this.qmpReadyTimeoutMs} ms`;
        try {
          process.kill(-pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      const log = tail(paths.qemuLog, 2000).trim().split('\n').slice(-5).join(' | ');
      throw new VmError('FAILED_PRECONDITION', `VM ${spec.name} did not start: ${failure}. QEMU said: ${log}. Fix the spec or the host and start it again.`);
    }
    return new QemuVmHandle(spec.name, this.profile.arch, pid, paths, accel, qmp, child, this.pollIntervalMs, this.logger);
  }

  /** The recorded pid is alive and its argv names this VM's QMP socket (pid not reused). */
  private isRecordedQemu(record: VmAttachRecord): boolean {
    return pidAlive(record.pid) && (processArgv(record.pid) ?? []).some((a) => a.includes(record.paths.qmpSocket));
  }

  async attach(record: VmAttachRecord): Promise<VmHandle> {
    if (!pidAlive(record.pid)) {
      throw new VmError('NOT_FOUND', `QEMU pid ${record.pid} of VM ${record.name} is not running; start the VM again.`);
    }
    if (!this.isRecordedQemu(record)) {
      throw new VmError('FAILED_PRECONDITION', `pid ${record.pid} is not the QEMU of VM ${record.name} (pid reused); start the VM again.`);
    }
    let qmp: QmpClient;
    try {
      qmp = await QmpClient.connect(record.paths.qmpSocket, { timeoutMs: 3000 });
    } catch (e) {
      throw new VmError(
        'UNAVAILABLE',
        `QEMU pid ${record.pid} of VM ${record.name} is alive but its QMP socket does not answer (${(e as Error).message}); close other QMP clients and run recover again, or kill the VM.`,
      );
    }
    let accel = record.accelerator;
    if (!accel) {
      const kvm = await qmp.execute<{ enabled: boolean }>('query-kvm');
      accel = kvm.enabled ? 'kvm' : 'tcg';
    }
    this.logger.info({ vm: record.name, pid: record.pid }, 'QEMU re-attached');
    return new QemuVmHandle(record.name, record.arch, record.pid, record.paths, accel, qmp, null, this.pollIntervalMs, this.logger);
  }

  async killRecorded(record: VmAttachRecord): Promise<boolean> {
    if (!this.isRecordedQemu(record)) return false;
    try {
      process.kill(-record.pid, 'SIGKILL');
    } catch {
      process.kill(record.pid, 'SIGKILL');
    }
    const deadline = Date.now() + 5000;
    while (pidAlive(record.pid) && Date.now() < deadline) await sleep(50);
    if (pidAlive(record.pid)) throw new VmError('INTERNAL', `QEMU pid ${record.pid} of VM ${record.name} survived SIGKILL for 5 s; check the host.`);
    return true;
  }
}

class QemuVmHandle implements VmHandle {
  readonly events = new VmEventBus();
  readonly exited: Promise<'EXITED' | 'CRASHED'>;
  private resolveExited!: (v: 'EXITED' | 'CRASHED') => void;
  private gone = false;
  private detached = false;
  /** Set on SHUTDOWN or when we asked for the exit (quit/kill): an exit is then not a crash. */
  private cleanExitExpected = false;
  private readonly poll: NodeJS.Timeout;

  constructor(
    readonly name: string,
    readonly arch: Arch,
    readonly pid: number,
    readonly paths: VmPaths,
    readonly accelerator: Accelerator,
    private qmp: QmpClient | null,
    private readonly child: DetachedProcess | null,
    pollIntervalMs: number,
    private readonly logger: VmLogger,
  ) {
    this.exited = new Promise((r) => (this.resolveExited = r));
    this.poll = setInterval(() => this.checkAlive('poll'), pollIntervalMs);
    this.poll.unref();
    if (child) {
      if (child.exitCode !== null || child.signalCode !== null) setImmediate(() => this.onGone('child-exit'));
      else child.once('exit', () => this.onGone('child-exit'));
    }
    if (qmp) this.wireQmp(qmp);
  }

  private wireQmp(qmp: QmpClient): void {
    qmp.on('event', (ev: QmpEvent) => {
      if (!QMP_EVENTS.has(ev.event) || this.detached) return;
      if (ev.event === 'SHUTDOWN') this.cleanExitExpected = true;
      this.emit(ev.event as VmEventType, ev.data);
    });
    qmp.on('close', () => {
      this.qmp = null;
      // QEMU closes QMP just before exiting: check now and shortly after, the poll covers the rest.
      this.checkAlive('qmp-close');
      setTimeout(() => this.checkAlive('qmp-close'), 50).unref();
    });
  }

  private emit(type: VmEventType, data?: Record<string, unknown>): void {
    this.events.emit({ vm: this.name, type, at: Date.now(), ...(data ? { data } : {}) });
  }

  private checkAlive(source: string): void {
    if (this.gone || this.detached) return;
    if (!pidAlive(this.pid)) this.onGone(source);
  }

  private onGone(source: string): void {
    if (this.gone || this.detached) return;
    this.gone = true;
    clearInterval(this.poll);
    this.qmp?.close();
    this.qmp = null;
    const type = this.cleanExitExpected ? 'EXITED' : 'CRASHED';
    const data: Record<string, unknown> = { pid: this.pid, detectedBy: source };
    if (this.child) {
      data.exitCode = this.child.exitCode;
      data.signal = this.child.signalCode;
    }
    if (type === 'CRASHED') this.logger.error({ vm: this.name, ...data }, 'QEMU died without a clean shutdown');
    this.emit(type, data);
    this.resolveExited(type);
  }

  async status(): Promise<VmRuntimeStatus> {
    const alive = !this.gone && pidAlive(this.pid);
    let runState: string | null = null;
    if (alive && this.qmp) {
      try {
        runState = (await this.qmp.execute<{ status: string }>('query-status', undefined, 3000)).status;
      } catch {
        runState = null;
      }
    }
    return { pid: this.pid, alive, runState, qmpConnected: this.qmp !== null };
  }

  private requireQmp(what: string): QmpClient {
    if (!this.qmp || this.gone) {
      throw new VmError(
        'FAILED_PRECONDITION',
        `Cannot ${what} VM ${this.name}: its QMP connection is gone (QEMU pid ${this.pid} exited or is unreachable). Check 'status' and restart the VM.`,
      );
    }
    return this.qmp;
  }

  async pause(): Promise<void> {
    await this.requireQmp('pause').execute('stop');
  }

  async resume(): Promise<void> {
    await this.requireQmp('resume').execute('cont');
  }

  async setLink(device: string, up: boolean): Promise<void> {
    await this.requireQmp(up ? 'bring up the link of' : 'take down the link of').execute('set_link', { name: device, up });
  }

  private killGroup(): void {
    try {
      process.kill(-this.pid, 'SIGKILL'); // QEMU and its guestfwd socat children
    } catch {
      try {
        process.kill(this.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }

  async kill(): Promise<void> {
    if (this.gone) return;
    this.cleanExitExpected = true; // requested: reported as EXITED, not CRASHED
    this.killGroup();
    if ((await withTimeout(this.exited, 5000)) === 'timeout') {
      throw new VmError('INTERNAL', `QEMU pid ${this.pid} of VM ${this.name} survived SIGKILL for 5 s; check the host (D state?).`);
    }
  }

  async powerdown(timeoutMs: number): Promise<PowerdownResult> {
    const t0 = Date.now();
    const elapsed = () => Date.now() - t0;
    if (this.gone || !pidAlive(this.pid)) {
      this.checkAlive('powerdown');
      return { method: 'already-exited', elapsedMs: elapsed() };
    }
    try {
      // A power-button press is an edge: one sent before the guest's handler listens (early
      // boot) is lost. Re-press every POWERDOWN_REPEAT_MS until the deadline; a guest that is
      // already shutting down ignores the extra presses.
      let exited = false;
      while (!exited && elapsed() < timeoutMs) {
        await this.qmp?.execute('system_powerdown', undefined, Math.min(timeoutMs, 5000));
        const wait = Math.min(POWERDOWN_REPEAT_MS, Math.max(0, timeoutMs - elapsed()));
        exited = (await withTimeout(this.exited, wait)) !== 'timeout';
      }
      if (exited) return { method: 'guest', elapsedMs: elapsed() };
      this.logger.warn({ vm: this.name, timeoutMs }, 'guest ignored ACPI/GPIO powerdown; sending QMP quit');
    } catch (e) {
      this.logger.warn({ vm: this.name, err: (e as Error).message }, 'system_powerdown failed; sending QMP quit');
    }
    this.cleanExitExpected = true;
    try {
      await this.qmp?.execute('quit', undefined, 2000);
      if ((await withTimeout(this.exited, 3000)) !== 'timeout') return { method: 'quit', elapsedMs: elapsed() };
    } catch {
      // QMP gone or hung: fall through to SIGKILL
      if ((await withTimeout(this.exited, 500)) !== 'timeout') return { method: 'quit', elapsedMs: elapsed() };
    }
    this.logger.warn({ vm: this.name, pid: this.pid }, 'QEMU did not quit; SIGKILL to its process group');
    this.killGroup();
    if ((await withTimeout(this.exited, 5000)) === 'timeout') {
      throw new VmError('INTERNAL', `QEMU pid ${this.pid} of VM ${this.name} survived SIGKILL for 5 s; check the host.`);
    }
    return { method: 'sigkill', elapsedMs: elapsed() };
  }

  detach(): void {
    if (this.detached) return;
    this.detached = true;
    clearInterval(this.poll);
    this.qmp?.removeAllListeners('event');
    this.qmp?.close();
    this.qmp = null;
  }
}
