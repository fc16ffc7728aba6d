/**
 * A small QMP client over a unix socket: greeting + qmp_capabilities handshake, commands with
 * ids and per-command timeouts, asynchronous events. QMP frames are newline-delimited JSON.
 * QEMU serves one QMP client per socket at a time: a second connect() waits in the backlog
 * until the first client closes, which is why every wait here has a timeout.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  /** QEMU's own clock for the event. */
  timestamp: { seconds: number; microseconds: number };
}

/** A command failed inside QEMU; `errorClass`/`desc` are QMP's. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

/** The connection or a timeout failed (not a QEMU-side error). */
export class QmpTransportError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QmpTransportError';
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

type QmpMessage = { QMP: Record<string, unknown> } | { return: unknown; id?: unknown } | { error: { class: string; desc: string }; id?: unknown } | QmpEvent;

export interface QmpConnectOptions {
  /** Time for connect + greeting + capabilities handshake. */
  timeoutMs?: number;
  /** Default per-command timeout. */
  commandTimeoutMs?: number;
}

/**
 * Emits 'event' (QmpEvent) and 'close' (hadError: boolean). After 'close', every pending and
 * future execute() rejects with QmpTransportError.
 */
export class QmpClient extends EventEmitter {
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closed = false;
  greeting: Record<string, unknown> = {};

  private constructor(
    private readonly socket: net.Socket,
    private readonly commandTimeoutMs: number,
  ) {
    super();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  static connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 5000;
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path });
      const client = new QmpClient(socket, opts.commandTimeoutMs ?? 10_000);
      let settled = false;
      const fail = (err: Error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const timer = setTimeout(
        () => fail(new QmpTransportError(`QMP handshake on ${path} timed out after ${timeoutMs} ms (is another client connected?)`)),
        timeoutMs,
      );
      socket.once('error', (err) => fail(new QmpTransportError(`QMP connect to ${path}: ${err.message}`)));
      socket.setEncoding('utf8');
      socket.on('data', (chunk: string) => client.onData(chunk));
      socket.on('close', (hadError) => client.onClose(hadError));
      // The greeting arrives unsolicited; only after it may capabilities be negotiated.
      client.once('greeting', () => {
        client
          .execute('qmp_capabilities', undefined, timeoutMs)
          .then(() => {
            if (settled) return;
            settled = true;
            clearTimeout(timer);
            socket.removeAllListeners('error');
            socket.on('error', () => {
              // 'close' follows and is what callers observe.
            });
            resolve(client);
          })
          .catch((err: Error) => fail(err));
      });
      client.once('close', () => fail(new QmpTransportError(`QMP socket ${path} closed during handshake`)));
    });
  }

  /** Runs one command; resolves with QMP's `return` value (typed by the caller). */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    if (this.closed) return Promise.reject(new QmpTransportError(`QMP ${command}: connection closed`));
    const id = `h${this.nextId++}`;
    const ms = timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpTransportError(`QMP ${command}: no answer within ${ms} ms`));
      }, ms);
      this.pending.set(id, { command, resolve: (v) => resolve(v as T), reject, timer });
      const frame: Record<string, unknown> = { execute: command, id };
      if (args) frame.arguments = args;
      this.socket.write(JSON.stringify(frame) + '\n');
    });
  }

  close(): void {
    if (!this.closed) this.socket.end();
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: QmpMessage;
      try {
        msg = JSON.parse(line) as QmpMessage;
      } catch {
        continue; // QEMU only sends JSON; ignore a torn line rather than kill the session.
      }
      this.dispatch(msg);
    }
  }

  private dispatch(msg: QmpMessage): void {
    if ('QMP' in msg) {
      this.greeting = msg.QMP;
      this.emit('greeting', msg.QMP);
      return;
    }
    if ('event' in msg) {
      this.emit('event', msg);
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id ? this.pending.get(id) : undefined;
    if (!p || !id) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) p.reject(new QmpError(p.command, msg.error.class, msg.error.desc));
    else p.resolve(msg.return);
  }

  private onClose(hadError: boolean): void {
    if (this.closed) return;
    this.closed = true;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(new QmpTransportError(`QMP ${p.command}: connection closed`));
    }
    this.emit('close', hadError);
  }
}
