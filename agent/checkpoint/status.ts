/** What `Status` answers: every table of a process and every instance with its role and lag. */
import { notFound } from '../common/errors';
import { ProcessStatus } from './messages';
import { CheckpointState } from './process-group';
import { SnapshotProgress } from './subscription';

export function processStatus(st: CheckpointState, process: string): ProcessStatus[] {
  const names = process ? [process] : [...st.groups.keys()].sort();
  if (process && !st.groups.has(process)) throw notFound(`no process '${process}' is known to the agent`);
  return names.map((name) => {
    const g = st.groups.get(name)!;
    return {
      process: name,
      tables: [...g.tables].map(([tn, t]) => ({
        name: tn,
        seq: t.replica.seq,
        records: t.replica.records,
        bytes: t.replica.bytes,
        durability: t.durability,
        schemas: [...t.replica.schemas].sort((a, b) => a - b),
        kind: t.kind,
      })),
      peers: [...g.sessions].map((s) => ({
        sessionId: s.id,
        instanceId: s.reg.instanceId,
        vmId: s.reg.vmId,
        softwareVersion: s.reg.softwareVersion,
        schemaWrites: s.writeSchema,
        schemaReads: s.reg.schemaReads,
        role: s.role,
        frozen: s.frozenAt !== null,
        // READY: caught up with the active once and following since; `lag` says how far
        // behind it is at this instant (a few batches while the active writes).
        ready: s.role === 'ACTIVE' || s.inSync,
        acked: Object.fromEntries(s.acked),
        lag: s.role === 'ACTIVE' ? 0 : g.lagOf(s),
        ...snapshotFields(s.subscription?.snapshotProgress()),
      })),
    };
  });
}

/** A standby's bulk snapshot progress as PeerStatus fields (0 of 0 when none is streaming). */
function snapshotFields(p: SnapshotProgress | undefined): { snapshotRecordsSent: number; snapshotRecordsTotal: number } {
  return { snapshotRecordsSent: p?.sent ?? 0, snapshotRecordsTotal: p?.total ?? 0 };
}
