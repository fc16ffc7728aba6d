/**
 * One wording for how a protocol session fared at a handover, shared by the upgrade's events,
 * the report and `issu status`: what the network saw, never more than the process reported.
 */
export interface SessionOutcomeView {
  session: string;
  outcome: string;
  durationMs: number;
  detail: string;
}

export function sessionOutcomeText(s: SessionOutcomeView): string {
  const d = s.durationMs >= 1000 ? `${(s.durationMs / 1000).toFixed(1)} s` : `${s.durationMs} ms`;
  const what =
    s.outcome === 'NONSTOP'
      ? `${s.session}: no reset (nonstop routing), moved in ${d}`
      : s.outcome === 'GRACEFUL_RESTART'
        ? `${s.session}: session reset (graceful restart), back after ${d}`
        : `${s.session}: session reset, the peer dropped our routes; back after ${d}`;
  return s.detail ? `${what} (${s.detail})` : what;
}
