/**
 * Role changes and the checks that need the writers to stand still: switchover (freeze, promote,
 * demote), failover, audit, and raising the write schema after a commit. Each takes the
 * process group's `switching` flag, so at most one runs per process; the agent is the only one
 * who changes roles, through role commands on the process's session stream.
 */
import { deadlineExceeded, failedPrecondition, notFound } from '../common/errors';
import { FREEZE_ALIGN_MS } from './checkpoint-options';
import { AuditResponse, CommandKind, CommandResult, PeerDigests, RoleCommand, SwitchoverResponse, TableDigest } from './messages';
import { CheckpointState, PeerSession, ProcessGroup } from './process-group';
import { tableDigestSliced } from './record-table';
import { agreeWriteSchema, pickWriteSchemaFor } from './schema-agreement';

/**
 * Work the caller fits into a switchover at its two edges (the upgrade moves the control-plane NIC
 * there): `beforeFreeze` runs right before the active is frozen, `afterPromote` right after the
 * new active answered PROMOTE, before the old one is demoted. Neither is inside the measured
 * freeze window. A throw from `beforeFreeze` fails the switchover (nothing was frozen yet); one
 * from `afterPromote` is only logged: the switch is made by then.
 */
export interface SwitchoverHooks {
  beforeFreeze?: () => Promise<void>;
  afterPromote?: () => Promise<void>;
}

export class RoleChanges {
  private nextCommandId = 1;

  constructor(private readonly st: CheckpointState) {}

  /** Sends role command `kind` to `s`; resolves with its answer, rejects when refused or unanswered. */
  command(s: PeerSession, kind: CommandKind, extra: Partial<RoleCommand> = {}): Promise<CommandResult> {
    const id = this.nextCommandId++;
    const cmd: RoleCommand = {
      commandId: id,
      kind,
      reason: extra.reason ?? '',
      tableSeqs: extra.tableSeqs ?? {},
      writeSchema: extra.writeSchema ?? 0,
      handover: extra.handover ?? false,
    };
    // A digest of a million records takes a while: REPORT gets a longer answer time.
    const timeoutMs = kind === 'REPORT' ? Math.max(this.st.opts.commandTimeoutMs, 60_000) : this.st.opts.commandTimeoutMs;
    return new Promise<CommandResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        s.pending.delete(id);
        reject(deadlineExceeded(`'${s.reg.instanceId}' did not answer ${kind} within ${timeoutMs} ms`));
      }, timeoutMs);
      s.pending.set(id, { resolve, reject, timer });
      s.channel.send(cmd);
    }).then((r) => {
      if (!r.ok) throw failedPrecondition(`'${s.reg.instanceId}' refused ${kind}: ${r.error}`);
      return r;
    });
  }

  /** Resolves when `done()` holds, re-checked after every ack and applied batch of the group. */
  waitProgress(g: ProcessGroup, s: PeerSession, done: () => boolean, timeoutMs: number, what: () => string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (done()) return resolve();
      // Once settled (here or by the timer) the check stops re-registering itself.
      let settled = false;
      const timer = setTimeout(() => {
        settled = true;
        reject(deadlineExceeded(`${what()} within ${timeoutMs} ms`));
      }, timeoutMs);
      const check = () => {
        if (settled) return;
        if (!this.st.sessions.has(s.id)) {
          settled = true;
          clearTimeout(timer);
          return reject(failedPrecondition(`'${s.reg.instanceId}' disconnected while the agent waited for it`));
        }
        if (done()) {
          settled = true;
          clearTimeout(timer);
          return resolve();
        }
        g.progressWaiters.push(check);
      };
      g.progressWaiters.push(check);
    });
  }

  waitAcked(g: ProcessGroup, s: PeerSession, seqs: Record<string, number>, timeoutMs: number): Promise<void> {
    return this.waitProgress(
      g,
      s,
      () => Object.entries(seqs).every(([t, q]) => (s.acked.get(t) ?? 0) >= q),
      timeoutMs,
      () => `standby '${s.reg.instanceId}' did not drain to zero lag (lag ${g.lagOf(s)} batches)`,
    );
  }

  /**
   * Freezes the active `s`: it stops writing and answers with the last sequence it sent per
   * table; the agent then waits until it applied those batches (they were in flight when the
   * process answered; it does not wait for their acks before answering, which keeps one
   * round trip out of the freeze window). Returns the tables' sequences at the freeze.
   */
  private async freeze(g: ProcessGroup, s: PeerSession, reason: string, handover = false): Promise<{ seqs: Record<string, number>; reply: CommandResult }> {
    const reply = await this.command(s, 'FREEZE', { reason, handover });
    s.frozenAt = { ...g.tableSeqs(), ...reply.tableSeqs };
    const want = s.frozenAt;
    await this.waitProgress(
      g,
      s,
      () => Object.entries(want).every(([t, q]) => (g.tables.get(t)?.replica.seq ?? 0) >= q),
      this.st.opts.commandTimeoutMs,
      () => `the agent did not receive the batches '${s.reg.instanceId}' sent before it froze (${JSON.stringify(want)} vs ${JSON.stringify(g.tableSeqs())})`,
    );
    return { seqs: g.tableSeqs(), reply };
  }

  /**
   * Hands the active role of `process` to the READY standby `toInstance`: freeze the active's
   * writers, promote the standby at the freeze sequences, demote the old active (it becomes a
   * standby that resumes from the log, so a switch back is hitless too).
   *
   * The freeze window is kept to two round trips, one to each instance: the agent does not wait
   * for the standby's acks before PROMOTE. Instead the standby's subscription is capped at the
   * freeze sequences and the standby applies everything up to them before it takes over (it
   * checks that it holds exactly those sequences). Until the new active acknowledged PROMOTE any
   * failure puts the old active back in charge: the agent refuses writes from whoever it does not
   * consider active, so a late promotion cannot fork the table.
   */
  async switchover(process: string, toInstance: string, hooks: SwitchoverHooks = {}): Promise<SwitchoverResponse> {
    const g = this.st.groups.get(process);
    if (!g) throw notFound(`no process '${process}' is known to the agent`);
    if (g.switching) throw failedPrecondition(`a switchover of '${process}' is already in progress`);
    const target = [...g.sessions].find((s) => s.reg.instanceId === toInstance);
    if (!target) throw notFound(`no instance '${toInstance}' of process '${process}' is registered`);
    const old = g.active;
    if (!old) throw failedPrecondition(`process '${process}' has no active instance to switch from`);
    if (target === old) throw failedPrecondition(`'${toInstance}' is already the active instance`);
    if (target.role !== 'STANDBY' || !target.inSync) {
      throw failedPrecondition(`standby '${toInstance}' is not READY (lag ${g.lagOf(target)} batches); wait until it caught up`);
    }
    if (!old.reg.schemaReads.includes(target.reg.schemaWrites) && !target.reg.schemaCanWrite.some((v) => old.reg.schemaReads.includes(v))) {
      throw failedPrecondition(
        `after the switch '${old.reg.instanceId}' could not read what '${toInstance}' writes (schema ${target.reg.schemaWrites}); a rollback would not be hitless`,
      );
    }
    g.switching = true;
    let rolesSwapped = false;
    const started = performance.now();
    try {
      // Best effort: start the freeze when the standby is (nearly) caught up, so what it must
      // apply inside the freeze window is short.
      await this.waitAcked(g, target, g.tableSeqs(), 1000).catch(() => undefined);
      // One no-op command to each side first (UNFREEZE of a process that is not frozen): the
      // command path of both processes is then warm (in a slow guest, code run for the first
      // time costs tens of ms), and that cost is paid before the writers stop, not inside.
      await Promise.all([old, target].map((s) => this.command(s, 'UNFREEZE', { reason: 'switchover: checking the command path' })));
      // Freeze right after the active handed over a batch (waiting at most FREEZE_ALIGN_MS): a
      // writer has then just finished a burst of work and answers at once. A FREEZE that lands
      // in the middle of a burst waits for it, in a slow guest for tens of ms.
      const before = g.tableSeqs();
      const wrote = () => Object.entries(g.tableSeqs()).some(([t, q]) => q > (before[t] ?? 0));
      await this.waitProgress(g, old, wrote, FREEZE_ALIGN_MS, () => 'no batch from the active').catch(() => undefined); // then freeze anyway
      await hooks.beforeFreeze?.();
      const t0 = process_hrtime();
      const { seqs, reply: frozen } = await this.freeze(g, old, `switchover to ${toInstance}`, true);
      const tFrozen = process_hrtime();
      // The old active will be a standby: the new active must write what it reads.
      const writeSchema = pickWriteSchemaFor(target, [old]);
      agreeWriteSchema(this.st.store, g, writeSchema);
      target.subscription?.capAt(seqs);
      target.role = 'ACTIVE';
      target.writeSchema = writeSchema;
      old.role = 'STANDBY';
      g.active = target;
      rolesSwapped = true;
      const promoted = await this.command(target, 'PROMOTE', { tableSeqs: seqs, writeSchema, reason: `switchover from ${old.reg.instanceId}`, handover: true });
      const tPromoted = process_hrtime();
      rolesSwapped = false; // committed: no way back from here but another switchover
      // The switch is made: a failing hook is logged, never undoes it (nor skips the DEMOTE).
      await hooks.afterPromote?.().catch((e: Error) => this.st.log.warn({ process, err: e.message }, 'after-promote step of a switchover failed'));
      target.subscription?.end();
      old.inSync = true; // it holds everything up to `seqs`, exactly what the new active starts from
      for (const [t, q] of Object.entries(seqs)) old.acked.set(t, q);
      old.frozenAt = null;
      const freezeMicros = Math.round(tPromoted - t0);
      await this.command(old, 'DEMOTE', { tableSeqs: seqs, reason: `switchover to ${toInstance}` });
      this.st.log.info(
        {
          process,
          from: old.reg.instanceId,
          to: toInstance,
          freezeMicros,
          freezeAckMicros: Math.round(tFrozen - t0),
          freezeHandledMicros: frozen.handledMicros ?? 0,
          promoteMicros: Math.round(tPromoted - tFrozen),
          promoteHandledMicros: promoted.handledMicros ?? 0,
        },
        'switchover done',
      );
      this.st.observer.switchover(process, (performance.now() - started) / 1000, freezeMicros / 1e6, true);
      return { freezeMicros, tableSeqs: seqs };
    } catch (e) {
      this.st.observer.switchover(process, (performance.now() - started) / 1000, 0, false);
      if (rolesSwapped) {
        // PROMOTE was refused or not answered: the old active takes over again. Tell the target
        // it is a standby, in case it promoted itself late; its writes are refused meanwhile.
        target.role = 'STANDBY';
        target.subscription?.uncap();
        if (this.st.sessions.has(old.id)) {
          old.role = 'ACTIVE';
          g.active = old;
          try {
            agreeWriteSchema(this.st.store, g, old.writeSchema);
          } catch (se) {
            // Go on and unfreeze the old active below: left frozen, it could never write again.
            this.st.log.error({ process, err: (se as Error).message }, 'could not store the write schema while undoing a switchover');
          }
        } else {
          // The old active died in the window: nobody is active until it comes back (it
          // re-registers) or a failover promotes a standby; a dead session never holds the role.
          g.active = null;
        }
        if (this.st.sessions.has(target.id))
          void this.command(target, 'DEMOTE', { tableSeqs: g.tableSeqs(), reason: 'switchover failed' }).catch(() => undefined);
      }
      if (this.st.sessions.has(old.id) && old.role === 'ACTIVE') {
        old.frozenAt = null;
        await this.command(old, 'UNFREEZE', { reason: 'switchover failed' }).catch(() => undefined);
      }
      throw e;
    } finally {
      g.switching = false;
    }
  }

  /**
   * Promotes the READY standby `toInstance` when the process has no active (it died): the standby
   * first applies everything the agent holds, so no acknowledged change is lost.
   */
  async failover(process: string, toInstance: string): Promise<SwitchoverResponse> {
    const g = this.st.groups.get(process);
    if (!g) throw notFound(`no process '${process}' is known to the agent`);
    if (g.active) throw failedPrecondition(`process '${process}' still has an active instance '${g.active.reg.instanceId}'; use a switchover`);
    if (g.switching) throw failedPrecondition(`a role change of '${process}' is already in progress`);
    const target = [...g.sessions].find((s) => s.reg.instanceId === toInstance && s.role === 'STANDBY');
    if (!target) throw notFound(`no standby instance '${toInstance}' of process '${process}' is registered`);
    g.switching = true;
    const t0 = process_hrtime();
    try {
      // Batches the old active sent that are still being stored are applied (and forwarded) first:
      // the new active must start writing after them.
      await g.storesSettled();
      const seqs = g.tableSeqs();
      await this.waitAcked(g, target, seqs, this.st.opts.commandTimeoutMs);
      const writeSchema = pickWriteSchemaFor(
        target,
        g.standbys().filter((s) => s !== target),
      );
      agreeWriteSchema(this.st.store, g, writeSchema);
      target.role = 'ACTIVE';
      target.writeSchema = writeSchema;
      g.active = target;
      target.subscription?.end();
      await this.command(target, 'PROMOTE', { tableSeqs: seqs, writeSchema, reason: 'failover: the active instance is gone' });
      this.st.log.warn({ process, to: toInstance }, 'failover: promoted a standby because the process had no active');
      return { freezeMicros: Math.round(process_hrtime() - t0), tableSeqs: seqs };
    } finally {
      g.switching = false;
    }
  }

  /**
   * Compares every copy of a process's tables at one moment: freezes the active, waits until the
   * in-sync standbys applied everything, asks each instance for its digests (REPORT), and
   * computes the agent's own. The active is unfrozen in every case.
   */
  async audit(process: string): Promise<AuditResponse> {
    const g = this.st.groups.get(process);
    if (!g) throw notFound(`no process '${process}' is known to the agent`);
    if (g.switching) throw failedPrecondition(`a role change of '${process}' is in progress; audit afterwards`);
    g.switching = true;
    const active = g.active;
    try {
      if (active) await this.freeze(g, active, 'audit');
      const seqs = g.tableSeqs();
      for (const s of g.standbys()) if (s.inSync) await this.waitAcked(g, s, seqs, this.st.opts.commandTimeoutMs);
      // Nothing changes now, so the agent and every instance digest at the same time: the active
      // stays frozen for the longest digest, not for their sum (one after the other, a 1M-record
      // table kept it frozen for ~14 s). Sliced: a big table must not stall the agent's event
      // loop (acks of other processes). All are awaited before an error is thrown, so that no
      // digest is still running once the active writes again.
      const agentDigests = (async () => {
        const out: TableDigest[] = [];
        for (const [table, t] of g.tables) {
          const d = await tableDigestSliced(t.replica.table);
          out.push({ table, seq: t.replica.seq, ...d }); // read on resuming: the digested state's sequence
        }
        return out;
      })();
      const reports = [...g.sessions].map(async (s): Promise<PeerDigests> => {
        const r = await this.command(s, 'REPORT', { reason: 'audit' });
        return { instanceId: s.reg.instanceId, vmId: s.reg.vmId, role: s.role, digests: r.digests };
      });
      const settled = await Promise.allSettled([agentDigests, ...reports]);
      const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
      const agent = await agentDigests;
      const peers = await Promise.all(reports);
      const problems: string[] = [];
      for (const a of agent) {
        for (const p of peers) {
          const d = p.digests.find((x) => x.table === a.table);
          if (!d) problems.push(`${p.instanceId} has no table '${a.table}'`);
          else if (d.sha256 !== a.sha256 || d.seq !== a.seq) {
            problems.push(
              `${p.instanceId} table '${a.table}': seq ${d.seq}, ${d.records} records, sha256 ${d.sha256.slice(0, 12)} vs agent seq ${a.seq}, ${a.records} records, sha256 ${a.sha256.slice(0, 12)}`,
            );
          }
        }
      }
      return { agent, peers, consistent: problems.length === 0, detail: problems.join('; ') };
    } finally {
      if (active && this.st.sessions.has(active.id)) {
        active.frozenAt = null;
        await this.command(active, 'UNFREEZE', { reason: 'audit done' }).catch(() => undefined);
      }
      g.switching = false;
    }
  }

  /**
   * Lets the active of `process` write the newest schema it can once no standby needs an older
   * one, leaving out standbys on `leavingVm` (stopped, their sessions may not have ended yet).
   * After an upgrade is committed the new version otherwise keeps writing the schema its
   * predecessor read. Returns the schema the active writes.
   */
  async raiseWriteSchema(process: string, leavingVm: string): Promise<number> {
    const g = this.st.groups.get(process);
    const a = g?.active;
    if (!g || !a) throw notFound(`process '${process}' has no active instance`);
    if (g.switching) throw failedPrecondition(`a role change of '${process}' is in progress`);
    const want = pickWriteSchemaFor(
      a,
      g.standbys().filter((s) => s.reg.vmId !== leavingVm),
    );
    if (want === a.writeSchema) return want;
    const was = a.writeSchema;
    // Batches of either schema are accepted from the active (see write()), so the order in which
    // this takes effect on both sides does not matter. Stored first: a refusal changes nothing.
    agreeWriteSchema(this.st.store, g, want);
    a.writeSchema = want;
    await this.command(a, 'SET_WRITE_SCHEMA', { writeSchema: want, reason: `no standby reads only schema ${was} any more` });
    this.st.log.info({ process, instance: a.reg.instanceId, from: was, to: want }, 'active writes a newer schema');
    return want;
  }
}

/** Monotonic microseconds. */
function process_hrtime(): number {
  return Number(process.hrtime.bigint() / 1000n);
}
