/**
 * An upgrade's report as the agent answers hitless.v1.Upgrade/ShowUpgrade, and the figures both
 * renderings (text and HTML) show. The figures are computed here once, so the page, the text and
 * a test reading either agree with the JSON by construction of the same numbers.
 *
 * Times are epoch milliseconds; durations in the figures are seconds; freeze windows ms; lag in
 * batches (the agent's unit of acknowledgement).
 */
import { SessionOutcomeView, sessionOutcomeText } from './session-outcome';

export interface ReportJournalEntry {
  atMs: number;
  phase: string;
  note: string;
}

export interface ReportLagSample {
  atMs: number;
  process: string;
  instance: string;
  lag: number;
  ready: boolean;
}

export interface ReportAudit {
  atMs: number;
  phase: string;
  process: string;
  instances: string[];
  recordsVerified: number;
  recordsLost: number;
  consistent: boolean;
  detail: string;
}

/** hitless.v1.UpgradeInfo as the client reads it (the CLI's status and this report share it). */
export interface UpgradeInfoMsg {
  id: string;
  phase: string;
  fromVm: string;
  fromVersion: string;
  toVm: string;
  toVersion: string;
  startedAtMs: number;
  updatedAtMs: number;
  timerRemainingMs: number;
  result: string;
  freezeMs: number;
  processes: { process: string; fromInstance: string; toInstance: string; freezeMs: number }[];
  /** What each change of the active instances changed in the data plane (hitless.v1.DataPlaneChanges). */
  dataplaneChanges?: DataPlaneChangesMsg[];
  /** The agent's longest event-loop stall in each ended phase, ms, by phase name. */
  agentLoopMaxMs?: Record<string, number>;
}

export interface DataPlaneChangesMsg {
  atMs: number;
  cause: string;
  routes: number;
  added: number;
  replaced: number;
  deleted: number;
  failed: number;
  ms: number;
  error: string;
}

/** One reconciliation in words: "switchover to cp-2: 0 route change(s) over 1000 routes (...)". */
export function dataPlaneChangesText(c: DataPlaneChangesMsg): string {
  if (c.error) return `${c.cause}: not reconciled: ${c.error}`;
  const n = Number(c.added) + Number(c.replaced) + Number(c.deleted);
  return `${c.cause}: ${n} route change(s) over ${c.routes} routes (${c.added} added, ${c.replaced} replaced, ${c.deleted} deleted${Number(c.failed) ? `, ${c.failed} refused` : ''})`;
}

export interface UpgradeReport {
  upgrade: UpgradeInfoMsg;
  journal: ReportJournalEntry[];
  lag: ReportLagSample[];
  audits: ReportAudit[];
  /** How the processes' protocol sessions fared (absent from agents before it was reported). */
  sessions?: ReportSession[];
}

/** hitless.v1.UpgradeSession as the client reads it. */
export interface ReportSession extends SessionOutcomeView {
  atMs: number;
  process: string;
  instance: string;
}

/** One span of the timeline: a phase from its journal entry to the next (the last lasts 0 s). */
export interface PhaseSpan {
  phase: string;
  startMs: number;
  seconds: number;
  note: string;
}

export interface ReportFigures {
  /** From the first journal entry to the last, s. */
  durationS: number;
  phases: PhaseSpan[];
  /** When the switchover's freeze happened (the SWITCHING entry), or 0 when there was none. */
  switchAtMs: number;
  freezeMs: number;
  /** Lag series per standby instance, in sample order. */
  series: { process: string; instance: string; samples: ReportLagSample[]; maxLag: number }[];
  lagSamples: number;
  maxLag: number;
  /** Sums over processes of their latest audit. */
  recordsVerified: number;
  recordsLost: number;
  /** True when there are audits and the latest of every process was consistent. */
  audited: boolean;
  /** The agent's longest event-loop stall in any phase, ms, and that phase ('' when none was kept). */
  loopMaxMs: number;
  loopMaxPhase: string;
}

/** Seconds rounded to 0.1 s, as every rendering prints them. */
export const seconds1 = (ms: number): number => Math.round(ms / 100) / 10;

export function reportFigures(r: UpgradeReport): ReportFigures {
  const j = r.journal;
  const phases = j.map((e, i) => ({ phase: e.phase, startMs: e.atMs, seconds: seconds1(i + 1 < j.length ? j[i + 1].atMs - e.atMs : 0), note: e.note }));
  const byInstance = new Map<string, ReportFigures['series'][number]>();
  for (const s of r.lag) {
    const key = `${s.process}/${s.instance}`;
    if (!byInstance.has(key)) byInstance.set(key, { process: s.process, instance: s.instance, samples: [], maxLag: 0 });
    const x = byInstance.get(key)!;
    x.samples.push(s);
    x.maxLag = Math.max(x.maxLag, s.lag);
  }
  const series = [...byInstance.values()];
  // An agent restarted during an ending audits again: the latest audit of each process counts.
  const latest = [...new Map([...r.audits].sort((a, b) => a.atMs - b.atMs).map((a) => [a.process, a])).values()];
  const stalls = Object.entries(r.upgrade.agentLoopMaxMs ?? {}).sort((a, b) => b[1] - a[1]);
  return {
    loopMaxMs: stalls[0]?.[1] ?? 0,
    loopMaxPhase: stalls[0]?.[0] ?? '',
    durationS: j.length ? seconds1(j[j.length - 1].atMs - j[0].atMs) : 0,
    phases,
    switchAtMs: j.find((e) => e.phase === 'SWITCHING')?.atMs ?? 0,
    freezeMs: r.upgrade.freezeMs,
    series,
    lagSamples: r.lag.length,
    maxLag: Math.max(0, ...series.map((s) => s.maxLag)),
    recordsVerified: latest.reduce((n, a) => n + a.recordsVerified, 0),
    recordsLost: latest.reduce((n, a) => n + a.recordsLost, 0),
    audited: latest.length > 0 && latest.every((a) => a.consistent),
  };
}

/** "stall 12.3 ms  " for a phase whose longest agent event-loop stall was kept, else nothing. */
const stallText = (u: UpgradeInfoMsg, phase: string): string => {
  const ms = u.agentLoopMaxMs?.[phase];
  return ms === undefined ? '' : `stall ${ms.toFixed(1).padStart(5)} ms  `;
};

const time = (ms: number) => new Date(ms).toISOString().replace('T', ' ').slice(0, 23);

/** The report as text for a terminal: what the page shows, without the chart. */
export function reportText(r: UpgradeReport): string {
  const f = reportFigures(r);
  const u = r.upgrade;
  const lines = [
    `upgrade ${u.id}: ${u.fromVersion} (${u.fromVm}) -> ${u.toVersion} (${u.toVm})  ${u.phase}${u.result ? `  (${u.result})` : ''}`,
    `  duration ${f.durationS.toFixed(1)} s; write freeze at switchover ${f.freezeMs.toFixed(2)} ms${u.processes.length > 1 ? ` (${u.processes.map((p) => `${p.process} ${p.freezeMs.toFixed(2)} ms`).join(', ')})` : ''}`,
    `  records verified ${f.recordsVerified}, lost ${f.recordsLost}${r.audits.length === 0 ? ' (no audit recorded)' : f.audited ? ' (every copy matches)' : ' (AUDIT FOUND A DIFFERENCE)'}`,
    `  standby lag: ${f.lagSamples} samples, at most ${f.maxLag} batches`,
    ...(f.loopMaxPhase ? [`  agent event loop: longest stall ${f.loopMaxMs.toFixed(1)} ms (${f.loopMaxPhase})`] : []),
    '  timeline:',
    ...f.phases.map((p) => `    ${time(p.startMs)}  ${p.phase.padEnd(11)} ${p.seconds.toFixed(1).padStart(7)} s  ${stallText(u, p.phase)}${p.note}`),
  ];
  for (const a of r.audits) {
    lines.push(
      `  audit (${a.phase}) ${a.process}: ${a.consistent ? 'consistent' : 'INCONSISTENT'}, ${a.recordsVerified} verified, ${a.recordsLost} lost in ${a.instances.join(', ') || 'no instance'}${a.detail ? `: ${a.detail}` : ''}`,
    );
  }
  for (const c of u.dataplaneChanges ?? []) lines.push(`  data plane at ${dataPlaneChangesText(c)}`);
  for (const x of r.sessions ?? []) lines.push(`  session ${time(x.atMs)} ${x.process} (${x.instance}): ${sessionOutcomeText(x)}`);
  return lines.join('\n') + '\n';
}
