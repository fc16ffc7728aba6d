/**
 * A BGP speaker: sessions to configured peers (connecting, and retrying every few seconds), the
 * RIBs and best-path selection (RFC 4271 9.1).
 *
 *   Adj-RIB-In   per peer: every route the peer announced and has not withdrawn
 *   Loc-RIB      per prefix: the best of the Adj-RIBs-In ('best' events say what changed)
 *   Adj-RIB-Out  per peer: what we announced to it: our own configured prefixes, next hop self
 *
 * Learned routes are not passed on to other peers (the example router originates its own prefixes
 * and installs what it learns). On a session's end its Adj-RIB-In is dropped, except that with
 * graceful restart (the peer advertised it) the routes stay, marked stale, until the session is
 * back and the peer's End-of-RIB, or the restart time, ends them (RFC 4724 4.2).
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { AFI_IPV4, AFI_IPV6, Origin, PathAttributes, UpdateMessage, encodeEndOfRib, encodeUpdate } from './messages';
import { BgpSession, Negotiated, SavedSession, bgpSocketReader } from './session';

export interface PeerConfig {
  address: string;
  as: number;
  port?: number;
  /** Local address to connect from (next hop of our IPv4 routes when set). */
  localAddress?: string;
}

export interface SpeakerConfig {
  as: number;
  routerId: string;
  holdTime: number;
  peers: PeerConfig[];
  /** Prefixes this router originates (canonical text). */
  announce: string[];
  /** Next hop of our IPv6 prefixes (an IPv6 session address is not known over an IPv4 session). */
  nextHop6?: string;
  /**
   * Next hop of our IPv4 prefixes: the data plane's address toward the peer, so that traffic to
   * them goes through the data plane, not to the control plane. Default: the session's address.
   */
  nextHop4?: string;
  /** Graceful-restart time we advertise, s (0: not advertised). */
  gracefulRestartTime?: number;
  /** Delay between connection attempts, ms. */
  connectRetryMs?: number;
}

export interface Route {
  peer: string;
  attrs: PathAttributes;
  stale: boolean;
}

interface PeerState {
  cfg: PeerConfig;
  session: BgpSession | null;
  adjRibIn: Map<string, Route>;
  adjRibOut: Set<string>;
  retry: NodeJS.Timeout | null;
  staleTimer: NodeJS.Timeout | null;
  /** Sessions that went down while Established (the peer's view of "session resets"). */
  resets: number;
}

/** Most UPDATE payload per message: 4,096 minus header and attribute overhead, with room to spare. */
const PREFIXES_PER_UPDATE = 400;

export class BgpSpeaker extends EventEmitter {
  readonly peers = new Map<string, PeerState>();
  readonly locRib = new Map<string, Route>();
  private stopped = false;

  constructor(readonly cfg: SpeakerConfig) {
    super();
    for (const p of cfg.peers)
      this.peers.set(p.address, { cfg: p, session: null, adjRibIn: new Map(), adjRibOut: new Set(), retry: null, staleTimer: null, resets: 0 });
  }

  /** Connects to every peer whose session was not adopted. */
  start(): void {
    for (const p of this.peers.values()) if (!p.session) this.connect(p);
  }

  /**
   * Carries on a session another instance captured (nonstop routing): `sock` is the restored
   * connection, created with `reader` and paused; `announced` what the old instance had sent the
   * peer (its Adj-RIB-Out), which stays announced. Keepalives start at once; reading starts
   * with startReading(), once the caller restored the peer's routes (restore, not stale).
   */
  adopt(peer: string, sock: net.Socket, reader: ReturnType<typeof bgpSocketReader>, saved: SavedSession, unsent: Buffer, announced: string[]): void {
    const p = this.peers.get(peer);
    if (!p) throw new Error(`${peer} is not a configured peer`);
    const s = this.newSession(p);
    reader.to(s);
    this.wire(p, s, sock);
    for (const x of announced) p.adjRibOut.add(x);
    s.adopt(sock, saved, unsent);
  }

  /** Whether `peer`'s session was adopted (and not lost since). */
  adopted(peer: string): boolean {
    return this.peers.get(peer)?.session?.state === 'Established';
  }

  /** Starts reading an adopted session (its routes are restored). */
  startReading(peer: string): void {
    this.peers.get(peer)?.session?.startReading();
  }

  /**
   * Captures every session (see BgpSession.capture): peer -> state or why not. With `unavailable`
   * (TCP repair cannot be used here) no session is touched and each gets that reason.
   */
  capture(unavailable: string | null = null): Map<string, ReturnType<BgpSession['capture']>> {
    const out = new Map<string, ReturnType<BgpSession['capture']>>();
    for (const p of this.peers.values()) if (p.session) out.set(p.cfg.address, unavailable ? { why: unavailable } : p.session.capture());
    return out;
  }

  /** Undoes capture(): the sessions carry on here. */
  resumeCaptured(): void {
    for (const p of this.peers.values()) p.session?.resumeCaptured();
  }

  /** Ends every session with a Cease NOTIFICATION. */
  stop(): void {
    this.halt((s) => s.stop('the speaker is stopping'));
  }

  /**
   * Lets go of every session without a NOTIFICATION (a switchover hands the router's sessions to
   * another instance): to the peer it is a restart, and with graceful restart it keeps our routes.
   */
  release(): void {
    this.halt((s) => s.release('handed over to another instance'));
  }

  private halt(end: (s: BgpSession) => void): void {
    this.stopped = true;
    for (const p of this.peers.values()) {
      if (p.retry) clearTimeout(p.retry);
      if (p.staleTimer) clearTimeout(p.staleTimer);
      p.retry = p.staleTimer = null;
      if (p.session) end(p.session);
    }
  }

  /** Routes of a previous instance: stale (graceful restart) or current (the session was moved). */
  restore(peer: string, routes: Iterable<[string, PathAttributes]>, stale: boolean): void {
    const p = this.peers.get(peer);
    if (!p) return;
    const changed = new Set<string>();
    for (const [prefix, attrs] of routes) {
      p.adjRibIn.set(prefix, { peer, attrs, stale });
      changed.add(prefix);
    }
    this.select(changed);
  }

  private connect(p: PeerState): void {
    if (this.stopped) return;
    const reader = bgpSocketReader();
    const sock = net.connect({ host: p.cfg.address, port: p.cfg.port ?? 179, localAddress: p.cfg.localAddress, onread: reader.onread });
    sock.once('error', () => {
      if (!p.session) this.retry(p);
    });
    sock.once('connect', () => {
      const s = this.newSession(p);
      reader.to(s);
      this.wire(p, s, sock);
      s.attach(sock, true);
    });
  }

  private retry(p: PeerState): void {
    if (this.stopped || p.retry) return;
    p.retry = setTimeout(() => {
      p.retry = null;
      this.connect(p);
    }, this.cfg.connectRetryMs ?? 2000);
  }

  private newSession(p: PeerState): BgpSession {
    return new BgpSession({
      localAs: this.cfg.as,
      routerId: this.cfg.routerId,
      peerAs: p.cfg.as,
      peerAddress: p.cfg.address,
      holdTime: this.cfg.holdTime,
      gracefulRestartTime: this.cfg.gracefulRestartTime ?? 0,
    });
  }

  private wire(p: PeerState, s: BgpSession, sock: net.Socket): void {
    p.session = s;
    s.on('established', (n: Negotiated) => this.established(p, n, sock.localAddress ?? ''));
    s.on('update', (u: UpdateMessage) => this.onUpdate(p, u));
    s.on('refresh', () => this.announceAll(p, s.negotiated(), sock.localAddress ?? ''));
    s.on('down', (d: { reason: string; was: string }) => {
      p.session = null;
      if (d.was === 'Established') p.resets++;
      this.sessionDown(p, s);
      this.emit('down', p.cfg.address, d);
      this.retry(p);
    });
  }

  private established(p: PeerState, n: Negotiated, local: string): void {
    this.emit('established', p.cfg.address, n);
    this.announceAll(p, n, local);
  }

  /** Our prefixes, then End-of-RIB for every family (also the answer to ROUTE-REFRESH). */
  private announceAll(p: PeerState, n: Negotiated, local: string): void {
    const s = p.session;
    if (!s) return;
    const attrs = (nextHop: string): PathAttributes => ({
      origin: Origin.IGP,
      asPath: [this.cfg.as],
      asSet: [],
      nextHop,
      med: null,
      localPref: null,
      other: [],
    });
    const msgs: Buffer[] = [];
    for (const f of n.families) {
      const mine = this.cfg.announce.filter((x) => (f.afi === AFI_IPV6) === x.includes(':'));
      const nh = f.afi === AFI_IPV4 ? (this.cfg.nextHop4 ?? p.cfg.localAddress ?? local) : (this.cfg.nextHop6 ?? '');
      if (mine.length && nh) {
        for (let i = 0; i < mine.length; i += PREFIXES_PER_UPDATE) {
          msgs.push(encodeUpdate({ announced: mine.slice(i, i + PREFIXES_PER_UPDATE), attrs: attrs(nh), as4: n.as4 }));
        }
        for (const x of mine) p.adjRibOut.add(x);
        this.emit('adj-out', p.cfg.address, mine, attrs(nh));
      }
      msgs.push(encodeEndOfRib(f));
    }
    s.send(msgs);
  }

  private onUpdate(p: PeerState, u: UpdateMessage): void {
    const changed = new Set<string>();
    for (const w of u.withdrawn) {
      if (!p.adjRibIn.delete(w)) continue;
      changed.add(w);
      this.emit('adj-in', p.cfg.address, w, null);
    }
    if (u.attributes) {
      for (const a of u.announced) {
        const r: Route = { peer: p.cfg.address, attrs: u.attributes, stale: false };
        p.adjRibIn.set(a, r);
        changed.add(a);
        this.emit('adj-in', p.cfg.address, a, r);
      }
    }
    if (u.endOfRib) {
      // The peer re-sent everything of this family: what is still stale is gone (RFC 4724 4.2).
      for (const [prefix, r] of p.adjRibIn) {
        if (r.stale && (u.endOfRib.afi === AFI_IPV6) === prefix.includes(':')) {
          p.adjRibIn.delete(prefix);
          changed.add(prefix);
          this.emit('adj-in', p.cfg.address, prefix, null);
        }
      }
      this.emit('end-of-rib', p.cfg.address, u.endOfRib);
    }
    this.select(changed);
  }

  private sessionDown(p: PeerState, s: BgpSession): void {
    // A speaker that let go (released or stopped) keeps nothing to do: another instance, or none,
    // carries the routes on.
    if (this.stopped) return;
    const gr = (() => {
      try {
        return s.negotiated().peerGracefulRestart;
      } catch {
        return null;
      }
    })();
    p.adjRibOut.clear();
    if (gr && gr.restartTime > 0 && p.adjRibIn.size) {
      for (const r of p.adjRibIn.values()) r.stale = true;
      if (p.staleTimer) clearTimeout(p.staleTimer);
      p.staleTimer = setTimeout(() => {
        p.staleTimer = null;
        const changed = new Set<string>();
        for (const [prefix, r] of p.adjRibIn) {
          if (!r.stale) continue;
          p.adjRibIn.delete(prefix);
          changed.add(prefix);
          this.emit('adj-in', p.cfg.address, prefix, null);
        }
        this.select(changed);
      }, gr.restartTime * 1000);
      return;
    }
    const changed = new Set(p.adjRibIn.keys());
    p.adjRibIn.clear();
    for (const prefix of changed) this.emit('adj-in', p.cfg.address, prefix, null);
    this.select(changed);
  }

  /** Best path for each changed prefix; emits 'best' (prefix, route or null) when it changed. */
  private select(prefixes: Set<string>): void {
    for (const prefix of prefixes) {
      let best: Route | null = null;
      for (const p of this.peers.values()) {
        const r = p.adjRibIn.get(prefix);
        if (r && (!best || better(r, best, this.peers))) best = r;
      }
      const cur = this.locRib.get(prefix) ?? null;
      if (best === cur) continue;
      if (best) this.locRib.set(prefix, best);
      else this.locRib.delete(prefix);
      this.emit('best', prefix, best);
    }
  }

  /** Session resets and Adj-RIB-In sizes per peer, for status lines. */
  summary(): { peer: string; state: string; since: number; received: number; announced: number; resets: number }[] {
    return [...this.peers.values()].map((p) => ({
      peer: p.cfg.address,
      state: p.session?.state ?? 'Idle',
      since: p.session?.establishedAt ?? 0,
      received: p.adjRibIn.size,
      announced: p.adjRibOut.size,
      resets: p.resets,
    }));
  }
}

/**
 * RFC 4271 9.1.2.2, in order: highest LOCAL_PREF (100 when absent), shortest AS_PATH (an AS_SET
 * counts one), lowest ORIGIN, lowest MED among routes from the same neighbouring AS, then the
 * lowest BGP identifier of the peer, then the lowest peer address. (Every route here is eBGP.)
 */
export function better(a: Route, b: Route, peers: Map<string, PeerState>): boolean {
  const lp = (r: Route) => r.attrs.localPref ?? 100;
  if (lp(a) !== lp(b)) return lp(a) > lp(b);
  const len = (r: Route) => r.attrs.asPath.length + (r.attrs.asSet.length ? 1 : 0);
  if (len(a) !== len(b)) return len(a) < len(b);
  if (a.attrs.origin !== b.attrs.origin) return a.attrs.origin < b.attrs.origin;
  if (a.attrs.asPath[0] === b.attrs.asPath[0] && (a.attrs.med ?? 0) !== (b.attrs.med ?? 0)) return (a.attrs.med ?? 0) < (b.attrs.med ?? 0);
  if (a.stale !== b.stale) return !a.stale;
  const id = (r: Route) => {
    try {
      return peers.get(r.peer)?.session?.negotiated().peerIdentifier ?? r.peer;
    } catch {
      return r.peer;
    }
  };
  const ida = id(a);
  const idb = id(b);
  if (ida !== idb) return ipCompare(ida, idb) < 0;
  return ipCompare(a.peer, b.peer) < 0;
}

function ipCompare(x: string, y: string): number {
  const nx = x.split('.').map(Number);
  const ny = y.split('.').map(Number);
  for (let i = 0; i < 4; i++) if (nx[i] !== ny[i]) return (nx[i] ?? 0) - (ny[i] ?? 0);
  return x < y ? -1 : x > y ? 1 : 0;
}
