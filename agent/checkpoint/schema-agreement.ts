/**
 * Schemas: who may register, and which schema an active writes. The active must write what every
 * standby reads (so a switch back is hitless), and the schema agreed is stored: it survives an
 * agent restart and is changed only by an explicit decision (switchover, failover, commit).
 */
import { failedPrecondition, invalidArgument } from '../common/errors';
import { CheckpointStore } from '../store/checkpoint-store';
import { Register } from './messages';
import { CheckpointState, PeerSession, ProcessGroup, readableBy } from './process-group';

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$/;

/** Checks a Register message and normalizes it (reads include writes; standbys declare no tables). */
export function validateRegister(reg: Register): void {
  if (!NAME_RE.test(reg.process)) {
    throw invalidArgument(`process name '${reg.process}' is not valid: 1-128 characters of letters, digits and _.:@- , starting with a letter or digit`);
  }
  if (!NAME_RE.test(reg.instanceId)) throw invalidArgument(`instance_id '${reg.instanceId}' is not valid: 1-128 characters of letters, digits and _.:@-`);
  if (!reg.vmId) throw invalidArgument('vm_id is empty: say which VM or slot the process runs in');
  if (!reg.schemaWrites || reg.schemaWrites > 65535) throw invalidArgument(`schema_writes must be 1..65535, got ${reg.schemaWrites}`);
  if (!reg.schemaReads.includes(reg.schemaWrites)) reg.schemaReads = [...reg.schemaReads, reg.schemaWrites];
  if (reg.wantedRole !== 'ACTIVE' && reg.wantedRole !== 'STANDBY') {
    throw invalidArgument(`wanted_role must be ACTIVE or STANDBY, got ${reg.wantedRole}`);
  }
  const seen = new Set<string>();
  for (const t of reg.tables) {
    if (!NAME_RE.test(t.name)) throw invalidArgument(`table name '${t.name}' is not valid`);
    if (seen.has(t.name)) throw invalidArgument(`table '${t.name}' is declared twice`);
    seen.add(t.name);
  }
  if (reg.wantedRole === 'STANDBY' && reg.tables.length) {
    // Standbys follow the active's declaration; ignore theirs rather than letting them change it.
    reg.tables = [];
  }
}

/** Refuses an instance that could not read every record a table of its process holds. */
export function checkReadsTables(g: ProcessGroup, reg: Register, reads: Set<number>): void {
  for (const [name, t] of g.tables) {
    const unreadable = [...t.replica.schemas].filter((s) => !reads.has(s));
    if (unreadable.length) {
      throw failedPrecondition(
        `'${reg.instanceId}' (version ${reg.softwareVersion || '?'}) reads schema versions [${[...reads].join(', ')}] but table '${name}' of process '${reg.process}' holds records of schema ${unreadable.join(', ')}; install a version that reads them or register a transform`,
      );
    }
  }
}

/**
 * The schema a registering active writes: the one the agent agreed on before (stored), when it
 * can write it and every current standby reads it; otherwise the highest it can write that every
 * current standby reads.
 *
 * The agreed schema wins over "highest" because the standbys present at registration are not
 * all the readers: after an agent restart in the middle of an upgrade, the new version's active
 * may re-register before the old version's instances do, and it must go on writing what they
 * read, or they could not follow it (and the rollback would not be hitless). Only an explicit
 * decision changes it: a switchover, a failover, or raiseWriteSchema after a commit.
 */
export function pickWriteSchema(st: Pick<CheckpointState, 'store' | 'log'>, g: ProcessGroup, reg: Register, canWrite: number[]): number {
  const standbys = g.standbys();
  const ok = readableBy(canWrite, standbys);
  if (!ok.length) {
    const sb = standbys.map((s) => `${s.reg.instanceId} reads [${s.reg.schemaReads.join(', ')}]`).join('; ');
    throw failedPrecondition(
      `'${reg.instanceId}' can write schema versions [${canWrite.join(', ')}] but not every standby can read any of them (${sb}); register a transform to a version the standbys read`,
    );
  }
  const agreed = st.store.writeSchema(g.name);
  if (agreed === 0 || ok.includes(agreed)) return agreed || ok[0];
  st.log.warn(
    { process: g.name, instance: reg.instanceId, agreed, canWrite, chosen: ok[0] },
    'the registering active cannot write the schema agreed before (or a standby cannot read it); it writes another',
  );
  return ok[0];
}

/** Records the schema the active of `g` writes from now on, before the active is told. */
export function agreeWriteSchema(store: CheckpointStore, g: ProcessGroup, schema: number): void {
  if (store.writeSchema(g.name) !== schema) store.setWriteSchema(g.name, schema);
}

/** The newest schema `target` can write that every one of `readers` reads (else the one it writes). */
export function pickWriteSchemaFor(target: PeerSession, readers: PeerSession[]): number {
  const canWrite = target.reg.schemaCanWrite.length ? target.reg.schemaCanWrite : [target.reg.schemaWrites];
  return readableBy(canWrite, readers)[0] ?? target.reg.schemaWrites;
}
