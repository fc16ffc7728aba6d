/**
 * The agent's gRPC listeners: the host unix socket local processes use, an optional loopback TCP
 * port, and one unix socket per VM (the guest channel) whose calls are tagged with that VM.
 * Every listener serves the same services plus grpc.health.v1 and server reflection, so stock
 * tools (grpcurl, grpc_health_probe) can discover and probe the agent.
 */
import * as grpc from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import fs from 'node:fs';
import path from 'node:path';
import { Logger } from '../common/logger';
import { loadProtos, serviceDef } from './proto';

/** A service this server exposes: its full proto name and handlers for a given VM tag. */
export interface ServiceBinding {
  name: string;
  handlers: (peerVm: string | null) => grpc.UntypedServiceImplementation;
  /** Also exposed on per-VM guest sockets (guests only get what they need). */
  guest: boolean;
}

/** Server options; see widenFlowControl for the HTTP/2 windows. */
const SERVER_OPTIONS: grpc.ServerOptions = {
  'grpc.max_receive_message_length': 8 * 1024 * 1024,
  'grpc.max_send_message_length': 8 * 1024 * 1024,
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 5_000,
};

export class GrpcServer {
  private readonly servers = new Map<string, grpc.Server>();
  private readonly health: HealthImplementation;
  tcpAddress = '';

  constructor(
    private readonly bindings: ServiceBinding[],
    private readonly log: Logger,
  ) {
    const status: Record<string, 'SERVING'> = { '': 'SERVING' };
    for (const b of bindings) status[b.name] = 'SERVING';
    this.health = new HealthImplementation(status);
  }

  /** Adds a service after construction; it is served by listeners opened from then on. */
  addService(binding: ServiceBinding): void {
    if (this.bindings.some((b) => b.name === binding.name)) throw new Error(`service ${binding.name} is already bound`);
    this.bindings.push(binding);
    this.health.setStatus(binding.name, 'SERVING');
  }

  private build(peerVm: string | null): grpc.Server {
    const { def, pkg } = loadProtos();
    const server = new grpc.Server(SERVER_OPTIONS);
    for (const b of this.bindings) {
      if (peerVm !== null && !b.guest) continue;
      const def = serviceDef(pkg, b.name);
      server.addService(guardMalformed(def), guardHandlers(def, b.handlers(peerVm)));
    }
    this.health.addToServer(server);
    new ReflectionService(def).addToServer(server);
    return server;
  }

  private async bind(server: grpc.Server, address: string): Promise<number> {
    widenFlowControl(server, 'before-bind');
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    widenFlowControl(server, 'after-bind');
    return port;
  }

  /** The host socket for local processes and tools. Created 0660 so only root/group reach it. */
  async listenUnix(socketPath: string): Promise<void> {
    fs.mkdirSync(path.dirname(socketPath), { recursive: true });
    fs.rmSync(socketPath, { force: true });
    const server = this.build(null);
    await this.bind(server, `unix:${socketPath}`);
    fs.chmodSync(socketPath, 0o660);
    this.servers.set(`unix:${socketPath}`, server);
    this.log.info({ socket: socketPath }, 'gRPC listening on unix socket');
  }

  /** Plaintext TCP, loopback only (remote callers need TLS). Port 0 picks a free port. */
  async listenTcp(hostPort: string): Promise<string> {
    const { host, port } = splitHostPort(hostPort);
    if (!isLoopback(host)) {
      throw new Error(`refusing plaintext gRPC on non-loopback address ${host}; use 127.0.0.1 or ::1`);
    }
    const server = this.build(null);
    const bound = await this.bind(server, host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`);
    this.tcpAddress = host.includes(':') ? `[${host}]:${bound}` : `${host}:${bound}`;
    this.servers.set(`tcp:${this.tcpAddress}`, server);
    this.log.info({ address: this.tcpAddress }, 'gRPC listening on TCP');
    return this.tcpAddress;
  }

  /** A VM's guest channel: calls arriving here are known to come from `vm`. */
  async listenVm(vm: string, socketPath: string): Promise<void> {
    fs.mkdirSync(path.dirname(socketPath), { recursive: true });
    fs.rmSync(socketPath, { force: true });
    const server = this.build(vm);
    await this.bind(server, `unix:${socketPath}`);
    fs.chmodSync(socketPath, 0o660);
    this.servers.set(`vm:${vm}`, server);
  }

  async closeVm(vm: string): Promise<void> {
    const s = this.servers.get(`vm:${vm}`);
    if (!s) return;
    this.servers.delete(`vm:${vm}`);
    await shutdown(s);
  }

  async close(): Promise<void> {
    this.health.setStatus('', 'NOT_SERVING');
    await Promise.all([...this.servers.values()].map(shutdown));
    this.servers.clear();
  }
}

function shutdown(s: grpc.Server): Promise<void> {
  return new Promise<void>((resolve) => {
    // Give in-flight calls a moment, then cut the long-lived streams (sessions, subscriptions).
    const t = setTimeout(() => {
      s.forceShutdown();
      resolve();
    }, 500);
    s.tryShutdown(() => {
      clearTimeout(t);
      resolve();
    });
  });
}

export function splitHostPort(hostPort: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(hostPort) ?? /^([^:]*):(\d+)$/.exec(hostPort);
  if (!m) throw new Error(`'${hostPort}' is not HOST:PORT`);
  return { host: m[1] || '127.0.0.1', port: Number(m[2]) };
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

/**
 * grpc-js answers a request that does not parse as protobuf with a bare INTERNAL. A person needs
 * INVALID_ARGUMENT and a reason, so deserializers hand a marker to the handler wrappers below,
 * which answer for them; the service handlers never see malformed input.
 */
const MALFORMED = Symbol('malformed');
type Malformed = { [MALFORMED]: string };
const isMalformed = (m: unknown): m is Malformed => typeof m === 'object' && m !== null && MALFORMED in m;

function guardMalformed(def: grpc.ServiceDefinition): grpc.ServiceDefinition {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [name, m] of Object.entries(def)) {
    out[name] = {
      ...m,
      requestDeserialize: (buf: Buffer) => {
        try {
          return m.requestDeserialize(buf);
        } catch (e) {
          return { [MALFORMED]: (e as Error).message };
        }
      },
    };
  }
  return out as grpc.ServiceDefinition;
}

function guardHandlers(def: grpc.ServiceDefinition, impl: grpc.UntypedServiceImplementation): grpc.UntypedServiceImplementation {
  const out: grpc.UntypedServiceImplementation = {};
  for (const [name, m] of Object.entries(def)) {
    const h = impl[name] as (...a: unknown[]) => void;
    if (!h) continue;
    const answer = (why: string) => ({ code: grpc.status.INVALID_ARGUMENT, details: `malformed ${name} request: not a valid protobuf message (${why})` });
    if (!m.requestStream) {
      out[name] = ((call: { request: unknown; emit: (e: string, v: unknown) => void }, cb?: (e: unknown) => void) => {
        if (isMalformed(call.request)) {
          if (cb) cb(answer(call.request[MALFORMED]));
          else call.emit('error', answer(call.request[MALFORMED]));
          return;
        }
        h(call, cb);
      }) as grpc.UntypedHandleCall;
    } else {
      out[name] = ((call: NodeJS.EventEmitter & { emit: (e: string, v: unknown) => boolean }, cb?: (e: unknown) => void) => {
        let failed = false;
        const on = call.on.bind(call);
        call.on = ((event: string, listener: (...a: unknown[]) => void) => {
          if (event !== 'data') return on(event, listener);
          return on('data', (msg: unknown) => {
            if (failed) return;
            if (isMalformed(msg)) {
              failed = true;
              if (cb && !m.responseStream) cb(answer(msg[MALFORMED]));
              else call.emit('error', answer(msg[MALFORMED]));
              return;
            }
            listener(msg);
          });
        }) as typeof call.on;
        h(call, cb);
      }) as grpc.UntypedHandleCall;
    }
  }
  return out;
}

/**
 * HTTP/2 receive windows of 16 MiB instead of 64 KiB.
 *
 * Why: with the default 64 KiB stream and connection windows a 120 KB batch of records needs
 * several WINDOW_UPDATE round trips, which capped writes at ~200 batches/s on this machine. grpc-js
 * offers 'grpc-node.flow_control_window' for clients only, so the server side is set here through
 * two grpc-js internals (the http2 server options and its http2 servers); both are checked and
 * skipped if a grpc-js update renames them, which only costs throughput.
 */
const WINDOW_BYTES = 16 * 1024 * 1024;
function widenFlowControl(server: grpc.Server, stage: 'before-bind' | 'after-bind'): void {
  const internals = server as unknown as {
    commonServerOptions?: { settings?: Record<string, number> };
    http2Servers?: Map<NodeJS.EventEmitter, unknown>;
  };
  if (stage === 'before-bind' && internals.commonServerOptions) {
    internals.commonServerOptions.settings = { ...(internals.commonServerOptions.settings ?? {}), initialWindowSize: WINDOW_BYTES };
  }
  if (stage === 'after-bind' && internals.http2Servers instanceof Map) {
    for (const h2 of internals.http2Servers.keys()) {
      if ((h2 as { __hitlessWindow?: boolean }).__hitlessWindow) continue;
      (h2 as { __hitlessWindow?: boolean }).__hitlessWindow = true;
      h2.on('session', (session: { setLocalWindowSize?: (n: number) => void }) => session.setLocalWindowSize?.(WINDOW_BYTES));
    }
  }
}
