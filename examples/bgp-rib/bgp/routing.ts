/**
 * The example router's BGP, checkpointed: the speaker (speaker.ts) runs in the ACTIVE instance
 * only, and everything it knows is written to the process's tables, so the standby always holds
 * it and the agent programs the data plane from it.
 *
 *   bgp-sessions  peer address -> {state, since, holdTime, keepalive, as4, families, peerId, gr}
 *   bgp-adj-in    "peer|prefix" -> the route's path attributes as the peer sent them
 *   bgp-loc-rib   prefix -> the best route: peer, next hop, AS path
 *   bgp-adj-out   "peer|prefix" -> what we announced to the peer
 *   fib           (FIB table) prefix -> FibEntry: the best route's next hop on the data-plane port
 *                 toward the peer; the static --fib entries live here too
 *
 * Values are JSON (FibEntry for the FIB). A change whose value equals what the table holds is not
 * written: a new active that learns the same routes again changes nothing, and the data plane
 * sees no change.
 *
 *   bgp-handover  peer address -> how the session was handed over at the last switchover:
 *                 {at, saved: SavedSession} (captured) or {at, why} (could not be); written by
 *                 the old active while it freezes, consumed (deleted) by the new active
 *
 * Nonstop routing (a switchover, FREEZE with `handover`): the agent has taken the old VM's
 * control-plane NIC down. While it freezes, the old active stops every Established session where
 * it stands and captures its TCP connection (TCP repair), writes its last RIB changes and the
 * captures, and answers. At PROMOTE, before it answers, the new active restores the connections
 * (same addresses and ports: it has the same control-plane address); the agent then raises the
 * new VM's NIC. The new active loads the Adj-RIB-In as current routes, sends a KEEPALIVE at once
 * (the peer's hold timer), and reads on from the first byte the old one had not parsed. Its own
 * hold timer counts from the last message the old one received. The peer sees no reset: one
 * endpoint at a time, and the captured one never sends again (closed in repair mode at DEMOTE).
 * A switchover that is called off (UNFREEZE) resumes the captured sessions where they stood.
 *
 * Graceful-restart fallback (no capture: TCP repair unavailable, a session not Established, a
 * crash of the active): the old active, if alive, lets go without a NOTIFICATION; the new active
 * reloads Adj-RIB-In as stale routes (still selected, still in the FIB), connects, and the peer,
 * which keeps our routes through the graceful restart, sends its routes and End-of-RIB; what it
 * did not send again is then withdrawn. The peer sees a session reset, and the new active tells
 * the agent so (SessionNotice GRACEFUL_RESTART, with how long it took): no nonstop routing is
 * claimed where it did not happen.
 */
import net from 'node:net';
import { CheckpointClient } from '../../../agent/sdk/checkpoint-client';
import { encodeFibEntry } from '../../../agent/dataplane/fib-entry';
import { closeTcpSilently, restoreTcp, tcpRepairSelfTest, tcpStateFromJson } from '../../../agent/sdk/tcp-repair';
import { PathAttributes } from './messages';
import { Negotiated, SavedSession, bgpSocketReader } from './session';
import { BgpSpeaker, Route, SpeakerConfig } from './speaker';

export const BGP_TABLES = ['bgp-sessions', 'bgp-adj-in', 'bgp-loc-rib', 'bgp-adj-out', 'bgp-handover'] as const;

/** A bgp-handover record. */
interface Handover {
  at: number;
  saved?: SavedSession;
  /** Why the session was not captured. */
  why?: string;
  /** Time the capture took in the old active, ms. */
  captureMs?: number;
}

/** A session restored at PROMOTE, waiting for the speaker to adopt it. */
interface Moved {
  sock: net.Socket;
  reader: ReturnType<typeof bgpSocketReader>;
  saved: SavedSession;
  unsent: Buffer;
  captureMs: number;
  restoreMs: number;
  queued: number;
}
const FLUSH_MS = 20;
/** Time spent restoring routes per turn of the event loop, ms. */
const RESTORE_SLICE_MS = 8;

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** `make(arg)` computed once per `key` object (kept while the object lives). */
function memo<T>(make: (arg: T) => Buffer): (key: object, arg: T) => Buffer {
  const cache = new WeakMap<object, Buffer>();
  return (key, arg) => {
    let v = cache.get(key);
    if (!v) cache.set(key, (v = make(arg)));
    return v;
  };
}

export interface BgpRoutingOptions {
  speaker: SpeakerConfig;
  /** Data-plane port toward the peers: the interface of the FIB entries of learned routes. */
  port: string;
  fibTable: string;
}

type Out = (o: Record<string, unknown>) => void;

export class BgpRouting {
  private speaker: BgpSpeaker | null = null;
  /** table -> key -> value (null: delete); written every FLUSH_MS. */
  private pending = new Map<string, Map<string, Buffer | null>>();
  private timer: NodeJS.Timeout | null = null;
  /** Sessions restored at the last PROMOTE, by peer. */
  private moved = new Map<string, Moved>();
  /** Peers whose session was not moved at the last promotion: why, for the graceful-restart notice. */
  private fallback = new Map<string, string>();
  /** performance.now() at the last promotion. */
  private promotedAt = 0;
  /** Why TCP repair cannot move sessions here (its self-test failed), null when it can. */
  private nsrUnavailable: string | null = 'TCP repair has not been tested yet';

  constructor(
    private readonly client: CheckpointClient,
    private readonly opts: BgpRoutingOptions,
    private readonly out: Out,
  ) {
    // Proves TCP repair works here, and warms its code paths, long before a switchover needs it.
    void tcpRepairSelfTest().then((r) => {
      this.nsrUnavailable = r.ok ? null : r.why;
      this.out(r.ok ? { event: 'bgp-nsr-ready', captureMs: r.captureMs, restoreMs: r.restoreMs } : { event: 'bgp-nsr-unavailable', why: r.why });
    });
    client.on('freezing', (handover: boolean) => handover && this.captureSessions());
    client.on('unfrozen', () => this.resumeSessions());
    client.on('promoting', (handover: boolean) => this.restoreSessions(handover));
  }

  /**
   * FREEZE of a switchover: capture every Established session and write the captures together
   * with the last RIB changes, before the answer (see the header). Never throws.
   */
  private captureSessions(): void {
    const sp = this.speaker;
    if (!sp || this.client.role !== 'ACTIVE') return;
    try {
      const at = Date.now();
      const t0 = performance.now();
      const captures = sp.capture(this.nsrUnavailable); // reading stops first
      const captureMs = Math.round((performance.now() - t0) * 100) / 100;
      this.flush(); // everything learned up to the capture goes with it
      const b = this.client.batch('bgp-handover');
      for (const [peer, r] of captures) {
        const rec: Handover = 'saved' in r ? { at, saved: r.saved, captureMs } : { at, why: r.why };
        b.put(peer, Buffer.from(JSON.stringify(rec)));
        this.out(
          'saved' in r
            ? { event: 'bgp-nsr-captured', peer, captureMs, sendQueue: r.tcp.sendQueue.length, recvQueue: r.tcp.recvQueue.length }
            : { event: 'bgp-nsr-unavailable', peer, why: r.why },
        );
      }
      if (b.count) void b.commit().catch((e: Error) => this.out({ event: 'write-failed', table: 'bgp-handover', message: e.message }));
    } catch (e) {
      this.out({ event: 'bgp-error', message: `capturing sessions: ${(e as Error).message}` });
    }
  }

  /** The switchover was called off: the captured sessions carry on here, and the captures go. */
  private resumeSessions(): void {
    if (!this.speaker || this.client.role !== 'ACTIVE') return;
    try {
      this.speaker.resumeCaptured();
      this.dropHandovers();
      this.out({ event: 'bgp-nsr-resumed' });
    } catch (e) {
      this.out({ event: 'bgp-error', message: `resuming captured sessions: ${(e as Error).message}` });
    }
  }

  /**
   * PROMOTE, before the answer: restore every captured connection, so that it exists before the
   * agent raises this VM's NIC (a segment for an unknown connection would be answered with a
   * reset). The speaker adopts them once it starts. Never throws: a failed restore falls back to
   * graceful restart, and says why.
   */
  private restoreSessions(handover: boolean): void {
    this.promotedAt = performance.now();
    this.moved.clear();
    this.fallback.clear();
    const now = Date.now();
    this.client.table('bgp-handover').forEach((peer, _schema, value) => {
      try {
        const h = JSON.parse(Buffer.from(value).toString()) as Handover;
        // A failover's promotion: the active died; whatever capture is left is not the last word
        // on the connection (it may be one this dead active restored and carried on).
        if (!handover) return void this.fallback.set(peer, 'the previous active ended without handing the session over');
        if (!h.saved) return void this.fallback.set(peer, h.why ?? 'not captured');
        // Clocks of two VMs agree to about a second; a capture older than the hold time is
        // from a handover long over (the peer has given up on that connection).
        const age = now - h.at;
        if (age > h.saved.nego.holdTime * 1000) return void this.fallback.set(peer, `the capture is ${Math.round(age / 1000)} s old`);
        const t0 = performance.now();
        const tcp = tcpStateFromJson(h.saved.tcp);
        const { fd, unsent } = restoreTcp(tcp);
        const reader = bgpSocketReader();
        const sock = new net.Socket({ fd, readable: true, writable: true, onread: reader.onread, pauseOnCreate: true } as net.SocketConstructorOpts);
        const restoreMs = Math.round((performance.now() - t0) * 100) / 100;
        this.moved.set(peer, {
          sock,
          reader,
          saved: h.saved,
          unsent,
          captureMs: h.captureMs ?? 0,
          restoreMs,
          queued: tcp.sendQueue.length + tcp.recvQueue.length,
        });
        this.out({ event: 'bgp-nsr-restored', peer, restoreMs, captureMs: h.captureMs ?? 0 });
      } catch (e) {
        this.fallback.set(peer, `restoring the connection failed: ${(e as Error).message}`);
        this.out({ event: 'bgp-nsr-restore-failed', peer, message: (e as Error).message });
      }
    });
  }

  private dropHandovers(): void {
    const t = this.client.table('bgp-handover');
    if (t.size === 0) return;
    const b = this.client.batch('bgp-handover');
    t.forEach((peer) => b.delete(peer));
    void b.commit().catch((e: Error) => this.out({ event: 'write-failed', table: 'bgp-handover', message: e.message }));
  }

  /** Follows the instance's role: the speaker runs while ACTIVE. */
  onRole(role: string): void {
    if (role === 'ACTIVE' && !this.speaker) this.startSpeaker();
    else if (role !== 'ACTIVE' && this.speaker) {
      this.speaker.release(); // captured connections close in repair mode: not a byte to the peer
      this.speaker = null;
      this.pending.clear();
      this.out({ event: 'bgp-released' });
    }
    if (role !== 'ACTIVE') {
      // Restored but never adopted (the promotion was undone): the old active may carry on with
      // the peer, so these close without a word.
      for (const m of this.moved.values()) closeTcpSilently(m.sock);
      this.moved.clear();
    }
  }

  stop(): void {
    this.speaker?.stop();
    this.speaker = null;
  }

  summary(): unknown {
    return this.speaker ? { peers: this.speaker.summary(), best: this.speaker.locRib.size } : { peers: [], best: 0, role: 'standby' };
  }

  /**
   * Starts the speaker once the routes the previous active had learned are restored. That work
   * (tens of thousands of routes) is done in slices that yield to the event loop: in a guest
   * under software emulation, doing it in one go held this process for seconds, long enough
   * for its connection to the agent to be dropped as dead.
   */
  private startSpeaker(): void {
    const sp = new BgpSpeaker(this.opts.speaker);
    this.speaker = sp;
    void this.restoreThenStart(sp).catch((e: Error) => this.out({ event: 'bgp-error', message: e.message }));
  }

  private async restoreThenStart(sp: BgpSpeaker): Promise<void> {
    // Moved sessions first: their keepalives start now, their reading once the routes are back.
    const moved = new Map(this.moved);
    this.moved.clear();
    for (const [peer, m] of moved) this.adoptSession(sp, peer, m);
    this.dropHandovers(); // consumed: no later promotion may restore them
    // The NONSTOP notices and the handover deletes go out before the restore below: in a slow
    // guest that takes seconds, and the new active could die meanwhile (the agent's report would
    // then not know the session had moved).
    await nextTurn();
    if (this.speaker !== sp) return; // demoted meanwhile
    // Values are memoized per attributes object: the routes of one UPDATE share one.
    const locRibValue = memo((r: Route) => Buffer.from(JSON.stringify({ peer: r.peer, nextHop: r.attrs.nextHop, asPath: r.attrs.asPath })));
    const adjInValue = memo((attrs: PathAttributes) => Buffer.from(JSON.stringify(attrs)));
    const fibValues = new Map<string, Buffer>();
    const fibValue = (nextHop: string) => {
      let v = fibValues.get(nextHop);
      if (!v) fibValues.set(nextHop, (v = encodeFibEntry({ nextHops: [{ gateway: nextHop, interface: this.opts.port, weight: 1 }] })));
      return v;
    };
    sp.on('best', (prefix: string, r: Route | null) => {
      this.put('bgp-loc-rib', prefix, r ? locRibValue(r.attrs, r) : null);
      this.put(this.opts.fibTable, prefix, r ? fibValue(r.attrs.nextHop) : null);
    });
    // What the previous active had learned: stale until the peers send it again. Read straight
    // from the table in slices of RESTORE_SLICE_MS (no copy of the table first: that alone held
    // a guest under TCG for a second with 22,000 routes). Routes of one UPDATE carry the same
    // attribute bytes, so each distinct value is parsed once and its object shared.
    const adjIn = this.client.table('bgp-adj-in');
    const parsed = new Map<string, PathAttributes>();
    const restored = new Map<string, number>(); // routes per peer
    let version = adjIn.version;
    let slot = 0;
    while (slot >= 0) {
      const until = performance.now() + RESTORE_SLICE_MS;
      const byPeer = new Map<string, [string, PathAttributes][]>();
      do {
        slot = adjIn.forEachIn(slot, 64, (key, _schema, value) => {
          const text = value.toString();
          let attrs = parsed.get(text);
          if (!attrs) parsed.set(text, (attrs = JSON.parse(text) as PathAttributes));
          const at = key.indexOf('|');
          const peer = key.slice(0, at);
          let routes = byPeer.get(peer);
          if (!routes) byPeer.set(peer, (routes = []));
          routes.push([key.slice(at + 1), attrs]);
        });
      } while (slot >= 0 && performance.now() < until);
      for (const [peer, routes] of byPeer) {
        sp.restore(peer, routes, !sp.adopted(peer));
        restored.set(peer, (restored.get(peer) ?? 0) + routes.length);
      }
      await nextTurn();
      if (this.speaker !== sp) return; // demoted meanwhile
      if (adjIn.version !== version) {
        // Not written before the speaker starts; should it be, a pass over the changed table
        // restores every route again (restore() replaces what a route held).
        version = adjIn.version;
        slot = 0;
        restored.clear();
      }
    }
    // Previous active had these sessions Established and did not hand them over: the peer saw a
    // reset; the notice goes once the peer's routes are back (End-of-RIB).
    const grSince = this.promotedAt || performance.now();
    const grPending = new Map<string, string>();
    this.client.table('bgp-sessions').forEach((peer, _schema, value) => {
      if (sp.adopted(peer)) return;
      const was = JSON.parse(Buffer.from(value).toString()) as { state?: string };
      if (was.state === 'Established' || this.fallback.has(peer))
        grPending.set(peer, this.fallback.get(peer) ?? 'the previous active ended without handing the session over');
    });
    this.fallback.clear();
    sp.on('adj-in', (peer: string, prefix: string, r: Route | null) => this.put('bgp-adj-in', `${peer}|${prefix}`, r ? adjInValue(r.attrs, r.attrs) : null));
    sp.on('adj-out', (peer: string, prefixes: string[], attrs: PathAttributes) => {
      const v = Buffer.from(JSON.stringify(attrs));
      for (const p of prefixes) this.put('bgp-adj-out', `${peer}|${p}`, v);
    });
    sp.on('established', (peer: string, n: Negotiated) => {
      this.put(
        'bgp-sessions',
        peer,
        Buffer.from(
          JSON.stringify({
            state: 'Established',
            since: Date.now(),
            holdTime: n.holdTime,
            keepalive: n.keepaliveS,
            as4: n.as4,
            families: n.families,
            peerId: n.peerIdentifier,
            gr: n.peerGracefulRestart,
          }),
        ),
      );
      this.out({ event: 'bgp-established', peer, holdTime: n.holdTime, families: n.families.length, restored: restored.get(peer) ?? 0 });
    });
    sp.on('end-of-rib', (peer: string, f: { afi: number }) => {
      this.out({ event: 'bgp-end-of-rib', peer, afi: f.afi, best: sp.locRib.size });
      const why = grPending.get(peer);
      if (why === undefined) return;
      grPending.delete(peer);
      const durationMs = Math.round(performance.now() - grSince);
      this.client.notice({ session: `bgp ${peer}`, outcome: 'GRACEFUL_RESTART', durationMs, detail: `counted from this instance's promotion; ${why}` });
      this.out({ event: 'bgp-graceful-restart-done', peer, durationMs, why });
    });
    sp.on('down', (peer: string, d: { reason: string }) => {
      this.put('bgp-sessions', peer, Buffer.from(JSON.stringify({ state: 'Idle', since: Date.now(), reason: d.reason })));
      this.out({ event: 'bgp-down', peer, reason: d.reason });
    });
    for (const peer of moved.keys()) sp.startReading(peer);
    sp.start();
  }

  /** Hands a connection restored at PROMOTE to the speaker and tells the agent (NONSTOP). */
  private adoptSession(sp: BgpSpeaker, peer: string, m: Moved): void {
    const announced: string[] = [];
    const prefix = `${peer}|`;
    this.client.table('bgp-adj-out').forEach((key) => key.startsWith(prefix) && announced.push(key.slice(prefix.length)));
    try {
      sp.adopt(peer, m.sock, m.reader, m.saved, m.unsent, announced);
    } catch (e) {
      m.sock.destroy();
      this.out({ event: 'bgp-error', message: `adopting the session with ${peer}: ${(e as Error).message}` });
      return;
    }
    const durationMs = Math.max(1, Math.round(m.captureMs + m.restoreMs));
    this.client.notice({
      session: `bgp ${peer}`,
      outcome: 'NONSTOP',
      durationMs,
      detail: `TCP repair: captured in ${m.captureMs} ms, restored in ${m.restoreMs} ms, ${m.queued} bytes in flight carried over`,
    });
    this.out({ event: 'bgp-nsr-adopted', peer, captureMs: m.captureMs, restoreMs: m.restoreMs, queued: m.queued, announced: announced.length });
  }

  /** Queues a write unless the table already holds exactly this value. */
  private put(table: string, key: string, value: Buffer | null): void {
    const cur = this.client.table(table).records.get(key);
    const same = value === null ? cur === undefined : cur !== undefined && cur.value.equals(value);
    let t = this.pending.get(table);
    if (same) {
      t?.delete(key); // a later change back to what the table holds cancels the queued one
      return;
    }
    if (!t) this.pending.set(table, (t = new Map()));
    t.set(key, value);
    this.timer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  private flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.client.role !== 'ACTIVE') return;
    for (const [table, changes] of this.pending) {
      let b = this.client.batch(table);
      for (const [k, v] of changes) {
        if (v) b.put(k, v);
        else b.delete(k);
        if (b.count >= 1000) {
          void b.commit().catch((e: Error) => this.out({ event: 'write-failed', table, message: e.message }));
          b = this.client.batch(table);
        }
      }
      if (b.count) void b.commit().catch((e: Error) => this.out({ event: 'write-failed', table, message: e.message }));
    }
    this.pending.clear();
  }
}
