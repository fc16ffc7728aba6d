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
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
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

  constructor(readonly cfg: SessionConfig) {
    super();
  }

  negotiated(): Negotiated {
    if (!this.nego) throw new Error('the session is not established');
    return this.nego;
  }

  /** Runs the session on an open TCP connection (ours or the peer's) and sends our OPEN. */
  attach(sock: net.Socket): void {
    if (this.sock) throw new Error('session already has a connection');
    this.sock = sock;
    sock.setNoDelay(true);
    sock.on('data', (d: Buffer) => this.onData(d));
    sock.on('error', (e) => this.down(`connection error: ${e.message}`));
    sock.on('close', () => this.down('the peer closed the connection'));
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

  /** Sends encoded messages (UPDATEs); only while Established. */
  send(msgs: Buffer[]): void {
    if (this.state !== 'Established' || !this.sock) return;
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

  private onData(d: Buffer): void {
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
    if (holdTime > 0) {
      this.keepaliveTimer = setInterval(() => this.sock?.write(encodeKeepalive()), Math.max(1, this.nego.keepaliveS) * 1000);
    }
  }

  private armHold(seconds: number): void {
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = null;
    if (seconds > 0) {
      this.holdTimer = setTimeout(() => this.notifyAndClose(new BgpError(Err.HOLD_TIMER_EXPIRED, 0, `no message for ${seconds} s`)), seconds * 1000);
    }
  }

  private notifyAndClose(e: BgpError): void {
    if (!this.sock) return;
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
    if (this.holdTimer) clearTimeout(this.holdTimer);
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    this.holdTimer = this.keepaliveTimer = null;
    const was = this.state;
    this.state = 'Idle';
    this.establishedAt = 0;
    this.emit('down', { reason, notification, was });
  }
}
