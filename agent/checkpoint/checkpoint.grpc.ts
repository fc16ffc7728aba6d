/**
 * gRPC transport of hitless.v1.Checkpoint: parses calls into CheckpointService operations and maps
 * results and errors back. No domain logic lives here. OpenChannel hands the change path over to
 * a frame channel (checkpoint.frames.ts).
 *
 * `peerVm` is the VM a listener belongs to (per-VM guest socket) or null for the host listeners;
 * the service uses it to refuse a process claiming another VM.
 */
import * as grpc from '@grpc/grpc-js';
import { HitlessError, invalidArgument } from '../common/errors';
import { Logger } from '../common/logger';
import { failStream, toServiceError, unary } from '../grpc/status';
import { CheckpointService, SessionChannel } from './checkpoint.service';
import { FrameChannels } from './checkpoint.frames';
import {
  AckRequest,
  AuditResponse,
  ChannelRequest,
  ChannelTicket,
  RoleCommand,
  SessionRequest,
  SessionResponse,
  StatusResponse,
  SubscribeEvent,
  SubscribeRequest,
  SwitchoverResponse,
  WriteAck,
  WriteRequest,
} from './messages';
import { WriteStream } from './write-stream';

interface StatusRequest {
  process: string;
}
interface SwitchoverRequest {
  process: string;
  toInstanceId: string;
}

/** A process has this long to send Register after opening its Session stream. */
const REGISTER_DEADLINE_MS = 10_000;

export function checkpointHandlers(svc: CheckpointService, channels: FrameChannels, log: Logger, peerVm: string | null): grpc.UntypedServiceImplementation {
  const session = (call: grpc.ServerDuplexStream<SessionRequest, SessionResponse>) => {
    let sessionId: string | null = null;
    let ended = false;
    const registerTimer = setTimeout(() => {
      if (!sessionId) failStream(call, invalidArgument(`no Register message within ${REGISTER_DEADLINE_MS} ms of opening the session`), log, 'Session');
    }, REGISTER_DEADLINE_MS);
    const channel: SessionChannel = {
      send: (cmd: RoleCommand) => {
        if (!ended) call.write({ command: cmd });
      },
      close: (err?: HitlessError) => {
        if (ended) return;
        ended = true;
        if (err) failStream(call, err, log, 'Session');
        else call.end();
      },
    };
    const finish = (reason: string) => {
      clearTimeout(registerTimer);
      ended = true;
      if (sessionId) svc.unregister(sessionId, reason);
    };
    call.on('data', (msg: SessionRequest) => {
      try {
        if (msg.msg === 'register' && msg.register) {
          if (sessionId) throw invalidArgument('Register sent twice on one session; open a new Session stream to register again');
          const registered = svc.register(msg.register, channel, peerVm);
          sessionId = registered.sessionId;
          clearTimeout(registerTimer);
          call.write({ registered });
        } else if (msg.msg === 'result' && msg.result) {
          if (!sessionId) throw invalidArgument('CommandResult before Register');
          svc.commandResult(sessionId, msg.result);
        } else if (msg.msg === 'notice' && msg.notice) {
          if (!sessionId) throw invalidArgument('SessionNotice before Register');
          svc.sessionNotice(sessionId, msg.notice);
        } else if (msg.msg !== 'heartbeat') {
          throw invalidArgument('empty SessionRequest: set register, result, heartbeat or notice');
        }
      } catch (e) {
        ended = true;
        failStream(call, e, log, 'Session');
        if (sessionId) svc.unregister(sessionId, 'session failed');
        sessionId = null;
      }
    });
    call.on('end', () => {
      finish('process closed the session');
      call.end();
    });
    call.on('cancelled', () => finish('session cancelled'));
    call.on('error', () => finish('session stream error'));
  };

  const writeStream = (call: grpc.ServerDuplexStream<WriteRequest, WriteAck>) => {
    const stream = new WriteStream(svc, peerVm, {
      ack: (a) => call.write(a),
      fail: (err) => failStream(call, err, log, 'WriteStream'),
      end: () => call.end(),
    });
    call.on('data', (req: WriteRequest) => stream.request(req));
    call.on('end', () => stream.end());
    call.on('error', () => stream.broke());
  };

  const subscribe = (call: grpc.ServerWritableStream<SubscribeRequest, SubscribeEvent>) => {
    try {
      const sub = svc.subscribe(
        call.request,
        {
          write: (ev) => call.write(ev),
          onDrain: (cb) => call.on('drain', cb),
          end: () => call.end(),
          fail: (err) => failStream(call, err, log, 'Subscribe'),
        },
        peerVm,
      );
      call.on('cancelled', () => sub.cancelled());
      call.on('close', () => sub.cancelled());
    } catch (e) {
      failStream(call, e, log, 'Subscribe');
    }
  };

  const ack = (call: grpc.ServerReadableStream<AckRequest, Record<string, never>>, callback: grpc.sendUnaryData<Record<string, never>>) => {
    let done = false;
    call.on('data', (req: AckRequest) => {
      if (done) return;
      try {
        svc.ack(req, peerVm);
      } catch (e) {
        done = true;
        callback(toServiceError(e, log, 'Ack', call) as grpc.ServiceError);
      }
    });
    call.on('end', () => {
      if (!done) callback(null, {});
      done = true;
    });
    call.on('error', () => (done = true));
  };

  return {
    Session: session,
    Write: unary<WriteRequest, WriteAck>(log, 'Write', (req) => svc.write(req, peerVm)),
    WriteStream: writeStream,
    Subscribe: subscribe,
    Ack: ack,
    OpenChannel: unary<ChannelRequest, ChannelTicket>(log, 'OpenChannel', (req) => channels.open(req, peerVm)),
    Status: unary<StatusRequest, StatusResponse>(log, 'Status', (req) => ({ processes: svc.status(req.process) })),
    Switchover: unary<SwitchoverRequest, SwitchoverResponse>(log, 'Switchover', (req) => {
      if (peerVm !== null) throw new HitlessError(grpc.status.PERMISSION_DENIED, 'switchover is an operator action; guests may not request it');
      if (!req.process || !req.toInstanceId) throw invalidArgument('Switchover needs process and to_instance_id');
      return svc.switchover(req.process, req.toInstanceId);
    }),
    Audit: unary<{ process: string }, AuditResponse>(log, 'Audit', (req) => {
      if (peerVm !== null) throw new HitlessError(grpc.status.PERMISSION_DENIED, 'audits are an operator action; guests may not request them');
      if (!req.process) throw invalidArgument('Audit needs a process name');
      return svc.audit(req.process);
    }),
  } as grpc.UntypedServiceImplementation;
}
