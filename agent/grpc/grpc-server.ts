/**
 * The agent's gRPC listeners: the host unix socket local processes use, an optional loopback TCP
 * port, an optional TLS port for remote clients (mutual TLS: a client certificate from the
 * --tls-client-ca is required, and its role from --tls-roles authorizes every call), and one unix
 * socket per VM (the guest channel) whose calls are tagged with that VM. Every listener serves
 * the same services plus grpc.health.v1 and server reflection, so stock tools (grpcurl,
 * grpc_health_probe) can discover and probe the agent.
 *
 * Authorization is done here, once, by wrapping every handler of the TLS listener (see
 * instrument()); the unix socket is local-operator (0660) and the guest sockets are unchanged.
 */
import * as grpc from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import fs from 'node:fs';
import path from 'node:path';
import { Logger } from '../common/logger';
import { requestIdFor, tagCall } from '../common/request-context';
import { loadProtos, serviceDef, warmCodecs } from './proto';
import { Role, roleAllows, roleOf } from './authz';

/** Mutual TLS for the remote listener. */
export interface TlsOptions {
  cert: string;
  key: string;
  clientCa: string;
  roles: Map<string, Role>;
}

/** Counts finished calls: full method path and gRPC status code name. */
/** A finished call: full method, status code name, and for unary calls its duration in seconds. */
export type CallObserver = (method: string, code: string, seconds?: number) => void;

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
  tlsAddress = '';
  /** Called once per finished RPC (metrics). */
  onCall: CallObserver | null = null;

  constructor(
    private readonly bindings: ServiceBinding[],
    private readonly log: Logger,
  ) {
    const status: Record<string, 'SERVING'> = { '': 'SERVING' };
    for (const b of bindings) status[b.name] = 'SERVING';
    this.health = new HealthImplementation(status);
  }

  private reflection: ReflectionService | null = null;
  private warm = false;

  /** Adds a service after construction; it is served by listeners opened from then on. */
  addService(binding: ServiceBinding): void {
    if (this.bindings.some((b) => b.name === binding.name)) throw new Error(`service ${binding.name} is already bound`);
    this.bindings.push(binding);
    this.health.setStatus(binding.name, 'SERVING');
  }

  private build(peerVm: string | null, tls: TlsOptions | null = null): grpc.Server {
    const { def, pkg } = loadProtos();
    if (!this.warm) {
      warmCodecs(def);
      this.warm = true;
    }
    const server = new grpc.Server(SERVER_OPTIONS);
    for (const b of this.bindings) {
      if (peerVm !== null && !b.guest) continue;
      const def = serviceDef(pkg, b.name);
      const handlers = guardHandlers(def, b.handlers(peerVm));
      server.addService(
        guardMalformed(def),
        instrument(def, handlers, tls?.roles ?? null, (m, c, sec) => this.onCall?.(m, c, sec), this.log),
      );
    }
    this.health.addToServer(server);
    // Reflection on the host's listeners only: guests run daemons, not tools that explore the
    // API, and adding it to a server loads its proto again (about 10 ms at each VM start). One
    // reflection service for all of them: building one decodes every file descriptor of the
    // protos (75-300 ms).
    if (peerVm === null) {
      this.reflection ??= new ReflectionService(def);
      this.reflection.addToServer(server);
    }
    return server;
  }

  private async bind(server: grpc.Server, address: string, creds = grpc.ServerCredentials.createInsecure()): Promise<number> {
    widenFlowControl(server, 'before-bind');
    const port = await new Promise<number>((resolve, reject) => server.bindAsync(address, creds, (err, p) => (err ? reject(err) : resolve(p))));
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

  /**
   * TLS with client certificates, on any address: a client without a certificate signed by
   * `clientCa` fails the handshake and gets no response at all; an authenticated client's role
   * decides which RPCs it may call (PERMISSION_DENIED otherwise). Port 0 picks a free port.
   */
  async listenTls(hostPort: string, tls: TlsOptions): Promise<string> {
    const { host, port } = splitHostPort(hostPort);
    const creds = grpc.ServerCredentials.createSsl(Buffer.from(tls.clientCa), [{ private_key: Buffer.from(tls.key), cert_chain: Buffer.from(tls.cert) }], true);
    const server = this.build(null, tls);
    const bound = await this.bind(server, host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`, creds);
    this.tlsAddress = host.includes(':') ? `[${host}]:${bound}` : `${host}:${bound}`;
    this.servers.set(`tls:${this.tlsAddress}`, server);
    this.log.info({ address: this.tlsAddress, roles: tls.roles.size }, 'gRPC listening on TLS (client certificates required)');
    return this.tlsAddress;
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

type AnyCall = NodeJS.EventEmitter & {
  getPath?: () => string;
  metadata?: grpc.Metadata;
  sendMetadata?: (md: grpc.Metadata) => void;
  getAuthContext?: () => { sslPeerCertificate?: import('node:tls').PeerCertificate };
  end?: (...a: unknown[]) => unknown;
  emit: (e: string, ...v: unknown[]) => boolean;
};

/**
 * Wraps every handler of a service: with `roles` (the TLS listener) the caller's certificate
 * must map to a role that allows the method, else PERMISSION_DENIED naming the role and the RPC;
 * on every listener each finished call is reported to `observe` with its status code. Every call
 * gets a request id (the client's `x-request-id` when it sent a usable one), returned in the
 * `x-request-id` response header and written on the log lines about the call.
 */
function instrument(
  def: grpc.ServiceDefinition,
  impl: grpc.UntypedServiceImplementation,
  roles: Map<string, Role> | null,
  observe: CallObserver,
  log: Logger,
): grpc.UntypedServiceImplementation {
  const out: grpc.UntypedServiceImplementation = {};
  for (const [name, m] of Object.entries(def)) {
    const h = impl[name] as ((...a: unknown[]) => void) | undefined;
    if (!h) continue;
    const method = m.path;
    const respondsWithCallback = !m.responseStream;

    const serve = (call: AnyCall, cb: ((e: unknown, v?: unknown) => void) | undefined, rid: string, t0: number) => {
      let reported = false;
      const report = (code: number | undefined, details?: string) => {
        if (reported) return;
        reported = true;
        const codeName = grpc.status[code ?? grpc.status.OK] ?? String(code);
        const elapsed = performance.now() - t0;
        observe(method, codeName, m.requestStream || m.responseStream ? undefined : elapsed / 1000);
        const ms = Math.round(elapsed * 10) / 10;
        // Refusals are what an operator asks about afterwards; successes only at debug.
        if (code) log.info({ rid, method, code: codeName, details, ms }, 'RPC failed');
        else log.debug({ rid, method, ms }, 'RPC done');
      };
      if (roles) {
        const cert = call.getAuthContext?.().sslPeerCertificate;
        const { role, name: who } = roleOf(roles, cert);
        if (!role || !roleAllows(role, method)) {
          const details = role
            ? `role '${role}' (certificate ${who}) may not call ${method}; it needs role 'operator'`
            : `certificate ${who} has no role in --tls-roles, so it may not call ${method}; add its CN or SAN as 'viewer' or 'operator'`;
          log.warn({ method, who, role }, 'RPC denied');
          const err = { code: grpc.status.PERMISSION_DENIED, details };
          report(err.code, details);
          if (respondsWithCallback && cb) cb(err);
          else call.emit('error', err);
          return;
        }
      }
      if (respondsWithCallback && cb) {
        h(call, (e: unknown, v?: unknown) => {
          const err = e as { code?: number; details?: string } | null;
          report(err ? (err.code ?? grpc.status.UNKNOWN) : grpc.status.OK, err?.details);
          cb(e, v);
        });
        return;
      }
      const emit = call.emit.bind(call);
      call.emit = ((event: string, ...a: unknown[]) => {
        if (event === 'error') {
          const err = a[0] as { code?: number; details?: string } | undefined;
          report(err?.code ?? grpc.status.UNKNOWN, err?.details);
        }
        return emit(event, ...a);
      }) as typeof call.emit;
      if (call.end) {
        const end = call.end.bind(call);
        call.end = ((...a: unknown[]) => {
          report(grpc.status.OK);
          return end(...a);
        }) as typeof call.end;
      }
      call.once('cancelled', () => report(grpc.status.CANCELLED));
      h(call);
    };

    out[name] = ((call: AnyCall, cb?: (e: unknown, v?: unknown) => void) => {
      const rid = requestIdFor(call.metadata?.get('x-request-id')[0]);
      const md = new grpc.Metadata();
      md.set('x-request-id', rid);
      call.sendMetadata?.(md);
      tagCall(call, rid);
      serve(call, cb, rid, performance.now());
    }) as grpc.UntypedHandleCall;
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
