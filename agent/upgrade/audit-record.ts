/**
 * What the upgrade report keeps of an audit: records verified and records lost, per process.
 *
 * The audit (CheckpointService.audit) compares the agent's copy of every table with each
 * instance's own, by sequence and digest. A table counts as verified when every audited copy
 * matches the agent's; a copy that holds fewer records than the agent lacks the difference,
 * and the largest such shortfall of any copy is what was lost. (A copy with as many records
 * but another digest has lost none by count and is still not verified: `detail` says which.)
 */
import { AuditResponse } from '../checkpoint/messages';
import { AuditRecord, Phase } from './upgrade-store';

export function auditRecord(process: string, phase: Phase, r: AuditResponse, at = Date.now()): AuditRecord {
  // With no instance registered there is nothing to compare with: nothing is verified.
  if (r.peers.length === 0) return auditNotRun(process, phase, `no instance of '${process}' is registered to compare with the agent's copy`, at);
  let verified = 0;
  let lost = 0;
  for (const t of r.agent) {
    const copies = r.peers.map((p) => p.digests.find((d) => d.table === t.table));
    if (copies.every((d) => d && d.sha256 === t.sha256 && d.seq === t.seq)) verified += t.records;
    lost = Math.max(lost, ...copies.map((d) => Math.max(0, t.records - (d?.records ?? 0))));
  }
  return {
    at,
    phase,
    process,
    instances: r.peers.map((p) => p.instanceId),
    verified,
    lost,
    consistent: r.consistent,
    detail: r.consistent ? '' : r.detail,
  };
}

/** An audit that could not run (its process mid role change, an instance gone): nothing verified. */
export function auditNotRun(process: string, phase: Phase, why: string, at = Date.now()): AuditRecord {
  return { at, phase, process, instances: [], verified: 0, lost: 0, consistent: false, detail: `the audit could not run: ${why}` };
}
