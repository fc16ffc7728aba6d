/**
 * Frame-channel transport of hitless.v1.Checkpoint (wire: frames.ts; contract: the proto's
 * "Frame channels"). OpenChannel issues a one-time token on the bulk socket; the connection that
 * redeems it carries either a write stream (write-stream.ts, exactly as gRPC WriteStream) or a
 * subscription with its acks (as Subscribe + Ack). Like checkpoint.grpc.ts it only parses and
 * maps: every decision is the service's.
 *
 * Every channel the agent ends, it ends with a STATUS frame (code 0 when nothing failed), so
 * that a client tells "done" from "the agent went away" (a bare close).
 */
import * as grpc from '@grpc/grpc-js';
import type { ServiceDefinition } from '@grpc/proto-loader';
import net from 'node:net';
import { HitlessError, invalidArgument } from '../common/errors';
import { Logger } from '../common/logger';
import { loadProtos } from '../grpc/proto';
import { toServiceError } from '../grpc/status';
import { BulkServer } from './bulk-server';
import { CheckpointService } from './checkpoint.service';
import { FrameError, FrameReader, FrameType, batchHeader, decodeBatch, decodeSeq, encodeEvent, encodeSeq, encodeStatus, writeFrame } from './frames';
import { ChannelRequest, ChannelTicket, SubscribeEvent, SubscribeRequest } from './messages';
import { SubscriberStream, Subscription } from './subscription';
import { WriteStream } from './write-stream';

/**
 * Records of a write channel's batches not yet acknowledged past which the agent stops reading
 * from it (the socket's own flow control then holds the writer), and half of it, where it reads
 * again. gRPC's 16 MiB HTTP/2 window plays this part on WriteStream.
 */
const WRITE_WINDOW_BYTES = 32 * 1024 * 1024;
/** Body of an ACK frame: sequence, name length, a table name (at most 64 KiB). */
const ACK_FRAME_MAX = 10 + 0xffff;
/** After its last frame, a client has this long to close its side before the agent drops it. */
const LINGER_MS = 5_000;

export class FrameChannels {
  private readonly encodeEvent: (ev: SubscribeEvent) => Buffer;
  /**
   * Told of every channel the agent ends, as the gRPC server tells of every finished call (the
   * metrics count both): `method` is /hitless.v1.Checkpoint/OpenChannel/write or .../subscribe.
   */
  onEnd: ((method: string, code: string) => void) | null = null;

  constructor(
    private readonly svc: CheckpointService,
    private readonly bulk: BulkServer,
    private readonly log: Logger,
  ) {
    const methods = loadProtos().def['hitless.v1.Checkpoint'] as ServiceDefinition;
    this.encodeEvent = methods.Subscribe.responseSerialize as (ev: SubscribeEvent) => Buffer;
  }

  /** OpenChannel: checks that the session may act here, then issues the channel's token. */
  open(req: ChannelRequest, peerVm: string | null): ChannelTicket {
    if (!this.svc.opts.frameChannels) {
      throw new HitlessError(
        grpc.status.UNIMPLEMENTED,
        'frame channels are turned off on this agent (--no-frame-channels): send batches on WriteStream, follow with Subscribe and Ack',
      );
    }
    let token: Buffer;
    if (req.write) {
      const sessionId = req.write.sessionId;
      this.svc.checkSession(sessionId, peerVm);
      token = this.bulk.issueChannel((sock, early) => this.serveWrite(sock, early, sessionId, peerVm));
    } else if (req.subscribe) {
      const sub = req.subscribe;
      this.svc.checkSession(sub.sessionId, peerVm);
      token = this.bulk.issueChannel((sock, early) => this.serveSubscribe(sock, early, sub, peerVm));
    } else {
      throw invalidArgument('ChannelRequest names no kind of channel: set write (an active sending batches) or subscribe (a standby following)');
    }
    return { unixPath: this.bulk.unixPath, tcpAddress: this.bulk.tcpAddress, token };
  }

  private serveWrite(sock: net.Socket, early: Buffer, sessionId: string, peerVm: string | null): void {
    sock.setNoDelay(true);
    // Record bytes of the batches received and not yet acknowledged, in request order (acks are).
    const sizes: number[] = [];
    let head = 0;
    let unacked = 0;
    let paused = false;
    const stream = new WriteStream(this.svc, peerVm, {
      ack: (a) => {
        unacked -= sizes[head++];
        if (head > 1024 && head * 2 > sizes.length) {
          sizes.splice(0, head);
          head = 0;
        }
        if (paused && unacked < WRITE_WINDOW_BYTES / 2) {
          paused = false;
          sock.resume();
        }
        sock.write(encodeSeq(FrameType.WRITE_ACK, a));
      },
      fail: (err) => this.endChannel(sock, err, 'WriteStream', sessionId),
      end: () => this.endChannel(sock, null, 'WriteStream', sessionId),
    });
    const reader = new FrameReader(this.svc.opts.maxBatchBytes + 0x10000, (type, body) => {
      if (type !== FrameType.WRITE) throw new FrameError(`frame of type ${type} on a write channel, which takes only WRITE (1) frames`);
      const b = decodeBatch(body);
      sizes.push(b.records.length);
      unacked += b.records.length;
      stream.request({ sessionId, table: b.table, seq: b.seq, records: b.records, count: b.count });
      if (!paused && unacked >= WRITE_WINDOW_BYTES) {
        paused = true;
        sock.pause();
      }
    });
    const onData = (d: Buffer) => {
      try {
        reader.push(d);
      } catch (e) {
        if (!(e instanceof FrameError)) throw e;
        sock.off('data', onData);
        stream.refuse(invalidArgument(`malformed frame on the write channel: ${e.message}; batches before it stay applied, open a new channel`));
      }
    };
    sock.on('data', onData);
    sock.on('end', () => stream.end());
    sock.on('close', () => stream.broke());
    if (early.length) onData(early);
  }

  private serveSubscribe(sock: net.Socket, early: Buffer, req: SubscribeRequest, peerVm: string | null): void {
    sock.setNoDelay(true);
    let ended = false;
    const stream: SubscriberStream = {
      write: (ev) => {
        if (ended) return true;
        if (ev.change) return writeFrame(sock, [batchHeader(FrameType.CHANGE, ev.change), ev.change.records]);
        return sock.write(encodeEvent(this.encodeEvent(ev)));
      },
      onDrain: (cb) => sock.on('drain', cb),
      end: () => {
        ended = true;
        this.endChannel(sock, null, 'Subscribe', req.sessionId);
      },
      fail: (err) => {
        ended = true;
        this.endChannel(sock, err, 'Subscribe', req.sessionId);
      },
    };
    let sub: Subscription;
    try {
      sub = this.svc.subscribe(req, stream, peerVm);
    } catch (e) {
      this.endChannel(sock, e, 'Subscribe', req.sessionId);
      return;
    }
    const reader = new FrameReader(ACK_FRAME_MAX, (type, body) => {
      if (type !== FrameType.ACK) throw new FrameError(`frame of type ${type} on a subscribe channel, which takes only ACK (5) frames`);
      const a = decodeSeq(body);
      this.svc.ack({ sessionId: req.sessionId, table: a.table, seq: a.seq }, peerVm);
    });
    const onData = (d: Buffer) => {
      try {
        reader.push(d);
      } catch (e) {
        sock.off('data', onData);
        // A refused ack ends the channel, subscription and all: the subscriber's idea of what it
        // holds is wrong, and it starts over by subscribing again.
        sub.fail(e instanceof FrameError ? invalidArgument(`malformed frame on the subscribe channel: ${e.message}; subscribe again`) : toHitless(e, this.log));
      }
    };
    sock.on('data', onData);
    // The client went away, or shut its side down: the subscription ends, as a cancelled Subscribe.
    sock.on('end', () => {
      sub.cancelled();
      if (!ended) {
        ended = true;
        this.endChannel(sock, null, 'Subscribe', req.sessionId);
      }
    });
    sock.on('close', () => sub.cancelled());
    if (early.length) onData(early);
  }

  /**
   * The last frame: STATUS with the error's code and message, or code 0 (OK). A failure is logged
   * as the gRPC server logs a failed call, named by the stream the channel stands for.
   */
  private endChannel(sock: net.Socket, err: unknown, method: 'WriteStream' | 'Subscribe', session: string): void {
    if (sock.destroyed || sock.writableEnded) return;
    const st = err === null ? { code: grpc.status.OK, details: '' } : toServiceError(err, this.log, method);
    const codeName = grpc.status[st.code ?? grpc.status.UNKNOWN] ?? String(st.code);
    if (st.code) this.log.info({ channel: method, session, code: codeName, details: st.details }, 'frame channel failed');
    this.onEnd?.(`/hitless.v1.Checkpoint/OpenChannel/${method === 'WriteStream' ? 'write' : 'subscribe'}`, codeName);
    sock.end(encodeStatus(st.code ?? grpc.status.UNKNOWN, st.details ?? ''));
    setTimeout(() => sock.destroy(), LINGER_MS).unref();
  }
}

/** An error thrown by the service, as the HitlessError the subscription's fail() takes. */
function toHitless(e: unknown, log: Logger): HitlessError {
  if (e instanceof HitlessError) return e;
  const st = toServiceError(e, log, 'Ack');
  return new HitlessError(st.code ?? grpc.status.UNKNOWN, st.details ?? String(e));
}
