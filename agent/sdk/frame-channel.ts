/**
 * The SDK's side of frame channels (wire: agent/checkpoint/frames.ts; contract: the proto's
 * "Frame channels"). A write channel and a subscribe channel that behave, towards
 * CheckpointClient, like the gRPC calls they replace (WriteStream; Subscribe with its Ack
 * stream): the same 'data', 'error' (with a gRPC status code and details) and 'end' events, the
 * same write/end/cancel/pause/resume. So the client's logic (outbox, resend, promotion) is one
 * piece whichever carries its batches.
 *
 * When the agent does not know OpenChannel (UNIMPLEMENTED: an agent from before frame
 * channels), a channel becomes the gRPC call it stands for, replaying what was written to it,
 * and the opener remembers it so later calls go to gRPC straight away.
 */
import * as grpc from '@grpc/grpc-js';
import type { ServiceDefinition } from '@grpc/proto-loader';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { FrameError, FrameReader, FrameType, batchHeader, decodeBatch, decodeSeq, decodeStatus, encodeSeq, writeFrame } from '../checkpoint/frames';
import { AckRequest, ChannelRequest, ChannelTicket, SubscribeEvent, SubscribeRequest, WriteAck, WriteRequest } from '../checkpoint/messages';
import { loadCheckpointProto } from '../grpc/proto';

/** What the client needs of a write call, gRPC or frames. */
export interface WriteCall extends EventEmitter {
  write(req: WriteRequest): unknown;
  end(): void;
  cancel(): void;
}

/** What the client needs of a subscription call, gRPC or frames. */
export interface SubscribeCall extends EventEmitter {
  cancel(): void;
  pause(): unknown;
  resume(): unknown;
  isPaused(): boolean;
}

/** Where acknowledgements go: the gRPC Ack stream, or the subscribe channel itself. */
export interface AckSink {
  write(a: AckRequest): unknown;
  end(): void;
}

/** Largest frame body the agent sends: a change batch of up to 8 MiB, its header and table name. */
const MAX_FRAME_BODY = 8 * 1024 * 1024 + 0x10000;

export interface ChannelOpenerOptions {
  /** The agent's gRPC address as the client was given it ('unix:/path', '/path' or 'host:port'). */
  address: string;
  /** host:port of the agent's bulk socket when it differs from what the agent advertises (guests). */
  bulkAddress?: string;
  /** false: use the gRPC streams only. */
  frames: boolean;
}

/** Opens frame channels, or says to use gRPC (disabled, or an agent without OpenChannel). */
export class ChannelOpener {
  private supported: boolean;
  private readonly decodeEvent: (b: Buffer) => SubscribeEvent;

  constructor(
    private readonly stub: Record<string, (...args: unknown[]) => unknown>,
    private readonly opts: ChannelOpenerOptions,
  ) {
    this.supported = opts.frames;
    const methods = loadCheckpointProto().def['hitless.v1.Checkpoint'] as ServiceDefinition;
    this.decodeEvent = methods.Subscribe.responseDeserialize as (b: Buffer) => SubscribeEvent;
  }

  /** Whether new calls go on frame channels (until an agent answered UNIMPLEMENTED). */
  get frames(): boolean {
    return this.supported;
  }

  /** There is no route to the agent's bulk socket: later calls use gRPC. */
  noRoute(): void {
    this.supported = false;
  }

  open(req: ChannelRequest, cb: (err: grpc.ServiceError | null, t?: ChannelTicket) => void): void {
    (this.stub.OpenChannel as (r: ChannelRequest, cb: (err: grpc.ServiceError | null, t?: ChannelTicket) => void) => void)(req, (err, t) => {
      if (err?.code === grpc.status.UNIMPLEMENTED) this.supported = false;
      cb(err, t);
    });
  }

  /** A connection to the agent's bulk socket: see bulkSocket(). */
  connect(unixPath: string, tcpAddress: string, onread?: net.OnReadOpts): net.Socket {
    return bulkSocket(this.opts.address, this.opts.bulkAddress, unixPath, tcpAddress, onread);
  }

  decode(body: Buffer): SubscribeEvent {
    return this.decodeEvent(body);
  }
}

/**
 * A connection to the agent's bulk socket (snapshots and frame channels). An explicit bulk
 * address wins (guests); otherwise the same kind of transport as the gRPC channel: a unix-socket
 * client uses the unix socket, a TCP client the TCP one. Throws when there is none to use.
 * `onread`: the socket reads into the caller's buffers (Node's net onread; no 'data' events).
 */
export function bulkSocket(clientAddress: string, bulkAddress: string | undefined, unixPath: string, tcpAddress: string, onread?: net.OnReadOpts): net.Socket {
  const viaUnix = !bulkAddress && unixPath !== '' && (clientAddress.startsWith('unix:') || clientAddress.startsWith('/'));
  const tcp = bulkAddress ?? tcpAddress;
  if (viaUnix) return net.connect({ path: unixPath, onread });
  if (!tcp) throw new Error('the agent offers its bulk socket only on a unix socket; connect over the unix socket or set bulkAddress');
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(tcp);
  if (!m) throw new Error(`bad bulk address '${tcp}'`);
  return net.connect({ host: m[1], port: Number(m[2]), onread });
}

function statusError(code: number, details: string): grpc.ServiceError {
  return Object.assign(new Error(`${code} ${grpc.status[code] ?? ''}: ${details}`), { code, details, metadata: new grpc.Metadata() });
}

/**
 * One frame channel: opens, connects, sends the token and what was sent meanwhile, and turns the
 * agent's frames into events. Exactly one of 'end' (STATUS 0) or 'error' is emitted.
 * `Out` is what the client sends on it (batches, or acks).
 */
abstract class FrameCall<Out> extends EventEmitter {
  private sock: net.Socket | null = null;
  /** Sent before OpenChannel answered: then framed, or handed to the gRPC call. */
  private unsent: Out[] = [];
  private opened = false;
  private ending = false;
  private finished = false;
  private paused = false;
  /** The gRPC call this one became (an agent without OpenChannel). */
  protected grpcCall: (WriteCall & SubscribeCall) | null = null;

  constructor(
    protected readonly opener: ChannelOpener,
    req: ChannelRequest,
    private readonly fallback: () => WriteCall | SubscribeCall,
  ) {
    super();
    opener.open(req, (err, ticket) => {
      this.opened = true;
      if (this.finished) return; // cancelled meanwhile
      if (err?.code === grpc.status.UNIMPLEMENTED) return this.becomeGrpc();
      if (err || !ticket) return this.finish(err ?? statusError(grpc.status.INTERNAL, 'OpenChannel answered nothing'));
      let sock: net.Socket;
      try {
        sock = opener.connect(ticket.unixPath, ticket.tcpAddress);
      } catch {
        // No way to the bulk socket from here (a TCP client of an agent that has it on a unix
        // socket only): the gRPC streams need none, and that will not change for this client.
        opener.noRoute();
        return this.becomeGrpc();
      }
      this.sock = sock;
      sock.setNoDelay(true);
      sock.write(ticket.token);
      for (const m of this.unsent.splice(0)) writeFrame(sock, this.encode(m));
      if (this.ending) sock.end();
      if (this.paused) sock.pause();
      const reader = new FrameReader(MAX_FRAME_BODY, (type, body) => this.onFrame(type, body));
      sock.on('data', (d: Buffer) => {
        if (this.finished) return;
        try {
          reader.push(d);
        } catch (e) {
          if (!(e instanceof FrameError)) throw e;
          // Not the agent's refusal (that is a STATUS frame): bytes that are no frames mean the
          // connection is not what it should be, e.g. a guest's relay writing its own error
          // text when it could not reach the agent. The channel is broken, not refused.
          this.finish(statusError(grpc.status.UNAVAILABLE, `the frame channel carried bytes that are not frames (${e.message}); it is dropped`));
        }
      });
      sock.on('error', (e) => this.finish(statusError(grpc.status.UNAVAILABLE, `frame channel to the agent failed: ${e.message}`)));
      sock.on('close', () => this.finish(statusError(grpc.status.UNAVAILABLE, 'the agent closed the frame channel without a status')));
    });
  }

  /** The frame for one message the client sends, whole or as parts (see writeFrame). */
  protected abstract encode(m: Out): Buffer | Buffer[];
  /** The same message through the gRPC call (or its companion stream) after a fallback. */
  protected abstract sendGrpc(m: Out): void;
  /** A frame from the agent; STATUS goes to onStatus. */
  protected abstract onFrame(type: number, body: Buffer): void;

  protected onStatus(body: Buffer): void {
    const st = decodeStatus(body);
    this.finish(st.code === grpc.status.OK ? null : statusError(st.code, st.message));
  }

  protected sendMessage(m: Out): void {
    if (this.grpcCall) return this.sendGrpc(m);
    if (this.finished || this.ending) return;
    if (!this.opened) this.unsent.push(m);
    else if (this.sock) writeFrame(this.sock, this.encode(m));
  }

  end(): void {
    if (this.grpcCall) return void this.grpcCall.end();
    if (this.ending) return;
    this.ending = true;
    this.sock?.end();
  }

  cancel(): void {
    if (this.grpcCall) return this.grpcCall.cancel();
    this.finish(statusError(grpc.status.CANCELLED, 'Cancelled on client'));
  }

  pause(): this {
    this.paused = true;
    if (this.grpcCall) this.grpcCall.pause();
    else this.sock?.pause();
    return this;
  }

  resume(): this {
    this.paused = false;
    if (this.grpcCall) this.grpcCall.resume();
    else this.sock?.resume();
    return this;
  }

  isPaused(): boolean {
    return this.paused;
  }

  /** Emits the channel's one 'end' (err null) or 'error', and lets go of the connection. */
  protected finish(err: grpc.ServiceError | null): void {
    if (this.finished) return;
    this.finished = true;
    this.unsent = [];
    this.sock?.destroy();
    if (err) this.emit('error', err);
    else this.emit('end');
  }

  /** The gRPC call takes over: what was sent goes to it, its events come out of this one. */
  private becomeGrpc(): void {
    const call = this.fallback() as WriteCall & SubscribeCall;
    this.grpcCall = call;
    call.on('data', (m) => this.emit('data', m));
    call.on('error', (e) => this.emit('error', e));
    call.on('end', () => this.emit('end'));
    for (const m of this.unsent.splice(0)) this.sendGrpc(m);
    if (this.paused) call.pause();
    if (this.ending) call.end();
  }
}

/** WriteStream on a frame channel: write(req) sends a WRITE frame; each WRITE_ACK is 'data'. */
export class FrameWriteCall extends FrameCall<WriteRequest> implements WriteCall {
  constructor(opener: ChannelOpener, sessionId: string, fallback: () => WriteCall) {
    super(opener, { write: { sessionId } }, fallback);
  }

  write(req: WriteRequest): boolean {
    this.sendMessage(req);
    return true;
  }

  protected encode(req: WriteRequest): Buffer[] {
    return [batchHeader(FrameType.WRITE, req), req.records];
  }

  protected sendGrpc(req: WriteRequest): void {
    this.grpcCall!.write(req);
  }

  protected onFrame(type: number, body: Buffer): void {
    if (type === FrameType.WRITE_ACK) {
      const a = decodeSeq(body);
      this.emit('data', { table: a.table, seq: a.seq } satisfies WriteAck);
    } else if (type === FrameType.STATUS) this.onStatus(body);
    else throw new FrameError(`a frame of type ${type} on a write channel`);
  }
}

/**
 * Subscribe on a frame channel: CHANGE and EVENT frames are 'data' (SubscribeEvents, as the gRPC
 * stream hands them over); `acks` sends ACK frames on the same connection.
 */
export class FrameSubscribeCall extends FrameCall<AckRequest> implements SubscribeCall {
  private grpcAcks: AckSink | null = null;
  readonly acks: AckSink = { write: (a) => this.sendMessage(a), end: () => this.grpcAcks?.end() };

  constructor(opener: ChannelOpener, req: SubscribeRequest, fallback: () => { call: SubscribeCall; acks: AckSink }) {
    super(opener, { subscribe: req }, () => {
      const f = fallback();
      this.grpcAcks = f.acks;
      return f.call;
    });
  }

  private decodeEvent(body: Buffer): SubscribeEvent {
    try {
      return this.opener.decode(body);
    } catch (e) {
      throw new FrameError(`an EVENT frame that is not a SubscribeEvent (${(e as Error).message})`);
    }
  }

  protected encode(a: AckRequest): Buffer {
    return encodeSeq(FrameType.ACK, a);
  }

  protected sendGrpc(a: AckRequest): void {
    this.grpcAcks?.write(a);
  }

  protected onFrame(type: number, body: Buffer): void {
    if (type === FrameType.CHANGE) {
      const b = decodeBatch(body);
      this.emit('data', { change: b, msg: 'change' } satisfies SubscribeEvent);
    } else if (type === FrameType.EVENT) this.emit('data', this.decodeEvent(body));
    else if (type === FrameType.STATUS) this.onStatus(body);
    else throw new FrameError(`a frame of type ${type} on a subscribe channel`);
  }
}
