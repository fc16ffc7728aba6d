/**
 * The ISSU state machine: loadversion, runversion, acceptversion, commitversion, abortversion
 * (and changeversion, all of them in a row), with a journal and a rollback timer.
 *
 *   LOADING -> LOADED -> SWITCHING -> SWITCHED -> (ACCEPTED) -> COMMITTING -> COMMITTED
 *        \________\___________\___________\____________\-> ABORTING -> ABORTED | ROLLED_BACK
 *
 * Invariants:
 * - At most one upgrade is not in a terminal phase (the journal says which); commands run one at
 *   a time (a mutex), so two concurrent upgrades are impossible.
 * - Every transition is journaled before its action starts; recover() finishes or undoes what a
 *   killed agent left half done, so a restart always ends in a consistent phase.
 * - Before commit the old VM keeps running with its processes as (demoted) standbys that follow
 *   every change, so an abort is a switchover back: hitless, nothing acknowledged lost.
 * - A refused or failed command leaves the running version as it was.
 *
 * It reaches the outside only through the ports below (VMs, checkpoint roles, image checks).
 */
import crypto from 'node:crypto';
import { EventEmitter } from 'node:events';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import { HitlessError, aborted, deadlineExceeded, failedPrecondition, invalidArgument } from '../common/errors';
import { Logger } from '../common/logger';
import { PeerStatus, ProcessStatus, SwitchoverResponse, AuditResponse } from '../checkpoint/messages';
import { Manifest, readManifest } from '../images/manifest';
import { ProcessCompatibility, assertCompatible, compatibilityMatrix } from '../images/compatibility';
import { auditNotRun, auditRecord } from './audit-record';
import { LoopStallWatch } from '../common/loop-stall-watch';
import { LagRecorder } from './lag-recorder';
import { Phase, SessionRecord, TERMINAL, UpgradeRecord, UpgradeStore } from './upgrade-store';
import type { ReportedSession } from '../checkpoint/checkpoint.service';
import type { SwitchoverHooks } from '../checkpoint/role-changes';
import { sessionOutcomeText } from '../report/session-outcome';
import type { DataPlaneChanges, DataPlaneStatusView } from '../dataplane/fib.service';

/** What the upgrade needs of the VM layer (VmSupervisor implements it). */
export interface UpgradeVms {
  start(req: { name: string; imageDir: string; cmdlineExtra?: string }): Promise<{ name: string }>;
  stop(name: string, timeoutMs?: number): Promise<unknown>;
  kill(name: string): Promise<void>;
  find(name: string): { name: string; state: string; imageDir: string | null; imageVersion: string | null } | undefined;
  onEvent(cb: (e: { vm: string; type: string }) => void): () => void;
  /** Control-plane NIC link of a VM (no-op without such NICs). */
  setControlLink(name: string, up: boolean): Promise<void>;
}

/** A SessionNotice may reach an upgrade this long after it ended (a graceful restart ends late), ms. */
const SESSION_NOTICE_GRACE_MS = 10 * 60_000;

/** What the upgrade needs of the checkpoint service. */
export interface UpgradeCheckpoint {
  status(process: string): ProcessStatus[];
  switchover(process: string, toInstance: string, hooks?: SwitchoverHooks): Promise<SwitchoverResponse>;
  failover(process: string, toInstance: string): Promise<SwitchoverResponse>;
  /** Every SessionNotice a process sends (how its protocol sessions fared at a handover). */
  onSessionNotice(l: (r: ReportedSession) => void): void;
  raiseWriteSchema(process: string, leavingVm: string): Promise<number>;
  audit(process: string): Promise<AuditResponse>;
}

/**
 * What the upgrade needs of the data plane (the FIB service): after every change of the active
 * instances it reconciles the data plane with the FIB table, and counts what that changed. An
 * upgrade whose routes did not change makes no change there.
 */
export interface UpgradeDataPlane {
  reconcile(cause: string): Promise<DataPlaneChanges | null>;
  status(): DataPlaneStatusView;
}

/** No data plane configured: nothing to reconcile. */
export const NO_UPGRADE_DATAPLANE: UpgradeDataPlane = {
  reconcile: async () => null,
  status: () => ({
    target: '',
    available: false,
    detail: 'no data plane configured (hitlessd --dataplane)',
    table: '',
    tableSeq: 0,
    programmedSeq: 0,
    routes: 0,
    pending: 0,
    failureCount: 0,
    failures: [],
    lastReconcile: null,
    changesProgrammed: 0,
  }),
};

export interface UpgradeImages {
  /** Verifies hashes and signature; resolves with the manifest. */
  verify(dir: string, onProgress: (done: number, total: number) => void): Promise<Manifest>;
}

export interface UpgradeOptions {
  rollbackTimeoutMs: number;
  /** loadversion gives the standby VM this long to boot and have every process READY. */
  loadTimeoutMs: number;
  /** A standby process may be gone this long (reconnecting) before the upgrade aborts. */
  peerGraceMs: number;
  stopTimeoutMs: number;
}

export const DEFAULT_UPGRADE_OPTIONS: UpgradeOptions = {
  rollbackTimeoutMs: 45 * 60_000,
  loadTimeoutMs: 10 * 60_000,
  peerGraceMs: 10_000,
  stopTimeoutMs: 30_000,
};

export interface UpgradeEvent {
  type: 'PHASE' | 'PROGRESS' | 'WARNING' | 'ERROR';
  upgradeId: string;
  phase: Phase | '';
  message: string;
  done: number;
  total: number;
  at: number;
  /** What done/total count, e.g. "verify image", "snapshot bgp", "catch up bgp"; '' for a plain message. */
  step: string;
  /** Unit of done/total: bytes, records, batches. */
  unit: string;
  /** Set on the event that reports what a switchover changed in the data plane. */
  dataplane?: DataPlaneChanges;
}

export interface UpgradeStatusView {
  current: (UpgradeRecord & { timerRemainingMs: number }) | null;
  processes: ProcessStatus[];
  history: UpgradeRecord[];
  dataplane: DataPlaneStatusView;
}

const VM_NAME_RE = /[^a-zA-Z0-9_.-]/g;

export class UpgradeService {
  readonly events = new EventEmitter();
  private chain: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | null = null;
  private monitorOff: (() => void) | null = null;
  private monitorTimer: NodeJS.Timeout | null = null;
  private readonly keeperOff: () => void;
  /** Samples the standbys' lag while an upgrade runs, for its report. */
  private readonly lag: LagRecorder;
  /** The agent's event-loop stalls while an upgrade runs, per phase (UpgradeRecord.loopMaxMs). */
  private readonly loopWatch = new LoopStallWatch();

  constructor(
    private readonly store: UpgradeStore,
    private readonly vms: UpgradeVms,
    private readonly checkpoint: UpgradeCheckpoint,
    private readonly images: UpgradeImages,
    private readonly log: Logger,
    private readonly opts: UpgradeOptions = DEFAULT_UPGRADE_OPTIONS,
    private readonly dataplane: UpgradeDataPlane = NO_UPGRADE_DATAPLANE,
  ) {
    this.events.setMaxListeners(100);
    this.lag = new LagRecorder(store, (p) => checkpoint.status(p), log);
    this.keeperOff = this.vms.onEvent((e) => this.keepControlPlane(e));
    checkpoint.onSessionNotice((r) => this.recordSession(r));
  }

  /**
   * Keeps a process's account of a protocol session in the upgrade whose VMs it concerns: the
   * current one, or the last one if it ended within SESSION_NOTICE_GRACE_MS (a graceful restart
   * is over only seconds after the switchover, and a commit may come first). Also an event.
   */
  private recordSession(r: ReportedSession): void {
    const last = this.store.current() ?? this.store.history(1)[0];
    if (!last || (last.fromVm !== r.vm && last.toVm !== r.vm)) return;
    if (TERMINAL.includes(last.phase) && Date.now() - last.updatedAt > SESSION_NOTICE_GRACE_MS) return;
    const rec: SessionRecord = {
      at: r.at,
      process: r.process,
      instance: r.instance,
      session: r.session,
      outcome: r.outcome as SessionRecord['outcome'],
      durationMs: r.durationMs,
      detail: r.detail,
    };
    this.store.addSession(last.id, rec);
    this.emit(r.outcome === 'NONSTOP' ? 'PROGRESS' : 'WARNING', last.id, last.phase, `${r.process}: ${sessionOutcomeText(rec)}`);
  }

  /**
   * The control plane the last upgrade left running: after a commit the new version's VM, after
   * an abort or a rollback the old one's. Null while an upgrade runs or before any upgrade.
   */
  private leftRunning(): { id: string; phase: Phase; vm: string; image: string } | null {
    if (this.store.current()) return null;
    const last = this.store.history(1)[0];
    if (last?.phase === 'COMMITTED') return { id: last.id, phase: last.phase, vm: last.toVm, image: last.toImage };
    if (last?.phase === 'ROLLED_BACK' || last?.phase === 'ABORTED') return { id: last.id, phase: last.phase, vm: last.fromVm, image: last.fromImage };
    return null;
  }

  /**
   * Once an upgrade has ended, one VM is the only control plane (leftRunning). When it crashes
   * (QEMU died, the guest panicked; not a stop by an operator) while no upgrade runs, it is
   * started again from the same image, without the role it may have been loaded with: its
   * processes find no active, take the role and reload their tables from the agent, which holds
   * every acknowledged change. A crash during the ending itself (the old VM dying just after a
   * rollback made it active, while the new one was being stopped) is covered too: the ending
   * calls this once it is journaled.
   */
  private keepControlPlane(e: { vm: string; type: string }): void {
    if (e.type !== 'CRASHED' && e.type !== 'GUEST_PANICKED') return;
    const left = this.leftRunning();
    if (!left || e.vm !== left.vm) return;
    void this.serial(async () => {
      const again = this.leftRunning();
      if (again?.id !== left.id || again.vm !== left.vm || this.isAlive(left.vm)) return;
      this.emit(
        'WARNING',
        left.id,
        left.phase,
        `the control-plane VM ${left.vm} ${e.type === 'CRASHED' ? 'crashed' : 'panicked'}; starting it again from ${left.image}`,
      );
      await this.vms.kill(left.vm).catch(() => undefined); // a panicked guest's QEMU still runs
      await this.vms.start({ name: left.vm, imageDir: left.image });
    }).catch((err: Error) => this.log.error({ vm: left.vm, err: err.message }, 'could not restart the crashed control-plane VM; start it with issu vm start'));
  }

  // ------------------------------------------------------------------ commands

  /** Runs commands one at a time: the state machine never sees two at once. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.chain.then(fn, fn);
    this.chain = p.catch(() => undefined);
    return p;
  }

  loadVersion(imageDir: string): Promise<UpgradeStatusView> {
    return this.serial(() =>
      this.doLoad(imageDir).finally(() => {
        // Refused before it began (or ended already): no phase is left to watch.
        if (!this.store.current()) this.loopWatch.stop();
      }),
    );
  }

  runVersion(): Promise<UpgradeStatusView> {
    return this.serial(() => this.doRun());
  }

  acceptVersion(): Promise<UpgradeStatusView> {
    return this.serial(async () => {
      const cur = this.store.current();
      if (!cur) {
        const last = this.store.history(1)[0];
        if (last?.phase === 'COMMITTED') return this.status();
        throw failedPrecondition('no upgrade is in progress; there is nothing to accept');
      }
      if (cur.phase === 'ACCEPTED') return this.status();
      if (cur.phase !== 'SWITCHED') throw failedPrecondition(`upgrade ${cur.id} is ${cur.phase}; acceptversion needs SWITCHED (run runversion first)`);
      this.clearTimer();
      this.transition(cur, 'ACCEPTED', 'rollback timer stopped by acceptversion', { timerDeadline: 0 });
      return this.status();
    });
  }

  commitVersion(): Promise<UpgradeStatusView> {
    return this.serial(async () => {
      const cur = this.store.current();
      if (!cur) {
        const last = this.store.history(1)[0];
        if (last?.phase === 'COMMITTED') return this.status();
        throw failedPrecondition('no upgrade is in progress; there is nothing to commit');
      }
      if (cur.phase !== 'SWITCHED' && cur.phase !== 'ACCEPTED' && cur.phase !== 'COMMITTING') {
        throw failedPrecondition(`upgrade ${cur.id} is ${cur.phase}; commitversion needs SWITCHED or ACCEPTED (run runversion first)`);
      }
      await this.doCommit(cur);
      return this.status();
    });
  }

  abortVersion(reason = 'abortversion by the operator'): Promise<UpgradeStatusView> {
    return this.serial(async () => {
      const cur = this.store.current();
      if (!cur) return this.status(); // nothing in progress: already aborted or committed
      if (cur.phase === 'COMMITTING')
        throw failedPrecondition(`upgrade ${cur.id} is committing (the old version is being stopped); it can no longer be aborted`);
      await this.doAbort(cur, reason);
      return this.status();
    });
  }

  /** The whole flow in one command, with the same checks and stops. */
  changeVersion(imageDir: string): Promise<UpgradeStatusView> {
    return this.serial(async () => {
      await this.doLoad(imageDir);
      await this.doRun();
      const cur = this.store.current()!;
      this.clearTimer();
      const accepted = this.transition(cur, 'ACCEPTED', 'changeversion accepts at once', { timerDeadline: 0 });
      await this.doCommit(accepted);
      return this.status();
    });
  }

  status(): UpgradeStatusView {
    const cur = this.store.current();
    return {
      current: cur ? { ...cur, timerRemainingMs: cur.timerDeadline ? Math.max(0, cur.timerDeadline - Date.now()) : 0 } : null,
      processes: this.checkpoint.status(''),
      history: this.store.history(10),
      dataplane: this.dataplane.status(),
    };
  }

  /** The running control-plane version (VM, image, manifest), or null when none runs. */
  running(): { vm: string; imageDir: string; manifest: Manifest } | null {
    try {
      const r = this.runningSystem();
      return { vm: r.vm, imageDir: r.imageDir, manifest: r.manifest };
    } catch {
      return null;
    }
  }

  /** The compatibility matrix between the running version and `imageDir`; changes nothing. */
  compatibility(imageDir: string): { running: string; candidate: string; matrix: ProcessCompatibility[]; compatible: boolean; reason: string } {
    const dir = this.checkImageDir(imageDir);
    const running = this.runningSystem();
    const candidate = readManifest(dir);
    const matrix = compatibilityMatrix(running.manifest, candidate);
    let reason = '';
    try {
      assertCompatible(matrix);
    } catch (e) {
      reason = (e as Error).message;
    }
    return { running: running.manifest.version, candidate: candidate.version, matrix, compatible: reason === '', reason };
  }

  // ------------------------------------------------------------------ the flow

  private async doLoad(imageDirIn: string): Promise<UpgradeStatusView> {
    const imageDir = this.checkImageDir(imageDirIn);
    const cur = this.store.current();
    if (cur) {
      if (cur.toImage === imageDir && (cur.phase === 'LOADED' || cur.phase === 'SWITCHED' || cur.phase === 'ACCEPTED')) return this.status();
      throw failedPrecondition(
        `an upgrade is already in progress: ${cur.id} from ${cur.fromVersion} to ${cur.toVersion} is ${cur.phase}; finish it with commitversion or abortversion first`,
      );
    }
    const running = this.runningSystem();
    // LOADING's stall figure covers the image's verification too (see transition()); an upgrade
    // refused before its record exists has none.
    this.loopWatch.start();
    this.loopWatch.take();
    const manifest = await this.images.verify(imageDir, (done, total) =>
      this.emit('PROGRESS', '', '', `sha256 of ${imageDir}`, done, total, { step: 'verify image', unit: 'bytes' }),
    );
    const matrix = compatibilityMatrix(running.manifest, manifest);
    assertCompatible(matrix);
    if (manifest.version === running.manifest.version && path.resolve(running.imageDir) === imageDir) {
      throw failedPrecondition(`version ${manifest.version} from ${imageDir} is already running in VM ${running.vm}`);
    }
    const toVm = this.freeVmName(`${manifest.name}-${manifest.version}`);
    const processes: UpgradeRecord['processes'] = {};
    for (const p of manifest.processes) {
      const from = running.actives.get(p.name);
      if (!from)
        throw failedPrecondition(`process '${p.name}' of version ${manifest.version} has no active instance in the running version; it cannot take over state`);
      processes[p.name] = { from, to: `${p.name}@${toVm}` };
    }
    const id = `u-${new Date().toISOString().replace(/[-:T]/g, '').slice(0, 14)}-${crypto.randomBytes(2).toString('hex')}`;
    const rec: UpgradeRecord = {
      id,
      phase: 'LOADING',
      fromVm: running.vm,
      fromImage: running.imageDir,
      fromVersion: running.manifest.version,
      toVm,
      toImage: imageDir,
      toVersion: manifest.version,
      startedAt: Date.now(),
      updatedAt: Date.now(),
      timerDeadline: 0,
      processes,
      result: '',
      freezeMs: 0,
    };
    this.store.create(rec, `loadversion ${imageDir}: booting standby VM ${toVm}`);
    this.lag.start(rec);
    this.emit('PHASE', id, 'LOADING', `loading ${manifest.version} into standby VM ${toVm}`);
    try {
      await this.vms.start({ name: toVm, imageDir, cmdlineExtra: 'hitless.role=standby' });
      this.emit('PROGRESS', id, 'LOADING', `VM ${toVm} launched; waiting for its processes to register and sync`);
      await this.waitStandbysReady(rec);
    } catch (e) {
      await this.vms.stop(toVm, this.opts.stopTimeoutMs).catch(() => this.vms.kill(toVm).catch(() => undefined));
      await this.recordOutcome(rec, 'ABORTED', `loadversion failed: ${(e as Error).message}`, { result: (e as Error).message });
      throw e;
    }
    await this.recordOutcome(rec, 'LOADED', 'every standby process is READY');
    this.startMonitor();
    return this.status();
  }

  private async doRun(): Promise<UpgradeStatusView> {
    const cur = this.store.current();
    if (!cur) throw failedPrecondition('no version is loaded; run loadversion IMAGE first');
    if (cur.phase === 'SWITCHED' || cur.phase === 'ACCEPTED') return this.status();
    if (cur.phase !== 'LOADED') throw failedPrecondition(`upgrade ${cur.id} is ${cur.phase}; runversion needs LOADED`);
    this.checkStandbysReady(cur);
    let rec = this.transition(cur, 'SWITCHING', 'switching every process to the new version');
    const switched: string[] = [];
    let freezeMs = 0;
    const freezes: Record<string, number> = {};
    try {
      for (const [p, inst] of Object.entries(rec.processes)) {
        const r = await this.switchoverWithLink(rec, 'SWITCHING', p, inst.to, rec.fromVm, rec.toVm, switched.length === 0);
        freezes[p] = r.freezeMicros / 1000;
        freezeMs = Math.max(freezeMs, freezes[p]);
        switched.push(p);
        this.emit(
          'PROGRESS',
          rec.id,
          'SWITCHING',
          `${p}: ${inst.to} is active (writers frozen ${(r.freezeMicros / 1000).toFixed(2)} ms)`,
          switched.length,
          Object.keys(rec.processes).length,
        );
      }
    } catch (e) {
      // Put back what moved; the old version stays in charge and the new one stays loaded.
      for (const [i, p] of switched.reverse().entries()) {
        await this.switchoverWithLink(rec, 'SWITCHING', p, rec.processes[p].from, rec.toVm, rec.fromVm, i === 0).catch(() => undefined);
      }
      if (switched.length) await this.moveControlLink(rec, 'SWITCHING', rec.toVm, rec.fromVm);
      await this.recordOutcome(rec, 'LOADED', `runversion failed and was undone: ${(e as Error).message}`);
      throw e;
    }
    await this.moveControlLink(rec, 'SWITCHING', rec.fromVm, rec.toVm);
    const dataplane = await this.reconcileDataPlane(rec, 'SWITCHING', `switchover to ${rec.toVm}`);
    rec = await this.recordOutcome(rec, 'SWITCHED', `new version active; rollback timer ${Math.round(this.opts.rollbackTimeoutMs / 1000)} s`, {
      timerDeadline: Date.now() + this.opts.rollbackTimeoutMs,
      freezeMs,
      freezes,
      dataplane,
    });
    this.armTimer(rec);
    return this.status();
  }

  private async doCommit(cur: UpgradeRecord, why = ''): Promise<void> {
    this.clearTimer();
    const rec =
      cur.phase === 'COMMITTING'
        ? cur
        : this.transition(cur, 'COMMITTING', why || `stopping the old version's VM ${cur.fromVm}`, { timerDeadline: 0, ...(why ? { result: why } : {}) });
    this.stopMonitor();
    if (!this.isAlive(rec.toVm) && this.isAlive(rec.fromVm)) {
      // The new version died before the old one was stopped: keep the old one instead.
      await this.doAbort(rec, `the new version's VM ${rec.toVm} is gone; the commit was not completed`);
      throw aborted(
        `commitversion did not complete: the new version's VM ${rec.toVm} is gone, so ${rec.fromVersion} stays (rolled back); see 'issu vm log ${rec.toVm}'`,
      );
    }
    // The new version must hold every role before the old one goes. After a normal runversion it
    // does; after a crash of the old version (fail-forward) or an agent restart it may not yet.
    let moved = false;
    try {
      for (const [p, inst] of Object.entries(rec.processes)) moved = (await this.restoreActive(rec, p, inst.to, rec.toVm, rec.fromVm, !moved)) || moved;
    } catch (e) {
      if (!(e instanceof TargetVmGone) || !this.isAlive(rec.fromVm)) throw e;
      await this.doAbort(rec, `the new version's VM ${rec.toVm} died during the commit`);
      throw aborted(
        `commitversion did not complete: the new version's VM ${rec.toVm} died, so ${rec.fromVersion} stays (rolled back); see 'issu vm log ${rec.toVm}'`,
      );
    }
    await this.stopVm(rec.fromVm);
    // Nothing can roll back to the old version now: its readers are gone, so the new version
    // writes its own schema from here on (not fatal: the old schema stays readable).
    for (const p of Object.keys(rec.processes)) {
      await this.checkpoint
        .raiseWriteSchema(p, rec.fromVm)
        .catch((e: Error) => this.log.warn({ process: p, err: e.message }, 'could not raise the write schema after commit'));
    }
    if (moved) await this.moveControlLink(rec, 'COMMITTING', rec.fromVm, rec.toVm);
    const dataplane = moved ? await this.reconcileDataPlane(rec, 'COMMITTING', `${rec.toVm} took over`) : rec.dataplane;
    await this.auditForReport(rec, 'COMMITTED');
    await this.recordOutcome(rec, 'COMMITTED', `${rec.toVersion} committed; ${rec.fromVm} stopped${rec.result ? ` (${rec.result})` : ''}`, { dataplane });
    // It may have died while the old one was being stopped: its crash event came too early for
    // keepControlPlane, which waits for COMMITTED (queued: this runs inside a command).
    if (!this.isAlive(rec.toVm)) this.keepControlPlane({ vm: rec.toVm, type: 'CRASHED' });
  }

  private async doAbort(cur: UpgradeRecord, reason: string): Promise<void> {
    this.clearTimer();
    this.stopMonitor();
    if (!this.isAlive(cur.fromVm) && this.isAlive(cur.toVm) && cur.phase !== 'LOADING') {
      // Nothing to go back to: the old version's VM is gone. The loaded new version, which holds
      // every acknowledged change, takes over for good.
      return this.doCommit(cur, `the old version's VM ${cur.fromVm} is gone (${reason}); ${cur.toVersion} took over and there is nothing to roll back to`);
    }
    const switchedOver =
      cur.phase === 'SWITCHING' ||
      cur.phase === 'SWITCHED' ||
      cur.phase === 'ACCEPTED' ||
      cur.phase === 'COMMITTING' ||
      (cur.phase === 'ABORTING' && cur.result.startsWith('rollback'));
    const rec =
      cur.phase === 'ABORTING' ? cur : this.transition(cur, 'ABORTING', reason, { timerDeadline: 0, result: switchedOver ? `rollback: ${reason}` : reason });
    let dataplane = rec.dataplane;
    if (switchedOver) {
      await this.waitForProcesses(rec, this.opts.peerGraceMs);
      try {
        let moved = false;
        for (const [p, inst] of Object.entries(rec.processes)) moved = (await this.restoreActive(rec, p, inst.from, rec.fromVm, rec.toVm, !moved)) || moved;
      } catch (e) {
        if (!(e instanceof TargetVmGone) || !this.isAlive(rec.toVm)) throw e;
        // The old version died on the way back: the new one, still running, stays for good.
        return this.doCommit(
          rec,
          `the old version's VM ${rec.fromVm} died during the rollback (${reason}); ${rec.toVersion} stays and there is nothing to roll back to`,
        );
      }
    }
    if (switchedOver && !this.isAlive(rec.fromVm) && this.isAlive(rec.toVm)) {
      // The old version died after it took its roles back: the new one, still running and
      // following every change, takes over for good rather than being stopped too.
      return this.doCommit(
        rec,
        `the old version's VM ${rec.fromVm} died during the rollback (${reason}); ${rec.toVersion} stays and there is nothing to roll back to`,
      );
    }
    if (switchedOver) {
      await this.moveControlLink(rec, 'ABORTING', rec.toVm, rec.fromVm);
      dataplane = await this.reconcileDataPlane(rec, 'ABORTING', `rollback to ${rec.fromVm}`);
    }
    await this.stopVm(rec.toVm);
    const ended = switchedOver ? 'ROLLED_BACK' : 'ABORTED';
    await this.auditForReport(rec, ended);
    await this.recordOutcome(rec, ended, switchedOver ? `back on ${rec.fromVersion}: ${reason}` : `aborted: ${reason}`, { dataplane });
    // It may have died while the new one was being stopped (its crash event came before the
    // journal said who is left running): start it again now.
    if (!this.isAlive(rec.fromVm)) this.keepControlPlane({ vm: rec.fromVm, type: 'CRASHED' });
  }

  /**
   * Makes `target` the active instance of `process`, leaving the instance in `leavingVm`: a
   * switchover while that one is alive, a failover once it is gone. A crashed VM's sessions take
   * a moment to close, and a command can race with that; so it retries until the deadline.
   * Rollback passes the old instance (in the old VM), leaving the new VM; commit and fail-forward
   * the reverse. Throws TargetVmGone as soon as `targetVm` stopped or crashed: the caller then turns
   * to the other version instead of retrying in vain.
   */
  private async restoreActive(rec: UpgradeRecord, process: string, target: string, targetVm: string, leavingVm: string, moveLink = false): Promise<boolean> {
    const deadline = Date.now() + Math.max(30_000, this.opts.peerGraceMs);
    const phase = this.store.current()?.phase ?? rec.phase;
    for (let moved = false; ; moved = true) {
      const active = this.checkpoint.status(process)[0]?.peers.find((x) => x.role === 'ACTIVE');
      if (active?.instanceId === target) return moved;
      if (!this.isAlive(targetVm)) throw new TargetVmGone(`${target} cannot take over: its VM ${targetVm} is gone`);
      try {
        if (!active) {
          const r = await this.checkpoint.failover(process, target);
          this.emit('PROGRESS', rec.id, phase, `${process}: ${target} promoted (failover, ${(r.freezeMicros / 1000).toFixed(2)} ms)`);
        } else if (this.isAlive(leavingVm) || active.vmId !== leavingVm) {
          const r = await this.switchoverWithLink(rec, phase, process, target, leavingVm, targetVm, moveLink);
          this.emit('PROGRESS', rec.id, phase, `${process}: ${target} is active (writers frozen ${(r.freezeMicros / 1000).toFixed(2)} ms)`);
        } else {
          await sleep(200); // the dead VM's session is closing
        }
      } catch (e) {
        if (Date.now() > deadline) throw e;
        this.emit('WARNING', rec.id, phase, `${process}: ${(e as Error).message}; retrying`);
        await sleep(500);
      }
    }
  }

  /**
   * Whether the VM exists and has not stopped or crashed. A paused VM (an operator's `issu vm
   * pause`) is alive: pausing must not roll an upgrade back.
   */
  private isAlive(vm: string): boolean {
    const state = this.vms.find(vm)?.state;
    return state !== undefined && state !== 'STOPPED' && state !== 'CRASHED';
  }

  // ------------------------------------------------------------------ restart recovery

  /** After an agent restart: finish or undo whatever the journal says was under way. */
  async recover(): Promise<string> {
    return this.serial(async () => {
      const cur = this.store.current();
      if (!cur) return 'no upgrade in progress';
      this.log.warn({ upgrade: cur.id, phase: cur.phase }, 'agent restarted during an upgrade; recovering');
      this.lag.start(cur);
      this.loopWatch.start();
      switch (cur.phase) {
        case 'LOADING':
          await this.doAbort(cur, 'the agent restarted during loadversion');
          return 'aborted an interrupted loadversion';
        case 'LOADED':
          this.startMonitor();
          return 'kept the loaded version';
        case 'SWITCHING': {
          await this.waitForProcesses(cur, this.opts.peerGraceMs);
          const allMoved = Object.entries(cur.processes).every(([p, inst]) =>
            this.checkpoint.status(p)[0]?.peers.some((x) => x.instanceId === inst.to && x.role === 'ACTIVE'),
          );
          if (allMoved) {
            const rec = await this.recordOutcome(cur, 'SWITCHED', 'the agent restarted after every process had switched', {
              timerDeadline: Date.now() + this.opts.rollbackTimeoutMs,
            });
            this.armTimer(rec);
            this.startMonitor();
            return 'completed an interrupted runversion';
          }
          await this.doAbort(cur, 'the agent restarted during runversion');
          return 'rolled back an interrupted runversion';
        }
        case 'SWITCHED':
        case 'ACCEPTED':
          this.armTimer(cur);
          this.startMonitor();
          return 'kept the switched version';
        case 'COMMITTING':
          await this.doCommit(cur);
          return 'finished an interrupted commit';
        case 'ABORTING':
          await this.doAbort(cur, cur.result || 'the agent restarted during abort');
          return 'finished an interrupted abort';
        default:
          return `nothing to do in ${cur.phase}`;
      }
    });
  }

  close(): void {
    this.lag.stop();
    this.loopWatch.stop();
    this.keeperOff();
    this.clearTimer();
    this.stopMonitor();
  }

  // ------------------------------------------------------------------ helpers

  private checkImageDir(dir: string): string {
    if (!dir) throw invalidArgument('image directory is empty; give the path of an image bundle (a directory with manifest.json)');
    if (!path.isAbsolute(dir)) throw invalidArgument(`image directory '${dir}' must be an absolute path on the agent's host`);
    return path.resolve(dir);
  }

  /** The VM all active processes run in, with its manifest. */
  private runningSystem(): { vm: string; imageDir: string; manifest: Manifest; actives: Map<string, string> } {
    const actives = new Map<string, string>();
    const vms = new Set<string>();
    for (const p of this.checkpoint.status('')) {
      const a = p.peers.find((x) => x.role === 'ACTIVE');
      if (a) {
        actives.set(p.process, a.instanceId);
        vms.add(a.vmId);
      }
    }
    if (vms.size === 0)
      throw failedPrecondition('no process is ACTIVE, so there is no running version to upgrade; start the control-plane VM first (issu vm start)');
    if (vms.size > 1) throw failedPrecondition(`active processes run in several VMs (${[...vms].join(', ')}); an upgrade needs one running control-plane VM`);
    const vm = [...vms][0];
    const info = this.vms.find(vm);
    if (!info?.imageDir)
      throw failedPrecondition(`the active processes run in '${vm}', which is not a VM this agent started from an image; upgrades need an agent-managed VM`);
    return { vm, imageDir: info.imageDir, manifest: readManifest(info.imageDir), actives };
  }

  private freeVmName(base: string): string {
    const clean = base.replace(VM_NAME_RE, '-').slice(0, 56);
    for (let i = 0; ; i++) {
      const name = i === 0 ? clean : `${clean}-${i + 1}`;
      const v = this.vms.find(name);
      if (!v || v.state === 'STOPPED' || v.state === 'CRASHED' || v.state === 'EXITED') return name;
    }
  }

  private peerOf(process: string, instance: string) {
    return this.checkpoint.status(process)[0]?.peers.find((x) => x.instanceId === instance);
  }

  /**
   * Progress of one standby while loading, as steps an operator can read: waiting for the
   * process to register; "snapshot P" (records of its bulk snapshots sent, of the total); "catch
   * up P" (the batches behind when catching up began, falling to zero); READY. Lag alone rises
   * during a snapshot (nothing is acknowledged until it is applied) and reads as falling behind.
   */
  private reportSync(rec: UpgradeRecord, p: string, peer: PeerStatus | undefined, sync: Map<string, SyncProgress>): void {
    const st = sync.get(p) ?? { said: '', snapshotTotal: 0, lagMax: 0 };
    sync.set(p, st);
    const say = (message: string, done = 0, total = 0, step = '', unit = '') => {
      const key = `${message}|${done}|${total}|${step}`;
      if (key === st.said) return;
      st.said = key;
      this.emit('PROGRESS', rec.id, 'LOADING', message, done, total, { step, unit });
    };
    const endSnapshot = () => {
      if (st.snapshotTotal > 0) say('sent', st.snapshotTotal, st.snapshotTotal, `snapshot ${p}`, 'records');
      st.snapshotTotal = 0;
    };
    if (!peer) return say(`${p}: waiting for the process to register`);
    if (peer.snapshotRecordsTotal > 0) {
      st.snapshotTotal = peer.snapshotRecordsTotal;
      return say(`to ${peer.instanceId}`, peer.snapshotRecordsSent, peer.snapshotRecordsTotal, `snapshot ${p}`, 'records');
    }
    endSnapshot();
    // Before its first snapshot has started (or its first changes arrived) a standby's lag only
    // says how much is waiting for it: catching up starts once it has applied something.
    if (!peer.ready && !Object.values(peer.acked).some((q) => Number(q) > 0)) return say(`${peer.instanceId} registered; waiting for its snapshot`);
    if (peer.ready) {
      if (st.lagMax > 0) say(`${p}: caught up`, st.lagMax, st.lagMax, `catch up ${p}`, 'batches');
      st.lagMax = 0;
      return say(`${p}: READY`);
    }
    st.lagMax = Math.max(st.lagMax, peer.lag);
    if (st.lagMax > 0) say(`${peer.instanceId} applies the changes made since its snapshot`, st.lagMax - peer.lag, st.lagMax, `catch up ${p}`, 'batches');
  }

  private checkStandbysReady(rec: UpgradeRecord): void {
    for (const [p, inst] of Object.entries(rec.processes)) {
      const peer = this.peerOf(p, inst.to);
      if (!peer)
        throw failedPrecondition(
          `standby '${inst.to}' of process '${p}' is not registered; check the standby VM ${rec.toVm} (issu vm log ${rec.toVm}) or abortversion`,
        );
      if (!peer.ready)
        throw failedPrecondition(`standby '${inst.to}' of process '${p}' is not READY (lag ${peer.lag} batches); wait, then run runversion again`);
    }
  }

  private async waitStandbysReady(rec: UpgradeRecord): Promise<void> {
    const deadline = Date.now() + this.opts.loadTimeoutMs;
    let vmGone = '';
    const off = this.vms.onEvent((e) => {
      if (e.vm === rec.toVm && (e.type === 'EXITED' || e.type === 'CRASHED' || e.type === 'GUEST_PANICKED')) vmGone = e.type;
    });
    try {
      const sync = new Map<string, SyncProgress>();
      for (;;) {
        if (vmGone) throw aborted(`standby VM ${rec.toVm} ${vmGone.toLowerCase()} while loading; see 'issu vm log ${rec.toVm}'`);
        const states = Object.entries(rec.processes).map(([p, inst]) => ({ p, peer: this.peerOf(p, inst.to) }));
        for (const { p, peer } of states) this.reportSync(rec, p, peer, sync);
        const ready = states.filter((s) => s.peer?.ready).length;
        if (ready === states.length) return;
        if (Date.now() > deadline) {
          const line = states.map((s) => `${s.p}: ${s.peer ? (s.peer.ready ? 'READY' : `syncing, lag ${s.peer.lag}`) : 'booting'}`).join(', ');
          throw deadlineExceeded(`standby processes not READY within ${Math.round(this.opts.loadTimeoutMs / 1000)} s (${line}); see 'issu vm log ${rec.toVm}'`);
        }
        await sleep(200);
      }
    } finally {
      off();
    }
  }

  /** After an agent restart processes reconnect; give them `graceMs` to re-register. */
  private async waitForProcesses(rec: UpgradeRecord, graceMs: number): Promise<void> {
    const deadline = Date.now() + graceMs;
    while (Date.now() < deadline) {
      const all = Object.entries(rec.processes).every(
        ([p, inst]) => this.peerOf(p, inst.from) && (this.peerOf(p, inst.to) || this.vms.find(rec.toVm)?.state !== 'RUNNING'),
      );
      if (all) return;
      await sleep(200);
    }
  }

  private async stopVm(name: string): Promise<void> {
    const v = this.vms.find(name);
    if (!v || v.state === 'STOPPED' || v.state === 'CRASHED' || v.state === 'EXITED') return;
    try {
      await this.vms.stop(name, this.opts.stopTimeoutMs);
    } catch (e) {
      this.emit('WARNING', '', '', `graceful stop of ${name} failed (${(e as Error).message}); killing it`);
      await this.vms.kill(name).catch(() => undefined);
    }
  }

  private armTimer(rec: UpgradeRecord): void {
    this.clearTimer();
    if (rec.phase !== 'SWITCHED' || !rec.timerDeadline) return;
    const ms = Math.max(0, rec.timerDeadline - Date.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      this.emit('WARNING', rec.id, 'SWITCHED', 'rollback timer expired without acceptversion; rolling back');
      void this.abortVersion('the rollback timer expired').catch((e) => this.log.error({ err: (e as Error).message }, 'automatic rollback failed'));
    }, ms);
    this.timer.unref();
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /**
   * Watches the loaded/switched upgrade: the standby VM dying before runversion aborts; the new
   * version's VM dying after it rolls back (failover to the old, still-following processes).
   */
  private startMonitor(): void {
    this.stopMonitor();
    const trigger = (why: string) => {
      const cur = this.store.current();
      if (!cur || TERMINAL.includes(cur.phase) || cur.phase === 'COMMITTING' || cur.phase === 'ABORTING') return;
      const forward = !this.isAlive(cur.fromVm) && this.isAlive(cur.toVm);
      this.emit('WARNING', cur.id, cur.phase, `${why}; ${forward ? 'the new version takes over' : cur.phase === 'LOADED' ? 'aborting' : 'rolling back'}`);
      void this.abortVersion(why).catch((e) => this.log.error({ err: (e as Error).message }, 'automatic abort failed'));
    };
    this.monitorOff = this.vms.onEvent((e) => {
      const cur = this.store.current();
      if (!cur || (e.type !== 'EXITED' && e.type !== 'CRASHED' && e.type !== 'GUEST_PANICKED')) return;
      if (e.vm === cur.toVm) trigger(`the new version's VM ${cur.toVm} ${e.type.toLowerCase()}`);
      else if (e.vm === cur.fromVm) trigger(`the old version's VM ${cur.fromVm} ${e.type.toLowerCase()}`);
    });
    const missingSince = new Map<string, number>();
    this.monitorTimer = setInterval(() => {
      const cur = this.store.current();
      if (!cur || (cur.phase !== 'LOADED' && cur.phase !== 'SWITCHED' && cur.phase !== 'ACCEPTED')) return;
      // Polled as well as watched: a VM that died while a command ran (its event came in
      // SWITCHING, say) is still found here once the phase settles.
      if (!this.isAlive(cur.toVm)) return trigger(`the new version's VM ${cur.toVm} is gone`);
      if (!this.isAlive(cur.fromVm)) return trigger(`the old version's VM ${cur.fromVm} is gone`);
      for (const [p, inst] of Object.entries(cur.processes)) {
        const key = `${p}/${inst.to}`;
        if (this.peerOf(p, inst.to)) missingSince.delete(key);
        else if (!missingSince.has(key)) missingSince.set(key, Date.now());
        else if (Date.now() - missingSince.get(key)! > this.opts.peerGraceMs) {
          missingSince.clear();
          trigger(`process ${inst.to} of the new version is gone`);
          return;
        }
      }
    }, 500);
    this.monitorTimer.unref();
  }

  private stopMonitor(): void {
    this.monitorOff?.();
    this.monitorOff = null;
    if (this.monitorTimer) clearInterval(this.monitorTimer);
    this.monitorTimer = null;
  }

  private transition(rec: UpgradeRecord, phase: Phase, note: string, fields: Partial<UpgradeRecord> = {}): UpgradeRecord {
    // The phase that ends gets the agent's longest stall in it (the largest of every time it was
    // entered, e.g. SWITCHED before and after an agent restart).
    const ending = this.store.get(rec.id) ?? rec;
    const stall = this.loopWatch.take();
    const loopMaxMs = { ...ending.loopMaxMs, [ending.phase]: Math.max(ending.loopMaxMs?.[ending.phase] ?? 0, stall) };
    const next = this.store.transition(rec.id, phase, note, { ...fields, loopMaxMs });
    // A lag sample at every phase boundary, so the report shows each standby's state at each.
    if (TERMINAL.includes(phase)) {
      this.lag.stop();
      this.loopWatch.stop();
    } else this.lag.start(next);
    this.log.info({ upgrade: rec.id, from: rec.phase, to: phase, note }, 'upgrade phase');
    this.emit('PHASE', rec.id, phase, note);
    return next;
  }

  /**
   * As an upgrade ends (the VM that goes is stopped, the ending not yet journaled): audits every
   * process (the agent's copy against the instance left active, by digest) and keeps the records
   * verified and lost for the upgrade report, under the phase about to be journaled. Run before
   * the journal entry, so that whoever waits for the ending can audit without meeting this one.
   * Evidence, not control: an audit that cannot run is recorded as such and the ending goes on.
   * The audit freezes the process's writers while digests are taken, as any audit does.
   */
  private async auditForReport(rec: UpgradeRecord, phase: Phase): Promise<void> {
    for (const p of Object.keys(rec.processes)) {
      const a = await this.checkpoint.audit(p).then(
        (r) => auditRecord(p, phase, r),
        (e: Error) => auditNotRun(p, phase, e.message),
      );
      try {
        this.store.addAudit(rec.id, a);
      } catch (e) {
        this.log.warn({ upgrade: rec.id, process: p, err: (e as Error).message }, 'the audit result is not kept in the upgrade report');
      }
      if (a.consistent) this.log.info({ upgrade: rec.id, process: p, verified: a.verified }, 'audit after the upgrade: every copy matches');
      else this.emit('WARNING', rec.id, phase, `${p}: audit after the upgrade: ${a.instances.length ? `a copy differs: ${a.detail}` : a.detail}`);
    }
  }

  /**
   * Journals a phase that records what already happened (processes switched, a VM stopped). On a
   * full state disk it cannot fail like a transition that announces an action (that one is
   * refused and nothing starts): the journal must catch up with the world, so it retries every
   * second until there is room, saying so once. Without that a live agent would report the old
   * phase until a restart recovered it.
   */
  private async recordOutcome(rec: UpgradeRecord, phase: Phase, note: string, fields: Partial<UpgradeRecord> = {}): Promise<UpgradeRecord> {
    let warned = false;
    for (;;) {
      try {
        return this.transition(rec, phase, note, fields);
      } catch (e) {
        if (!(e instanceof HitlessError) || e.code !== status.RESOURCE_EXHAUSTED) throw e;
        if (!warned) {
          this.log.warn({ upgrade: rec.id, phase, err: e.message }, 'cannot journal an upgrade phase; retrying every second');
          this.emit('WARNING', rec.id, rec.phase, `cannot journal ${phase}: ${e.message}; retrying every second`);
        }
        warned = true;
        await sleep(1000);
      }
    }
  }

  /**
   * The control-plane NIC follows the active instances: down on the VM they left first, then up
   * on the VM that holds them, so there is never a moment with two (same MAC, same address). A
   * VM that is gone cannot be set and needs nothing; any other failure is a warning, not a reason
   * to undo a switchover the processes already made.
   */
  /**
   * A switchover of `process` to `target`; with `moveLink`, the control-plane NIC moves with it
   * from `fromVm` to `toVm` inside the switchover: down on the old VM before its processes
   * freeze, up on the new one once the target answered PROMOTE. That order is what lets a process
   * move its TCP connections (TCP repair): the old endpoint receives nothing after it captured
   * them, and the new VM has the restored sockets before a segment reaches it, so its kernel never
   * answers one with a reset. The NIC is down for the freeze window plus one QMP round trip each
   * way; TCP retransmits whatever the peer sent meanwhile. A switchover that fails gives the link
   * back to the old VM. The later processes' switchovers (and moveControlLink afterwards) find the
   * link where it belongs.
   */
  private async switchoverWithLink(
    rec: UpgradeRecord,
    phase: Phase,
    process: string,
    target: string,
    fromVm: string,
    toVm: string,
    moveLink: boolean,
  ): Promise<SwitchoverResponse> {
    if (!moveLink) return this.checkpoint.switchover(process, target);
    let down = false;
    let up = false;
    try {
      return await this.checkpoint.switchover(process, target, {
        beforeFreeze: async () => {
          await this.setControlLink(rec, phase, fromVm, false);
          down = true;
        },
        afterPromote: async () => {
          await this.setControlLink(rec, phase, toVm, true);
          up = true;
        },
      });
    } catch (e) {
      if (down && !up) await this.setControlLink(rec, phase, fromVm, true);
      throw e;
    }
  }

  private async moveControlLink(rec: UpgradeRecord, phase: Phase, from: string, to: string): Promise<void> {
    await this.setControlLink(rec, phase, from, false);
    await this.setControlLink(rec, phase, to, true);
  }

  /** Sets a live VM's control-plane NIC up or down; a failure is a warning (see moveControlLink). */
  private async setControlLink(rec: UpgradeRecord, phase: Phase, vm: string, up: boolean): Promise<void> {
    if (!this.isAlive(vm)) return;
    await this.vms
      .setControlLink(vm, up)
      .catch((e: Error) => this.emit('WARNING', rec.id, phase, `control-plane NIC of ${vm} not set ${up ? 'up' : 'down'}: ${e.message}`));
  }

  /**
   * Reconciles the data plane after the active instances changed and reports what that changed
   * (nothing, when the routes did not change). Returns the upgrade's list of such results with
   * this one appended; never throws (a failure is in the result and in status).
   */
  private async reconcileDataPlane(rec: UpgradeRecord, phase: Phase, cause: string): Promise<DataPlaneChanges[] | undefined> {
    const r = await this.dataplane.reconcile(cause).catch((e: Error) => {
      this.log.error({ err: e.message }, 'reconciling the data plane failed');
      return null;
    });
    if (!r) return rec.dataplane;
    const changes = r.added + r.replaced + r.deleted;
    const msg = r.error
      ? `data plane: not reconciled after ${cause}: ${r.error}`
      : `data plane: ${changes} route change(s) at ${cause} (${r.routes} routes compared in ${r.ms.toFixed(1)} ms${r.failed ? `, ${r.failed} refused` : ''})`;
    const ev: UpgradeEvent = {
      type: r.error || r.failed ? 'WARNING' : 'PROGRESS',
      upgradeId: rec.id,
      phase,
      message: msg,
      done: 0,
      total: 0,
      at: Date.now(),
      step: '',
      unit: '',
      dataplane: r,
    };
    this.events.emit('event', ev);
    return [...(rec.dataplane ?? []), r];
  }

  private emit(
    type: UpgradeEvent['type'],
    upgradeId: string,
    phase: Phase | '',
    message: string,
    done = 0,
    total = 0,
    counts: { step: string; unit: string } = { step: '', unit: '' },
  ): void {
    const ev: UpgradeEvent = { type, upgradeId, phase, message, done, total, at: Date.now(), ...counts };
    this.events.emit('event', ev);
  }
}

/** What reportSync last said about one process, and what its counts are relative to. */
interface SyncProgress {
  said: string;
  snapshotTotal: number;
  lagMax: number;
}

/** restoreActive gave up because the VM of the instance it was to make active is gone. */
class TargetVmGone extends Error {}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
