/**
 * Process sessions: registration (who may join, in which role, writing which schema), the end of
 * a session, command results, and the SessionNotices a process sends about its protocol sessions.
 */
import crypto from 'node:crypto';
import { alreadyExists, failedPrecondition, invalidArgument, permissionDenied, unavailable } from '../common/errors';
import { CommandResult, Register, Registered, SessionNotice } from './messages';
import { CheckpointState, PeerSession, SessionChannel, groupOf } from './process-group';
import { agreeWriteSchema, checkReadsTables, pickWriteSchema, validateRegister } from './schema-agreement';
import { leaveInSync } from './sync-acks';
import type { WritePath } from './write-path';

/** A SessionNotice as received: when, and from which process instance in which VM. */
export interface ReportedSession extends SessionNotice {
  at: number;
  process: string;
  instance: string;
  vm: string;
}

export class Sessions {
  private readonly noticeListeners: ((r: ReportedSession) => void)[] = [];

  constructor(
    private readonly st: CheckpointState,
    /** Declares (or re-declares) the tables an active registers with. */
    private readonly tables: Pick<WritePath, 'declareTable'>,
  ) {}

  /**
   * Registers a process instance. `peerVm` is the VM the connection provably comes from (per-VM
   * socket), or null for host-local connections, which may claim any VM.
   */
  register(reg: Register, channel: SessionChannel, peerVm: string | null): Registered {
    validateRegister(reg);
    if (peerVm !== null && reg.vmId !== peerVm) {
      throw permissionDenied(
        `this connection comes from VM '${peerVm}' but the process claims VM '${reg.vmId}'; a process may only register for the VM it runs in`,
      );
    }
    for (const s of this.st.sessions.values()) {
      if (s.reg.instanceId === reg.instanceId) {
        throw alreadyExists(
          `instance '${reg.instanceId}' is already registered (session ${s.id}); use a unique instance id, or wait until the old session's stream closes`,
        );
      }
    }
    const g = groupOf(this.st, reg.process);
    if (reg.wantedRole === 'ACTIVE' && reg.rejoin && g.active) {
      // Two instances may both believe they are active after an agent restart in the middle of a
      // switchover (the old one was frozen, the new one promoted). The first one back keeps the
      // role; the other follows it (see Register.rejoin) and the upgrade's recovery decides.
      this.st.log.warn(
        { process: reg.process, instance: reg.instanceId, active: g.active.reg.instanceId },
        'a returning instance asked for ACTIVE but another instance holds it; it joins as STANDBY',
      );
      reg.wantedRole = 'STANDBY';
      reg.tables = [];
    }
    const reads = new Set(reg.schemaReads);
    const canWrite = reg.schemaCanWrite.length ? reg.schemaCanWrite : [reg.schemaWrites];
    let writeSchema = 0;

    if (reg.wantedRole === 'ACTIVE') {
      if (g.active) {
        throw failedPrecondition(
          `process '${reg.process}' already has an active instance '${g.active.reg.instanceId}' in VM '${g.active.reg.vmId}'; register as STANDBY, the agent promotes standbys on switchover`,
        );
      }
      checkReadsTables(g, reg, reads);
      writeSchema = pickWriteSchema(this.st, g, reg, canWrite);
    } else {
      const active = g.active;
      if (active && !reads.has(active.writeSchema)) {
        throw failedPrecondition(
          `standby '${reg.instanceId}' (version ${reg.softwareVersion || '?'}) reads schema versions [${[...reads].join(', ')}] but the active '${active.reg.instanceId}' (version ${active.reg.softwareVersion || '?'}) writes schema ${active.writeSchema}; install a version that reads ${active.writeSchema} or register a transform ${active.writeSchema}->${reg.schemaWrites}`,
        );
      }
      checkReadsTables(g, reg, reads);
    }

    const session = new PeerSession(`s-${crypto.randomBytes(6).toString('hex')}`, reg, channel);
    session.writeSchema = writeSchema || reg.schemaWrites;
    if (reg.wantedRole === 'ACTIVE') {
      agreeWriteSchema(this.st.store, g, writeSchema);
      for (const t of reg.tables) this.tables.declareTable(g, t.name, t.durability, t.kind === 'FIB' ? 'FIB' : 'TABLE_KIND_UNSPECIFIED');
      g.active = session;
    }
    g.sessions.add(session);
    this.st.sessions.set(session.id, session);
    this.st.log.info(
      { process: reg.process, instance: reg.instanceId, vm: reg.vmId, role: session.role, session: session.id, version: reg.softwareVersion },
      'process registered',
    );
    return {
      sessionId: session.id,
      role: session.role,
      tableSeqs: g.tableSeqs(),
      tableWriters: g.tableWriters(),
      activeSchema: g.active ? g.active.writeSchema : 0,
      writeSchema,
    };
  }

  /** The session stream ended: the process is gone (or will reconnect with a new session). */
  unregister(sessionId: string, reason: string): void {
    const s = this.st.sessions.get(sessionId);
    if (!s) return;
    this.st.sessions.delete(sessionId);
    const g = groupOf(this.st, s.reg.process);
    g.sessions.delete(s);
    if (g.active === s) g.active = null;
    s.subscription?.cancelled();
    for (const p of s.pending.values()) {
      clearTimeout(p.timer);
      // A status of its own, not INTERNAL: the caller (an audit, a switchover) learns that the
      // process went away, which is a fact about the process, not a bug here.
      p.reject(unavailable(`process '${s.reg.instanceId}' disconnected (${reason}) before it answered; check the process (issu vm log), then try again`));
    }
    leaveInSync(g, s);
    this.st.log.info({ process: s.reg.process, instance: s.reg.instanceId, session: sessionId, reason }, 'process session ended');
  }

  /**
   * A process's account of one of its protocol sessions (hitless.v1.SessionNotice): validated,
   * logged, and handed to the listeners (the upgrade service records it in the upgrade).
   */
  sessionNotice(sessionId: string, n: SessionNotice): void {
    const s = this.st.sessions.get(sessionId);
    if (!s) return;
    if (!n.session || Buffer.byteLength(n.session) > 200)
      throw invalidArgument('SessionNotice.session must name the session in 1 to 200 bytes, e.g. "bgp 198.51.100.2"');
    if (Buffer.byteLength(n.detail ?? '') > 1000) throw invalidArgument('SessionNotice.detail is over 1,000 bytes; shorten it');
    if (!['NONSTOP', 'GRACEFUL_RESTART', 'RESET'].includes(n.outcome)) {
      throw invalidArgument(`SessionNotice.outcome must be NONSTOP, GRACEFUL_RESTART or RESET, not ${n.outcome}`);
    }
    const r: ReportedSession = { ...n, detail: n.detail ?? '', at: Date.now(), process: s.reg.process, instance: s.reg.instanceId, vm: s.reg.vmId };
    this.st.log[n.outcome === 'NONSTOP' ? 'info' : 'warn'](
      { process: r.process, instance: r.instance, vm: r.vm, session: r.session, outcome: r.outcome, durationMs: r.durationMs, detail: r.detail },
      'a protocol session changed hands',
    );
    for (const l of this.noticeListeners) l(r);
  }

  /** Registers a listener for every SessionNotice (see sessionNotice). */
  onSessionNotice(l: (r: ReportedSession) => void): void {
    this.noticeListeners.push(l);
  }

  commandResult(sessionId: string, r: CommandResult): void {
    const s = this.st.sessions.get(sessionId);
    const p = s?.pending.get(r.commandId);
    if (!s || !p) return;
    s.pending.delete(r.commandId);
    clearTimeout(p.timer);
    p.resolve(r);
  }
}
