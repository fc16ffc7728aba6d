/**
 * One round of the campaign: boot the old version, drive a real upgrade to the cell's phase,
 * strike with the cell's fault at the seeded moment, let the agent settle on its own, then check
 * what an operator relies on:
 *   - the upgrade settles in a consistent phase (LOADED, SWITCHED, ACCEPTED or ended) in time;
 *   - exactly one ACTIVE per process, every other instance READY;
 *   - the audit (agent, active and standby copies by digest) is consistent, and the table's
 *     sequence did not go back (nothing acknowledged before the fault was lost);
 *   - before commit, abortversion returns to the old version with its exact table;
 *   - after commit, the new version runs alone.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRng } from '../examples/bgp-rib/rib-generator';
import { ChaosPhase, Fault, PHASE_WINDOW_MS } from './faults';
import { ChaosWorld, FaultMissed, OLD_VM, UpgradeView } from './world';

export interface RoundSpec {
  fault: Fault;
  phase: ChaosPhase;
  seed: number;
  images: { v1: string; v2: string; fromVersion: string; toVersion: string };
  trustDir: string;
  records: number;
  /** The bound within which the upgrade must settle after the fault, ms. */
  settleMs: number;
  log: (s: string) => void;
}

export interface RoundResult {
  cell: string;
  seed: number;
  /** Milliseconds after the phase's command started when the fault struck. */
  fault_at_ms: number;
  /** The upgrade phase the agent reported just before the fault. */
  phase_at_fault: string;
  /** Whether the phase's command had already returned when the fault struck. */
  command_done: boolean;
  /** '' when the fault struck; else why it found nothing to strike (its target already gone). */
  missed: string;
  phase_settled: string;
  settle_s: number;
  pass: boolean;
  why: string;
}

/**
 * Phases an upgrade may rest in. NONE is no upgrade in the journal at all: a fault that struck
 * loadversion before it journaled LOADING (while it verified the image) leaves nothing started.
 */
const SETTLED = new Set(['LOADED', 'SWITCHED', 'ACCEPTED', 'COMMITTED', 'ABORTED', 'ROLLED_BACK', 'NONE']);
const phaseOf = (u: UpgradeView) => u.current?.phase ?? u.history[0]?.phase ?? 'NONE';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

class RoundFailure extends Error {}
function check(ok: unknown, why: string): asserts ok {
  if (!ok) throw new RoundFailure(why);
}

export async function runRound(spec: RoundSpec): Promise<RoundResult> {
  const cell = `${spec.fault.name}@${spec.phase}`;
  // The cell is mixed in so that one seed draws a different moment in every cell.
  const rand = createRng(spec.seed ^ cellHash(cell));
  const faultAt = rand() % (PHASE_WINDOW_MS[spec.phase] + 1);
  const res: RoundResult = {
    cell,
    seed: spec.seed,
    fault_at_ms: faultAt,
    phase_at_fault: '',
    command_done: false,
    missed: '',
    phase_settled: '',
    settle_s: 0,
    pass: false,
    why: '',
  };
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-chaos-'));
  const w = new ChaosWorld(work, spec.trustDir, spec.log, spec.fault.stateTmpfsMiB ?? 0);
  try {
    const bootMs = await w.start(spec.images.v1, spec.records);
    spec.log(`${cell} seed ${spec.seed}: v1 active after ${bootMs} ms; fault at +${faultAt} ms into ${spec.phase}`);
    const v2 = { imageDir: spec.images.v2 };
    // Drive to the phase, then start its command without waiting for it.
    if (spec.phase !== 'loadversion') await w.upgrade('LoadVersion', v2);
    if (!['loadversion', 'runversion'].includes(spec.phase)) await w.upgrade('RunVersion');
    if (spec.phase === 'commitversion') await w.upgrade('AcceptVersion');
    const command: Record<ChaosPhase, () => Promise<unknown>> = {
      loadversion: () => w.upgrade('LoadVersion', v2),
      runversion: () => w.upgrade('RunVersion'),
      switched: () => Promise.resolve(),
      acceptversion: () => w.upgrade('AcceptVersion'),
      commitversion: () => w.upgrade('CommitVersion'),
      abortversion: () => w.upgrade('AbortVersion', { reason: 'chaos round' }),
    };
    const t0 = Date.now();
    const running = command[spec.phase]().then(
      () => ({ done: true, err: '' }),
      (e: Error) => ({ done: true, err: e.message }),
    );
    let done = false;
    void running.then(() => (done = true));
    await sleep(Math.max(0, faultAt - (Date.now() - t0)));
    res.phase_at_fault = phaseOf(await w.status());
    res.command_done = done;
    // Sequences only grow: what the agent holds now was acknowledged (stored before the ack).
    const seqBefore = new Map((await w.processes()).map((p) => [p.process, p.tables.map((t) => ({ name: t.name, seq: t.seq }))]));
    try {
      await spec.fault.inject(w);
    } catch (e) {
      if (!(e instanceof FaultMissed)) throw e;
      res.missed = e.message;
      spec.log(`${cell}: fault missed: ${e.message}`);
    }
    const tFault = Date.now();
    const outcome = await Promise.race([running, sleep(spec.settleMs).then(() => ({ done: false, err: 'still running' }))]);
    if (outcome.err) spec.log(`${cell}: the ${spec.phase} command ended with: ${outcome.err}`);

    const settled = await settle(w, tFault + spec.settleMs);
    res.phase_settled = settled.phase;
    res.settle_s = Math.round((Date.now() - tFault) / 100) / 10;
    check(settled.ok, `did not settle within ${spec.settleMs / 1000} s: ${settled.why}`);
    for (const p of await w.processes()) {
      for (const before of seqBefore.get(p.process) ?? []) {
        const now = p.tables.find((t) => t.name === before.name);
        check(
          now && now.seq >= before.seq,
          `${p.process}/${before.name}: the table went back from seq ${before.seq} to ${now?.seq} (acknowledged batches lost)`,
        );
      }
      await auditOk(w, p.process, `after the fault (${settled.phase})`);
    }

    if (settled.phase === 'COMMITTED') {
      await newVersionAlone(w, spec.images.toVersion);
    } else {
      // Before commit (or already rolled back): abortversion must bring the old version back.
      const back = await w.upgrade('AbortVersion', { reason: 'chaos: back to the old version' });
      check(!back.current, `abortversion left the upgrade ${back.current?.phase}`);
      for (const p of await w.processes()) {
        const a = p.peers.filter((x) => x.role === 'ACTIVE');
        check(
          a.length === 1 && a[0].vmId === OLD_VM && a[0].softwareVersion === spec.images.fromVersion,
          `${p.process}: after abortversion the active is ${a.map((x) => `${x.instanceId} ${x.softwareVersion}`).join(', ') || 'none'}, not the old version in ${OLD_VM}`,
        );
        await auditOk(w, p.process, 'after abortversion');
      }
    }
    res.pass = true;
  } catch (e) {
    res.why = e instanceof RoundFailure ? e.message : `round error: ${(e as Error).message}`;
    if (w.agent) spec.log(`${cell}: agent log, last lines:\n${w.agent.stderr().split('\n').slice(-15).join('\n')}`);
  } finally {
    await w.close().catch((e: Error) => spec.log(`cleanup: ${e.message}`));
  }
  return res;
}

/** Polls until the upgrade is in a settled phase with one READY active per process (and stays so for a second). */
async function settle(w: ChaosWorld, deadline: number): Promise<{ ok: boolean; phase: string; why: string }> {
  let why = 'no answer from the agent';
  let phase = '';
  let stableSince = 0;
  for (;;) {
    try {
      phase = phaseOf(await w.status());
      const problems: string[] = [];
      if (!SETTLED.has(phase)) problems.push(`upgrade phase ${phase}`);
      for (const p of await w.processes()) {
        const actives = p.peers.filter((x) => x.role === 'ACTIVE');
        if (actives.length !== 1) problems.push(`${p.process}: ${actives.length} ACTIVE`);
        const notReady = p.peers.filter((x) => !x.ready).map((x) => x.instanceId);
        if (notReady.length) problems.push(`${p.process}: not READY ${notReady.join(', ')}`);
      }
      if (problems.length === 0) {
        stableSince ||= Date.now();
        if (Date.now() - stableSince >= 1000) return { ok: true, phase, why: '' };
      } else {
        stableSince = 0;
        why = problems.join('; ');
      }
    } catch (e) {
      stableSince = 0;
      why = (e as Error).message;
    }
    if (Date.now() > deadline) return { ok: false, phase, why };
    await sleep(250);
  }
}

async function auditOk(w: ChaosWorld, process: string, when: string): Promise<void> {
  const a = await w.audit(process);
  check(a.consistent, `${process} ${when}: audit inconsistent: ${a.detail}`);
}

async function newVersionAlone(w: ChaosWorld, toVersion: string): Promise<void> {
  const running = (await w.vms()).filter((v) => v.state === 'RUNNING');
  check(
    running.length === 1 && running[0].name !== OLD_VM,
    `after commit the running VMs are [${running.map((v) => v.name).join(', ')}], not the new version alone`,
  );
  for (const p of await w.processes()) {
    const a = p.peers.filter((x) => x.role === 'ACTIVE');
    check(
      a.length === 1 && a[0].softwareVersion === toVersion,
      `${p.process}: after commit the active is ${a.map((x) => `${x.instanceId} ${x.softwareVersion}`).join(', ')}, not version ${toVersion}`,
    );
  }
}

/** FNV-1a of the cell name: a stable per-cell salt for the round's seed. */
function cellHash(cell: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < cell.length; i++) h = Math.imul(h ^ cell.charCodeAt(i), 0x01000193);
  return h >>> 0;
}
