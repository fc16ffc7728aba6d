/**
 * The upgrade report as one self-contained HTML page: no script, no external resource (styles
 * and SVG charts inline), so it opens from a file, an e-mail or a ticket, offline.
 *
 * It shows the phase timeline, the standby lag over time (with the phase boundaries and the
 * switchover marked), the freeze window of each process, and the audit's records verified and
 * lost. Every figure is an element with a `data-figure` attribute holding the printed value, for
 * tooling and for the test that compares the rendered page with the JSON.
 *
 * Everything from the journal (notes carry operator-given abort reasons) is escaped.
 */
import { ReportFigures, UpgradeReport, reportFigures } from './upgrade-report';

const esc = (s: string | number): string => String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);

const fig = (name: string, value: string | number, tag = 'span') => `<${tag} data-figure="${esc(name)}">${esc(value)}</${tag}>`;

const PHASE_COLOR: Record<string, string> = {
  LOADING: '#8fb8de',
  LOADED: '#5b9bd5',
  SWITCHING: '#f4b183',
  SWITCHED: '#ffd966',
  ACCEPTED: '#c5e0b4',
  COMMITTING: '#a9d18e',
  COMMITTED: '#548235',
  ABORTING: '#f8cbad',
  ABORTED: '#c00000',
  ROLLED_BACK: '#c55a11',
};
const SERIES_COLOR = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf'];

const W = 900;
const LEFT = 60;
const RIGHT = 20;
const plotW = W - LEFT - RIGHT;

/** Phases as bars on one time axis; a phase too short to hold its name is named in the legend only. */
function timeline(f: ReportFigures, t0: number, spanMs: number): string {
  const x = (ms: number) => LEFT + ((ms - t0) / spanMs) * plotW;
  const spans = f.phases.map((p, i) => {
    const end = i + 1 < f.phases.length ? f.phases[i + 1].startMs : p.startMs;
    return { p, x0: x(p.startMs), w: Math.max(2, x(end) - x(p.startMs)) };
  });
  const bars = spans
    .map(
      ({ p, x0, w }) =>
        `<rect x="${x0.toFixed(1)}" y="6" width="${w.toFixed(1)}" height="28" fill="${PHASE_COLOR[p.phase] ?? '#bbb'}"><title>${esc(p.phase)} ${p.seconds.toFixed(1)} s</title></rect>` +
        (w >= 9 * p.phase.length ? `<text x="${(x0 + 4).toFixed(1)}" y="25" font-size="11">${esc(p.phase)}</text>` : ''),
    )
    .join('');
  const legend = f.phases
    .map((p) => `<li><span class="swatch" style="background:${PHASE_COLOR[p.phase] ?? '#bbb'}"></span>${esc(p.phase)} ${p.seconds.toFixed(1)} s</li>`)
    .join('');
  return `<svg width="${W}" height="40" role="img" aria-label="phase timeline">${bars}</svg><ul class="legend inline">${legend}</ul>`;
}

function lagChart(f: ReportFigures, t0: number, spanMs: number): string {
  if (f.lagSamples === 0) return '<p>No lag samples were recorded for this upgrade.</p>';
  const H = 260;
  const top = 10;
  const bottom = 30;
  const plotH = H - top - bottom;
  const yMax = Math.max(1, f.maxLag);
  const x = (ms: number) => LEFT + ((ms - t0) / spanMs) * plotW;
  const y = (lag: number) => top + plotH - (lag / yMax) * plotH;
  const grid = [0, 0.5, 1]
    .map((k) => {
      const v = Math.round(yMax * k);
      return `<line x1="${LEFT}" x2="${W - RIGHT}" y1="${y(v).toFixed(1)}" y2="${y(v).toFixed(1)}" stroke="#ddd"/><text x="${LEFT - 6}" y="${(y(v) + 4).toFixed(1)}" font-size="11" text-anchor="end">${v}</text>`;
    })
    .join('');
  const marks = f.phases
    .map(
      (p) =>
        `<line x1="${x(p.startMs).toFixed(1)}" x2="${x(p.startMs).toFixed(1)}" y1="${top}" y2="${top + plotH}" stroke="${p.phase === 'SWITCHING' ? '#c00000' : '#bbb'}" stroke-dasharray="${p.phase === 'SWITCHING' ? '0' : '3,3'}"><title>${esc(p.phase)}</title></line>`,
    )
    .join('');
  const lines = f.series
    .map((s, i) => {
      const pts = s.samples.map((p) => `${x(p.atMs).toFixed(1)},${y(p.lag).toFixed(1)}`).join(' ');
      return `<polyline data-instance="${esc(s.instance)}" data-points="${s.samples.length}" fill="none" stroke-width="2" stroke="${SERIES_COLOR[i % SERIES_COLOR.length]}" points="${pts}"/>`;
    })
    .join('');
  const axis = `<text x="${LEFT}" y="${H - 8}" font-size="11">0 s</text><text x="${W - RIGHT}" y="${H - 8}" font-size="11" text-anchor="end">${(spanMs / 1000).toFixed(1)} s</text><text x="12" y="${top + plotH / 2}" font-size="11" transform="rotate(-90 12 ${top + plotH / 2})" text-anchor="middle">lag (batches)</text>`;
  const legend = f.series
    .map(
      (s, i) =>
        `<li><span class="swatch" style="background:${SERIES_COLOR[i % SERIES_COLOR.length]}"></span>${esc(s.instance)}: at most ${fig(`max-lag:${s.instance}`, s.maxLag)} batches, ${s.samples.length} samples</li>`,
    )
    .join('');
  return `<svg width="${W}" height="${H}" role="img" aria-label="standby lag over time">${grid}${marks}${lines}${axis}</svg><ul class="legend">${legend}</ul>`;
}

export function upgradeReportHtml(r: UpgradeReport): string {
  const f = reportFigures(r);
  const u = r.upgrade;
  const t0 = f.phases[0]?.startMs ?? u.startedAtMs;
  const tEnd = Math.max(t0 + 1, f.phases.at(-1)?.startMs ?? t0, ...r.lag.map((s) => s.atMs));
  const spanMs = tEnd - t0;
  const outcomeClass = u.phase === 'COMMITTED' ? 'ok' : u.phase === 'ROLLED_BACK' || u.phase === 'ABORTED' ? 'back' : 'running';
  const auditWord = r.audits.length === 0 ? 'no audit recorded' : f.audited ? 'every copy matches' : 'a copy differs';
  const stallCell = (phase: string) => {
    const ms = u.agentLoopMaxMs?.[phase];
    return ms === undefined ? '' : fig(`loop-max-ms:${phase}`, ms.toFixed(1));
  };
  const journalRows = f.phases
    .map(
      (p) =>
        `<tr><td>${esc(new Date(p.startMs).toISOString())}</td><td>${esc(p.phase)}</td><td class="num">${p.seconds.toFixed(1)}</td><td class="num">${stallCell(p.phase)}</td><td>${esc(p.note)}</td></tr>`,
    )
    .join('');
  const freezeRows = u.processes
    .map(
      (p) =>
        `<tr><td>${esc(p.process)}</td><td>${esc(p.fromInstance)}</td><td>${esc(p.toInstance)}</td><td class="num">${fig(`freeze-ms:${p.process}`, p.freezeMs.toFixed(2))}</td></tr>`,
    )
    .join('');
  const auditRows = r.audits
    .map(
      (a) =>
        `<tr class="${a.consistent ? '' : 'bad'}"><td>${esc(a.process)}</td><td>${esc(a.phase)}</td><td>${esc(a.instances.join(', '))}</td><td class="num">${fig(`verified:${a.process}`, a.recordsVerified)}</td><td class="num">${fig(`lost:${a.process}`, a.recordsLost)}</td><td>${a.consistent ? 'consistent' : `INCONSISTENT: ${esc(a.detail)}`}</td></tr>`,
    )
    .join('');
  const sessionRows = (r.sessions ?? [])
    .map(
      (x) =>
        `<tr class="${x.outcome === 'NONSTOP' ? '' : 'bad'}"><td>${esc(x.process)}</td><td>${esc(x.instance)}</td><td>${esc(x.session)}</td><td>${esc(x.outcome)}</td><td class="num">${x.durationMs}</td><td>${esc(x.detail)}</td></tr>`,
    )
    .join('');
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>hitless upgrade ${esc(u.id)}: ${esc(u.fromVersion)} to ${esc(u.toVersion)}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:960px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 6px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;min-width:130px}
.card b{display:block;font-size:20px}
.ok{color:#2e6b1f} .back{color:#a33d00} .running{color:#1f4e79}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #e3e3e3;padding:3px 6px;text-align:left;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums} tr.bad td{background:#fde9e7}
.legend{list-style:none;padding:0} .legend.inline li{display:inline-block;margin-right:14px} .swatch{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}
.muted{color:#777}
</style></head><body>
<h1>Upgrade ${fig('id', u.id)}: ${fig('from-version', u.fromVersion)} &rarr; ${fig('to-version', u.toVersion)}</h1>
<p>Outcome <b class="${outcomeClass}">${fig('phase', u.phase)}</b>${u.result ? ` (${esc(u.result)})` : ''}. Old VM ${esc(u.fromVm)}, new VM ${esc(u.toVm)}; started ${esc(new Date(u.startedAtMs).toISOString())}.</p>
<div class="cards">
<div class="card">duration<b>${fig('duration-s', f.durationS.toFixed(1))} s</b></div>
<div class="card">write freeze at switchover<b>${fig('freeze-ms', f.freezeMs.toFixed(2))} ms</b></div>
<div class="card">records verified<b>${fig('records-verified', f.recordsVerified)}</b></div>
<div class="card">records lost<b>${fig('records-lost', f.recordsLost)}</b></div>
<div class="card">standby lag, at most<b>${fig('max-lag', f.maxLag)} batches</b></div>
<div class="card">agent event loop, longest stall<b>${fig('loop-max-ms', f.loopMaxMs.toFixed(1))} ms</b>${f.loopMaxPhase ? ` <span class="muted">${esc(f.loopMaxPhase)}</span>` : ''}</div>
</div>
<p>Audit after the upgrade: ${fig('audit', auditWord)}.</p>
<h2>Timeline (${fig('phase-count', f.phases.length)} phases)</h2>
${timeline(f, t0, spanMs)}
<table><thead><tr><th>at (UTC)</th><th>phase</th><th class="num">s</th><th class="num">agent stall, ms</th><th>journal note</th></tr></thead><tbody>${journalRows}</tbody></table>
<h2>Standby lag over time (${fig('lag-samples', f.lagSamples)} samples)</h2>
<p class="muted">Batches each standby had not yet acknowledged. Before the switchover (red line) the standbys are the new version's instances; after it the old version's, following until commit. Lag rises while a snapshot is being applied and falls to 0 at READY.</p>
${lagChart(f, t0, spanMs)}
<h2>Freeze window</h2>
<p class="muted">How long each process's writers were frozen while its role moved to the new version${f.switchAtMs ? ` (at ${esc(new Date(f.switchAtMs).toISOString())})` : ' (no switchover happened)'}.</p>
<table><thead><tr><th>process</th><th>from</th><th>to</th><th class="num">freeze, ms</th></tr></thead><tbody>${freezeRows}</tbody></table>
<h2>Audit</h2>
${r.audits.length ? `<table><thead><tr><th>process</th><th>after</th><th>copies compared with the agent's</th><th class="num">verified</th><th class="num">lost</th><th></th></tr></thead><tbody>${auditRows}</tbody></table>` : '<p>No audit was recorded for this upgrade (it has not ended, or ended before the agent kept audits).</p>'}
<h2>Routing sessions</h2>
${sessionRows ? `<table><thead><tr><th>process</th><th>reported by</th><th>session</th><th>outcome</th><th class="num">ms</th><th></th></tr></thead><tbody>${sessionRows}</tbody></table>` : '<p>No process reported on its protocol sessions during this upgrade.</p>'}
<p class="muted">As each routing process reported them (nonstop: the peer saw nothing; graceful restart: the peer saw a reset and kept our routes). Data-plane packets are not counted by this agent.</p>
</body></html>
`;
}
