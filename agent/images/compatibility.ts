/**
 * Checkpoint-schema compatibility between what runs now and a candidate bundle, per process.
 *
 * A hitless upgrade starts the candidate's process as a standby of the running one, so the new
 * process must read the schema the running one writes (forward). After the switchover the old
 * process stays as standby, so that a rollback is hitless it must read what the new one writes,
 * or the new one must be able to write a schema the old one reads (backward). These are the
 * same rules the checkpoint service enforces at registration and switchover; checking them on
 * the manifests finds the problem before a VM is booted.
 *
 * Transforms "a->b" (ManifestProcess.transforms) follow the checkpoint SDK: a reader with a->b
 * where b is a schema it reads (or writes) can read a; a writer whose native schema is a can
 * also write b.
 */
import { failedPrecondition, invalidArgument } from '../common/errors';
import { type Manifest, parseTransform } from './manifest';

/** A process as the running system describes it (e.g. from the agent's checkpoint status). */
export interface ProcessInfo {
  name: string;
  schemaWrites: number;
  schemaReads: number[];
  transforms?: string[];
  /** Schemas the process can write besides schemaWrites (Register.schemaCanWrite), if known. */
  schemaCanWrite?: number[];
  /** Software/bundle version, shown as fromVersion. */
  version?: string;
}

export type Via = 'direct' | 'transform';

export interface ProcessCompatibility {
  process: string;
  /** kept: in both; added: only in the candidate; removed: only in what runs now. */
  change: 'kept' | 'added' | 'removed';
  fromVersion?: string;
  toVersion?: string;
  fromWrites?: number;
  toWrites?: number;
  fromReads?: number[];
  toReads?: number[];
  /** The candidate reads what the running process writes (needed to start as its standby). */
  forward: boolean;
  /** The running process reads what the candidate writes (needed for a hitless rollback). */
  backward: boolean;
  forwardVia?: Via;
  backwardVia?: Via;
  /** 'transform' when either direction needs one, 'direct' when neither does. */
  via?: Via;
  /** Why a direction fails, or what an added/removed process means. */
  reason?: string;
}

interface Side {
  version?: string;
  writes: number;
  reads: number[];
  /** reads plus the sources of reader transforms */
  readable: Set<number>;
  /** writes plus the targets of writer transforms (and schemaCanWrite) */
  writable: Set<number>;
}

function side(p: ProcessInfo, version: string | undefined, where: string): Side {
  if (!Number.isSafeInteger(p.schemaWrites) || p.schemaWrites < 1)
    throw invalidArgument(`${where}: schemaWrites must be an integer >= 1, got ${p.schemaWrites}`);
  if (!Array.isArray(p.schemaReads)) throw invalidArgument(`${where}: schemaReads must be an array of schema versions`);
  const nativeReads = new Set([...p.schemaReads, p.schemaWrites]);
  const readable = new Set(nativeReads);
  const writable = new Set([p.schemaWrites, ...(p.schemaCanWrite ?? [])]);
  for (const t of p.transforms ?? []) {
    const tr = parseTransform(t);
    if (!tr) throw invalidArgument(`${where}: transform ${JSON.stringify(t)} must be "FROM->TO" with two different schema versions >= 1`);
    if (nativeReads.has(tr.to)) readable.add(tr.from);
    if (tr.from === p.schemaWrites) writable.add(tr.to);
  }
  return { version, writes: p.schemaWrites, reads: [...p.schemaReads], readable, writable };
}

function isManifest(x: Manifest | ProcessInfo[]): x is Manifest {
  return !Array.isArray(x);
}

/**
 * One row per process name in either side (running first, then processes only the candidate
 * has), in name order within each group.
 */
export function compatibilityMatrix(running: Manifest | ProcessInfo[], candidate: Manifest): ProcessCompatibility[] {
  const fromProcs: ProcessInfo[] = isManifest(running) ? running.processes : running;
  const fromVersionOf = (p: ProcessInfo) => (isManifest(running) ? running.version : p.version);
  const from = new Map(fromProcs.map((p) => [p.name, p]));
  const to = new Map(candidate.processes.map((p) => [p.name, p]));
  const names = [...new Set([...from.keys(), ...to.keys()])].sort();
  const rows: ProcessCompatibility[] = [];
  for (const name of names) {
    const fp = from.get(name);
    const tp = to.get(name);
    if (fp && !tp) {
      const f = side(fp, fromVersionOf(fp), `running process ${name}`);
      rows.push({
        process: name,
        change: 'removed',
        fromVersion: f.version,
        toVersion: candidate.version,
        fromWrites: f.writes,
        fromReads: f.reads,
        forward: true,
        backward: true,
        reason: `removed in ${candidate.version}: its checkpointed state is not carried over (the process stops at the switchover)`,
      });
      continue;
    }
    if (!fp && tp) {
      const t = side(tp, candidate.version, `candidate process ${name}`);
      rows.push({
        process: name,
        change: 'added',
        toVersion: t.version,
        toWrites: t.writes,
        toReads: t.reads,
        forward: true,
        backward: true,
        reason: `added in ${candidate.version}: it starts with empty state; a rollback stops it`,
      });
      continue;
    }
    const f = side(fp!, fromVersionOf(fp!), `running process ${name}`);
    const t = side(tp!, candidate.version, `candidate process ${name}`);
    const row: ProcessCompatibility = {
      process: name,
      change: 'kept',
      fromVersion: f.version,
      toVersion: t.version,
      fromWrites: f.writes,
      toWrites: t.writes,
      fromReads: f.reads,
      toReads: t.reads,
      forward: false,
      backward: false,
    };
    const reasons: string[] = [];
    // forward: the new standby must read what the running active writes right now.
    if (t.reads.includes(f.writes) || t.writes === f.writes) row.forwardVia = 'direct';
    else if (t.readable.has(f.writes)) row.forwardVia = 'transform';
    row.forward = row.forwardVia !== undefined;
    if (!row.forward) {
      reasons.push(
        `the candidate reads schema [${[...t.readable].sort((a, b) => a - b).join(', ')}] but the running process writes ${f.writes}, so the new process cannot start as its standby`,
      );
    }
    // backward: after the switch the old process (now standby) must read what the new one writes,
    // either natively/through its own transforms, or because the new one can write down to it.
    if (f.reads.includes(t.writes) || f.writes === t.writes) row.backwardVia = 'direct';
    else if (f.readable.has(t.writes) || [...t.writable].some((v) => f.readable.has(v))) row.backwardVia = 'transform';
    row.backward = row.backwardVia !== undefined;
    if (!row.backward) {
      reasons.push(
        `the running process reads schema [${[...f.readable].sort((a, b) => a - b).join(', ')}] but the candidate writes ${t.writes} (can write [${[...t.writable].sort((a, b) => a - b).join(', ')}]), so a rollback would not be hitless`,
      );
    }
    if (row.forward && row.backward) row.via = row.forwardVia === 'transform' || row.backwardVia === 'transform' ? 'transform' : 'direct';
    if (reasons.length) row.reason = reasons.join('; ');
    rows.push(row);
  }
  return rows;
}

/** What to do about an incompatible row, for messages. */
function advice(r: ProcessCompatibility): string {
  const todo: string[] = [];
  if (!r.forward) todo.push(`the candidate must read schema ${r.fromWrites} (add it to schemaReads, or declare a transform "${r.fromWrites}->${r.toWrites}")`);
  if (!r.backward)
    todo.push(
      `for a hitless rollback the candidate must declare a transform "${r.toWrites}->${r.fromWrites}" (or upgrade first to a release that reads ${r.toWrites})`,
    );
  return todo.join(' and ');
}

/**
 * Throws FAILED_PRECONDITION naming every incompatible process:
 * "incompatible schema X->Y for process P: <why>; <what to do>".
 */
export function assertCompatible(matrix: ProcessCompatibility[]): void {
  const bad = matrix.filter((r) => !r.forward || !r.backward);
  if (!bad.length) return;
  const parts = bad.map(
    (r) =>
      `incompatible schema ${r.fromWrites}->${r.toWrites} for process ${r.process} (${r.fromVersion ?? '?'} -> ${r.toVersion ?? '?'}): ${r.reason}; ${advice(r)}`,
  );
  throw failedPrecondition(`${parts.join('. ')}. The upgrade was not started; pick a candidate bundle that is schema-compatible.`);
}
