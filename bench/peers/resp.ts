/**
 * resp.ts — owns the minimal RESP2 client the peer benchmarks use to talk to
 * redis-server over a raw `net` socket (no npm redis client).
 *
 * Two ways to send:
 *  - `command(...args)`: one request, a promise for its reply;
 *  - `writePipelined(buf, n)`: pre-encoded bytes holding `n` commands whose
 *    replies are only counted (errors are kept, see `pipelineErrors`), for
 *    bulk loads. Replies arrive in order, so a `command()` issued afterwards
 *    resolves only once every earlier pipelined reply has been read.
 */
import * as net from 'node:net';

/** A decoded reply: simple string, integer, bulk string (Buffer), nil (null) or array. */
export type RespValue = string | number | Buffer | null | RespValue[];

/** An error reply from the server (`-ERR ...`). */
export class RespError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RespError';
  }
}

const CR = 13;
const INCOMPLETE: unique symbol = Symbol('incomplete');

interface Parsed {
  value: RespValue | RespError;
  next: number;
}

/** Index of the CR of the next CRLF at or after `from`, or -1. */
function lineEnd(buf: Buffer, from: number): number {
  const i = buf.indexOf(CR, from);
  return i < 0 || i + 1 >= buf.length ? -1 : i;
}

/** Parse one reply starting at `pos`; INCOMPLETE when more bytes are needed. */
function parseReply(buf: Buffer, pos: number): Parsed | typeof INCOMPLETE {
  if (pos >= buf.length) return INCOMPLETE;
  const e = lineEnd(buf, pos + 1);
  if (e < 0) return INCOMPLETE;
  const type = buf[pos];
  switch (type) {
    case 0x2b: // '+'
      return { value: buf.toString('latin1', pos + 1, e), next: e + 2 };
    case 0x2d: // '-'
      return { value: new RespError(buf.toString('utf8', pos + 1, e)), next: e + 2 };
    case 0x3a: // ':'
      return { value: Number(buf.toString('latin1', pos + 1, e)), next: e + 2 };
    case 0x24: {
      // '$' bulk string
      const len = Number(buf.toString('latin1', pos + 1, e));
      if (len < 0) return { value: null, next: e + 2 };
      const start = e + 2;
      if (start + len + 2 > buf.length) return INCOMPLETE;
      return { value: Buffer.from(buf.subarray(start, start + len)), next: start + len + 2 };
    }
    case 0x2a: {
      // '*' array
      const n = Number(buf.toString('latin1', pos + 1, e));
      if (n < 0) return { value: null, next: e + 2 };
      const items: RespValue[] = [];
      let p = e + 2;
      for (let i = 0; i < n; i++) {
        const r = parseReply(buf, p);
        if (r === INCOMPLETE) return INCOMPLETE;
        // An error inside an array (e.g. EXEC) is surfaced as its message.
        items.push(r.value instanceof RespError ? r.value.message : r.value);
        p = r.next;
      }
      return { value: items, next: p };
    }
    default:
      throw new Error(`RESP protocol error: unexpected type byte 0x${type.toString(16)} at offset ${pos}`);
  }
}

/** Pending replies, in order: a caller waiting for one, or a run of counted pipelined ones. */
type Pending = { kind: 'one'; resolve: (v: RespValue) => void; reject: (e: Error) => void } | { kind: 'counted'; remaining: number };

/** RESP encoding of one command (array of bulk strings). */
export function encodeCommand(args: ReadonlyArray<string | Buffer | number>): Buffer {
  const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`, 'latin1')];
  for (const a of args) {
    const b = Buffer.isBuffer(a) ? a : Buffer.from(String(a), 'utf8');
    parts.push(Buffer.from(`$${b.length}\r\n`, 'latin1'), b, Buffer.from('\r\n', 'latin1'));
  }
  return Buffer.concat(parts);
}

export class RespClient {
  private buf: Buffer = Buffer.alloc(0);
  private readonly pending: Pending[] = [];
  private head = 0; // index of the oldest pending entry (avoids Array#shift on long queues)
  private closedError: Error | undefined;
  /** Error replies received for `writePipelined` commands (count and first few messages). */
  readonly pipelineErrors: { count: number; samples: string[] } = { count: 0, samples: [] };

  private constructor(private readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err: Error) => this.fail(err));
    socket.on('close', () => this.fail(new Error('connection closed')));
  }

  /** Connect; rejects on refusal or after `timeoutMs` (milliseconds). */
  static connect(port: number, host = '127.0.0.1', timeoutMs = 2000): Promise<RespClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ port, host });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect to ${host}:${port} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new RespClient(socket));
      });
    });
  }

  /** Send one command and wait for its reply; error replies reject with RespError. */
  command(...args: Array<string | Buffer | number>): Promise<RespValue> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise<RespValue>((resolve, reject) => {
      this.pending.push({ kind: 'one', resolve, reject });
      this.socket.write(encodeCommand(args));
    });
  }

  /** Like `command`, with a bulk-string reply decoded as UTF-8 text. */
  async commandText(...args: Array<string | Buffer | number>): Promise<string> {
    const v = await this.command(...args);
    if (Buffer.isBuffer(v)) return v.toString('utf8');
    if (typeof v === 'string' || typeof v === 'number') return String(v);
    throw new Error(`expected a string reply to ${String(args[0])}, got ${JSON.stringify(v)}`);
  }

  /**
   * Write `buf`, which holds exactly `commands` encoded commands whose replies
   * are counted, not returned. Returns the socket's write() result: false
   * means wait for `drained()` before writing more. `buf` must not be
   * modified afterwards (the socket may still hold it).
   */
  writePipelined(buf: Buffer, commands: number): boolean {
    if (this.closedError) throw this.closedError;
    const last = this.pending.length > this.head ? this.pending[this.pending.length - 1] : undefined;
    if (last !== undefined && last.kind === 'counted') last.remaining += commands;
    else this.pending.push({ kind: 'counted', remaining: commands });
    return this.socket.write(buf);
  }

  /** Resolves when the socket's write buffer has drained (or it closed). */
  drained(): Promise<void> {
    if (this.closedError) return Promise.reject(this.closedError);
    if (!this.socket.writableNeedDrain) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const onDrain = (): void => {
        this.socket.off('close', onClose);
        resolve();
      };
      const onClose = (): void => {
        this.socket.off('drain', onDrain);
        reject(this.closedError ?? new Error('connection closed'));
      };
      this.socket.once('drain', onDrain);
      this.socket.once('close', onClose);
    });
  }

  /** Replies still outstanding (counted pipelined ones included). */
  outstanding(): number {
    let n = 0;
    for (let i = this.head; i < this.pending.length; i++) {
      const p = this.pending[i];
      n += p.kind === 'counted' ? p.remaining : 1;
    }
    return n;
  }

  close(): void {
    this.socket.destroy();
  }

  private onData(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    let pos = 0;
    try {
      for (;;) {
        const r = parseReply(this.buf, pos);
        if (r === INCOMPLETE) break;
        pos = r.next;
        this.deliver(r.value);
      }
    } catch (err) {
      this.fail(err instanceof Error ? err : new Error(String(err)));
      this.socket.destroy();
      return;
    }
    this.buf = pos === this.buf.length ? Buffer.alloc(0) : this.buf.subarray(pos);
  }

  private deliver(v: RespValue | RespError): void {
    const p = this.pending[this.head];
    if (p === undefined) throw new Error('RESP protocol error: reply with no pending request');
    if (p.kind === 'counted') {
      if (v instanceof RespError) {
        this.pipelineErrors.count++;
        if (this.pipelineErrors.samples.length < 5) this.pipelineErrors.samples.push(v.message);
      }
      if (--p.remaining > 0) return;
    } else if (v instanceof RespError) {
      p.reject(v);
    } else {
      p.resolve(v);
    }
    this.head++;
    // Compact occasionally so the queue does not grow without bound.
    if (this.head > 1024 && this.head * 2 > this.pending.length) {
      this.pending.splice(0, this.head);
      this.head = 0;
    }
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (let i = this.head; i < this.pending.length; i++) {
      const p = this.pending[i];
      if (p.kind === 'one') p.reject(err);
    }
    this.pending.length = 0;
    this.head = 0;
  }
}
