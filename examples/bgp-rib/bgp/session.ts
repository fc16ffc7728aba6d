/**
 * One BGP session (RFC 4271 section 8, the finite state machine) over one TCP connection:
 * Idle -> Connect -> OpenSent -> OpenConfirm -> Established, with the hold and keepalive timers.
 * The speaker (speaker.ts) owns the RIBs; a session only speaks the protocol and reports:
 *
 *   'established'  the OPENs agreed (negotiated() says on what)
 *   'update'       an UPDATE (or End-of-RIB) from the peer, decoded
 *   'refresh'      the peer asked for our routes again (ROUTE-REFRESH)
 *   'down'         the session ended: why, and the NOTIFICATION sent or received, if any
 *
 * Anything malformed from the peer ends the session with the NOTIFICATION RFC 4271 section 6
 * names (BgpError carries it); a message in the wrong state with an FSM error (RFC 6608).
 *
 * Nonstop routing: capture() stops an Established session where it stands and captures its TCP
 * connection with TCP repair (agent/sdk/tcp-repair.ts), with the bytes read but not yet parsed
 * put back in front of the receive queue; another instance adopt()s it and carries on with the
 * exact byte stream. The connection is read through `onread` (bgpSocketReader), so pause() stops
 * reading from the kernel at once: no byte is read after the capture.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import os from 'node:os';
import {
  AFI_IPV4,
  AFI_IPV6,
  AfiSafi,
  BgpError,
  Capabilities,
  Err,
  MsgType,
  OpenMessage,
  SAFI_UNICAST,
  UpdateMessage,
  decodeMessage,
  encodeKeepalive,
  encodeNotification,
  encodeOpen,
  messageLength,
} from './messages';
import { TcpConnectionState, captureTcp, resumeTcp, socketFd, tcpStateToJson } from '../../../agent/sdk/tcp-repair';

export type SessionState = 'Idle' | 'Connect' | 'OpenSent' | 'OpenConfirm' | 'Established';

export interface SessionConfig {
  localAs: number;
  routerId: string;
  peerAs: number;
  peerAddress: string;
  /** Hold time we offer, s (RFC 4271 suggests 90); the lower of both sides is used. */
  holdTime: number;
  /** Graceful-restart capability: restart time we advertise, s; 0 = do not advertise. */
  gracefulRestartTime: number;
}

export interface Negotiated {
  holdTime: number;
  keepaliveS: number;
  as4: boolean;
  families: AfiSafi[];
  routeRefresh: boolean;
  peerIdentifier: string;
  peerGracefulRestart: Capabilities['gracefulRestart'];
}

/** What another instance needs to carry an Established session on (JSON in the bgp-handover table). */
export interface SavedSession {
  /** tcpStateToJson of the captured connection. */
  tcp: Record<string, unknown>;
  nego: Negotiated;
  establishedAt: number;
  /** When the last message came from the peer, epoch ms: our hold timer counts from it. */
  lastRxAt: number;
}

/**
 * Reading a BGP connection through `onread` (a buffer of our own, copied out per read): with it,
 * net.Socket.pause() stops reading from the kernel at once, which a capture needs; with 'data'
 * events Node would go on reading into its stream buffer. `to` names the session fed.
 */
export function bgpSocketReader(): { onread: net.OnReadOpts; to: (s: BgpSession) => void } {
  let target: BgpSession | null = null;
  return {
    onread: {
      buffer: Buffer.allocUnsafe(64 * 1024),
      callback: (n: number, buf: Uint8Array) => {
        target?.receive(Buffer.from(buf.subarray(0, n)));
        return true;
      },
    },
    to: (s) => (target = s),
  };
}

/**
 * Resolves once `address` is usable on an interface that is up with carrier (libuv lists only
 * those), or after `maxMs`: a restored session's first KEEPALIVE waits for the link the agent
 * raises just after the promotion, instead of being lost and retransmitted a second later.
 */
async function addressUsable(address: string, maxMs: number): Promise<void> {
  const deadline = Date.now() + maxMs;
  while (Date.now() < deadline) {
    if (Object.values(os.networkInterfaces()).some((l) => l?.some((a) => a.address === address))) return;
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Hold time while waiting for the peer's OPEN (RFC 4271 8.2.2 suggests 4 minutes), s. */
const OPEN_HOLD_S = 240;

export const FAMILIES: AfiSafi[] = [
  { afi: AFI_IPV4, safi: SAFI_UNICAST },
  { afi: AFI_IPV6, safi: SAFI_UNICAST },
];

export class BgpSession extends EventEmitter {
  state: SessionState = 'Idle';
  private sock: net.Socket | null = null;
  private buf: Buffer = Buffer.alloc(0);
  private holdTimer: NodeJS.Timeout | null = null;
  private keepaliveTimer: NodeJS.Timeout | null = null;
  private nego: Negotiated | null = null;
  /** When the session became Established (epoch ms), 0 otherwise. */
  establishedAt = 0;
  /** When the last message came from the peer, epoch ms. */
  lastRxAt = 0;
  /** Captured for another instance: neither reads nor writes, timers stopped (see capture). */
  private captured = false;
  /** Bytes come through a bgpSocketReader (see attach): only then can the session be captured. */
  private routed = false;

  constructor(readonly cfg: SessionConfig) {
    super();
  }

  negotiated(): Negotiated {
    if (!this.nego) throw new Error('the session is not established');
    return this.nego;
  }

  /**
   * Runs the session on an open TCP connection (ours or the peer's) and sends our OPEN.
   * `routed`: the socket's bytes already come to receive() through a bgpSocketReader; otherwise
   * they are taken from 'data' events (an accepted socket, which cannot have a reader), and such a
   * session cannot be captured.
   */
  attach(sock: net.Socket, routed = false): void {
    if (this.sock) throw new Error('session already has a connection');
    this.sock = sock;
    this.routed = routed;
    if (!routed) sock.on('data', (d: Buffer) => this.receive(d));
    this.watch(sock);
    this.state = 'OpenSent';
    this.armHold(OPEN_HOLD_S);
    sock.write(
      encodeOpen({
        as: this.cfg.localAs,
        holdTime: this.cfg.holdTime,
        identifier: this.cfg.routerId,
        capabilities: {
          multiprotocol: FAMILIES,
          routeRefresh: true,
          gracefulRestart: this.cfg.gracefulRestartTime
            ? { restarting: false, restartTime: this.cfg.gracefulRestartTime, families: FAMILIES.map((f) => ({ ...f, forwardingPreserved: true })) }
            : null,
        },
      }),
    );
  }

  /** The socket's bytes come in through receive(): a bgpSocketReader routed to this session. */
  private watch(sock: net.Socket): void {
    sock.setNoDelay(true);
    sock.on('error', (e) => this.down(`connection error: ${e.message}`));
    sock.on('close', () => this.down('the peer closed the connection'));
  }

  /**
   * Carries on an Established session another instance captured: `sock` is the restored
   * connection (created paused), `unsent` what the old instance had queued but never transmitted.
   * Our hold timer goes on from the last message the old instance received; the peer's is served
   * by a KEEPALIVE as soon as our address is usable (the agent raises this VM's link right after
   * the promotion). Reading starts with startReading(), once the caller restored its RIBs.
   */
  adopt(sock: net.Socket, saved: SavedSession, unsent: Buffer): void {
    if (this.sock) throw new Error('session already has a connection');
    this.sock = sock;
    this.routed = true;
    this.watch(sock);
    this.nego = saved.nego;
    this.state = 'Established';
    this.establishedAt = saved.establishedAt;
    this.lastRxAt = saved.lastRxAt;
    if (unsent.length) sock.write(unsent);
    this.resumeTimers();
    void addressUsable(sock.localAddress ?? '', 3000).then(() => this.keepaliveNow());
  }

  startReading(): void {
    this.sock?.resume();
  }

  /**
   * Stops this Established session where it stands and captures its connection (TCP repair) for
   * another instance. Returns the state to hand over, or why it cannot be captured, in which case
   * the session carries on untouched. While captured the session neither reads nor writes and its
   * timers are stopped; resumeCaptured() undoes that, release() drops it without a word.
   */
  capture(): { saved: SavedSession; tcp: TcpConnectionState } | { why: string } {
    const sock = this.sock;
    if (this.state !== 'Established' || !sock || !this.nego) return { why: `the session is ${this.state}` };
    if (!this.routed) return { why: 'the connection is read through data events (an accepted connection)' };
    const fd = socketFd(sock);
    if (fd === null) return { why: 'the connection has no file descriptor' };
    sock.pause();
    if (sock.writableLength > 0) {
      sock.resume();
      return { why: `${sock.writableLength} bytes of ours were not yet handed to the kernel` };
    }
    try {
      const tcp = captureTcp(fd, sock, this.buf);
      this.captured = true;
      this.stopTimers();
      return { tcp, saved: { tcp: tcpStateToJson(tcp), nego: this.nego, establishedAt: this.establishedAt, lastRxAt: this.lastRxAt } };
    } catch (e) {
      sock.resume();
      return { why: (e as Error).message };
    }
  }

  /** The capture was called off (the switchover failed): carry on as before. */
  resumeCaptured(): void {
    const sock = this.sock;
    if (!this.captured || !sock) return;
    const fd = socketFd(sock);
    if (fd !== null) resumeTcp(fd);
    this.captured = false;
    this.resumeTimers();
    this.keepaliveNow();
    sock.resume();
  }

  /** Sends encoded messages (UPDATEs); only while Established. */
  send(msgs: Buffer[]): void {
    if (this.state !== 'Established' || !this.sock || this.captured) return;
    for (const m of msgs) this.sock.write(m);
  }

  /**
   * Lets go of the connection without a word to the peer (no NOTIFICATION): the instance is
   * handing the session over (a switchover). The peer sees the connection end as a restart.
   */
  release(reason: string): void {
    this.down(reason);
  }

  /** Ends the session with a NOTIFICATION (Cease, administrative shutdown by default). */
  stop(reason: string, code: number = Err.CEASE, subcode: number = Err.CEASE_ADMIN_SHUTDOWN): void {
    this.notifyAndClose(new BgpError(code, subcode, reason));
  }

  /** Bytes from the connection (see bgpSocketReader). */
  receive(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    let off = 0;
    try {
      for (;;) {
        if (!this.sock) return;
        const len = messageLength(this.buf, off);
        if (len === 0) break;
        const msg = this.buf.subarray(off, off + len);
        off += len;
        this.onMessage(msg);
      }
    } catch (e) {
      if (e instanceof BgpError) return this.notifyAndClose(e);
      throw e;
    }
    this.buf = off === this.buf.length ? Buffer.alloc(0) : Buffer.from(this.buf.subarray(off));
  }

  private onMessage(raw: Buffer): void {
    const m = decodeMessage(raw, this.nego?.as4 ?? true);
    this.lastRxAt = Date.now();
    if (m.type === MsgType.NOTIFICATION) {
      this.close(`NOTIFICATION received: code ${m.code} subcode ${m.subcode}`, { code: m.code, subcode: m.subcode, sent: false });
      return;
    }
    switch (this.state) {
      case 'OpenSent':
        if (m.type !== MsgType.OPEN) throw new BgpError(Err.FSM, 1, `message type ${m.type} in OpenSent`);
        this.onOpen(m);
        return;
      case 'OpenConfirm':
        if (m.type !== MsgType.KEEPALIVE) throw new BgpError(Err.FSM, 2, `message type ${m.type} in OpenConfirm`);
        this.state = 'Established';
        this.establishedAt = Date.now();
        this.armHold(this.nego!.holdTime);
        this.emit('established', this.nego);
        return;
      case 'Established':
        if (m.type === MsgType.OPEN) throw new BgpError(Err.FSM, 3, 'OPEN in Established');
        this.armHold(this.nego!.holdTime);
        if (m.type === MsgType.UPDATE) this.emit('update', m as UpdateMessage);
        else if (m.type === MsgType.ROUTE_REFRESH) this.emit('refresh', { afi: m.afi, safi: m.safi });
        return;
      default:
        return;
    }
  }

  private onOpen(o: OpenMessage): void {
    if (o.as !== this.cfg.peerAs) {
      const data = Buffer.alloc(2);
      data.writeUInt16BE(o.as > 0xffff ? 23456 : o.as);
      throw new BgpError(Err.OPEN, Err.OPEN_BAD_PEER_AS, `peer AS ${o.as}, configured ${this.cfg.peerAs}`, data);
    }
    if (o.identifier === this.cfg.routerId && this.cfg.peerAs === this.cfg.localAs) {
      throw new BgpError(Err.OPEN, Err.OPEN_BAD_IDENTIFIER, `peer uses our identifier ${o.identifier}`);
    }
    const holdTime = Math.min(o.holdTime, this.cfg.holdTime);
    const peerFamilies = o.capabilities.multiprotocol.length ? o.capabilities.multiprotocol : [{ afi: AFI_IPV4, safi: SAFI_UNICAST }];
    this.nego = {
      holdTime,
      keepaliveS: Math.floor(holdTime / 3),
      as4: o.capabilities.as4 !== null,
      families: FAMILIES.filter((f) => peerFamilies.some((p) => p.afi === f.afi && p.safi === f.safi)),
      routeRefresh: o.capabilities.routeRefresh,
      peerIdentifier: o.identifier,
      peerGracefulRestart: o.capabilities.gracefulRestart,
    };
    this.state = 'OpenConfirm';
    this.sock!.write(encodeKeepalive());
    this.armHold(holdTime);
    if (holdTime > 0) this.startKeepalives();
  }

  /**
   * Timers of an Established session that was stopped (captured) or moved: the hold timer counts
   * from the last message received (at least 1 s left), keepalives start again.
   */
  private resumeTimers(): void {
    const hold = this.nego!.holdTime;
    this.armHoldMs(Math.max(1000, hold * 1000 - (Date.now() - this.lastRxAt)), hold);
    if (hold > 0) this.startKeepalives();
  }

  private startKeepalives(): void {
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    this.keepaliveTimer = setInterval(() => this.keepaliveNow(), Math.max(1, this.nego!.keepaliveS) * 1000);
  }

  private keepaliveNow(): void {
    if (this.sock && !this.captured) this.sock.write(encodeKeepalive());
  }

  private armHold(seconds: number): void {
    this.armHoldMs(seconds * 1000, seconds);
  }

  /** Hold timer firing in `ms`; `seconds` is the negotiated hold time (0: none). */
  private armHoldMs(ms: number, seconds: number): void {
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = null;
    if (seconds > 0) {
      this.holdTimer = setTimeout(() => this.notifyAndClose(new BgpError(Err.HOLD_TIMER_EXPIRED, 0, `no message for ${seconds} s`)), ms);
    }
  }

  private stopTimers(): void {
    if (this.holdTimer) clearTimeout(this.holdTimer);
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    this.holdTimer = this.keepaliveTimer = null;
  }

  private notifyAndClose(e: BgpError): void {
    if (!this.sock) return;
    if (this.captured) return this.down(`${e.message} (while captured: no NOTIFICATION)`);
    this.sock.write(encodeNotification(e.code, e.subcode, e.data));
    this.close(`NOTIFICATION sent: ${e.message}`, { code: e.code, subcode: e.subcode, sent: true });
  }

  private close(reason: string, notification: { code: number; subcode: number; sent: boolean } | null): void {
    const s = this.sock;
    if (!s) return;
    this.sock = null;
    s.end();
    setTimeout(() => s.destroy(), 1000).unref();
    this.finish(reason, notification);
  }

  private down(reason: string): void {
    if (!this.sock) return;
    const s = this.sock;
    this.sock = null;
    s.destroy();
    this.finish(reason, null);
  }

  private finish(reason: string, notification: { code: number; subcode: number; sent: boolean } | null): void {
    this.stopTimers();
    this.captured = false;
    const was = this.state;
    this.state = 'Idle';
    this.establishedAt = 0;
    this.emit('down', { reason, notification, was });
  }
}
