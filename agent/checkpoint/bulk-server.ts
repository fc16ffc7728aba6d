/**
 * Raw byte streams for bulk snapshots, and the listener of frame channels (checkpoint.frames.ts),
 * which are redeemed the same way: a one-time token first, then the channel's own bytes.
 *
 * Why not gRPC: moving a full Internet table (1M records, ~120 MB) through grpc-js messages costs
 * more than the whole one-second budget; a plain socket moves it several times faster. gRPC keeps
 * control, changes and acknowledgements; the subscriber gets a one-time token in a BulkTicket,
 * connects here, sends the 16-byte token, and reads frames:
 *
 *   frame := length:u32be count:u32be records[length]   (packed PUT records, see records.ts)
 *   end   := length = 0, count = total records sent
 *
 * Flow control is the socket's own: the producer waits for 'drain' when write() returns false.
 * A ticket not redeemed within `ticketTtlMs`, or a reader that stalls for `stallTimeoutMs`,
 * aborts the transfer and tells the owner, which fails the subscription with a clear status.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Logger } from '../common/logger';

/** Snapshot frames (up to ~1 MiB each) a connection holds that the kernel has not taken yet, at most. */
const FRAMES_QUEUED = 2;

/** Writes the snapshot into the socket; resolves with the number of records sent. */
export type BulkProducer = (out: BulkWriter) => Promise<number>;

export interface BulkWriter {
  /**
   * Sends one frame; resolves when the socket can take more (fewer than FRAMES_QUEUED frames
   * wait in it). Rejects if the reader went away or stopped reading.
   */
  frame(records: Buffer, count: number): Promise<void>;
}

interface Ticket {
  producer: BulkProducer;
  timer: NodeJS.Timeout;
  onDone: (err: Error | null, records: number) => void;
  onClosed?: () => void;
}

/**
 * A frame channel's ticket (checkpoint.frames.ts): the redeemed connection is handed over with
 * whatever the client sent after its token.
 */
interface ChannelTicket {
  channel: (sock: net.Socket, early: Buffer) => void;
  timer: NodeJS.Timeout;
}

export interface BulkServerOptions {
  unixPath?: string;
  tcpHost?: string;
  ticketTtlMs: number;
  stallTimeoutMs: number;
}

export class BulkServer {
  private readonly tickets = new Map<string, Ticket | ChannelTicket>();
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  private readonly extra = new Map<string, net.Server>();
  unixPath = '';
  tcpAddress = '';

  constructor(
    private readonly opts: BulkServerOptions,
    private readonly log: Logger,
  ) {}

  async listen(): Promise<void> {
    if (this.opts.unixPath) {
      fs.rmSync(this.opts.unixPath, { force: true });
      const srv = this.makeServer();
      await new Promise<void>((res, rej) => srv.once('error', rej).listen(this.opts.unixPath, () => res()));
      fs.chmodSync(this.opts.unixPath, 0o660);
      this.unixPath = this.opts.unixPath;
    }
    if (this.opts.tcpHost) {
      const srv = this.makeServer();
      await new Promise<void>((res, rej) => srv.once('error', rej).listen(0, this.opts.tcpHost, () => res()));
      const a = srv.address() as net.AddressInfo;
      this.tcpAddress = a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
    }
  }

  /**
   * One more unix socket serving the same tickets, e.g. a VM's bulk channel
   * (<stateDir>/vms/<name>/bulk.sock, guest 10.0.2.100:7001). Idempotent per path.
   */
  async listenUnixExtra(socketPath: string): Promise<void> {
    if (this.extra.has(socketPath)) return;
    fs.mkdirSync(path.dirname(socketPath), { recursive: true });
    fs.rmSync(socketPath, { force: true });
    const srv = net.createServer({ allowHalfOpen: true }, (sock) => this.onConnection(sock));
    await new Promise<void>((res, rej) => srv.once('error', rej).listen(socketPath, () => res()));
    fs.chmodSync(socketPath, 0o660);
    this.extra.set(socketPath, srv);
  }

  /** Stops listening on an extra socket; transfers in progress on it finish or fail on their own. */
  async closeExtra(socketPath: string): Promise<void> {
    const srv = this.extra.get(socketPath);
    if (!srv) return;
    this.extra.delete(socketPath);
    await new Promise<void>((res) => srv.close(() => res()));
    fs.rmSync(socketPath, { force: true });
  }

  /**
   * Registers a producer; returns the token the subscriber must present. `onDone` reports the
   * transfer's outcome as soon as it is known; `onClosed` runs once afterwards, when nothing reads
   * the producer's buffers any more (its socket closed and the producer returned, or the ticket
   * was never redeemed): the owner may then reuse them.
   */
  issue(producer: BulkProducer, onDone: (err: Error | null, records: number) => void, onClosed?: () => void): Buffer {
    return this.addTicket({ producer, onDone, onClosed }, () => {
      onDone(new Error(`bulk snapshot ticket not redeemed within ${this.opts.ticketTtlMs} ms`), 0);
      onClosed?.();
    });
  }

  /**
   * Registers a frame channel; returns the token its client must present. An unredeemed token
   * expires after the ticket TTL like a snapshot's; nothing else depends on it.
   */
  issueChannel(channel: (sock: net.Socket, early: Buffer) => void): Buffer {
    return this.addTicket({ channel }, () => undefined);
  }

  /** A fresh one-time token for `ticket`, forgotten (and `expired` run) after the ticket TTL. */
  private addTicket(ticket: Omit<Ticket, 'timer'> | Omit<ChannelTicket, 'timer'>, expired: () => void): Buffer {
    const token = crypto.randomBytes(16);
    const key = token.toString('hex');
    const timer = setTimeout(() => {
      this.tickets.delete(key);
      expired();
    }, this.opts.ticketTtlMs);
    this.tickets.set(key, { ...ticket, timer } as Ticket | ChannelTicket);
    return token;
  }

  async close(): Promise<void> {
    for (const t of this.tickets.values()) {
      clearTimeout(t.timer);
      if ('producer' in t) t.onClosed?.();
    }
    this.tickets.clear();
    for (const s of this.sockets) s.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((res) => s.close(() => res()))));
    await Promise.all([...this.extra.keys()].map((p) => this.closeExtra(p)));
    if (this.unixPath) fs.rmSync(this.unixPath, { force: true });
  }

  private makeServer(): net.Server {
    const srv = net.createServer({ allowHalfOpen: true }, (sock) => this.onConnection(sock));
    this.servers.push(srv);
    return srv;
  }

  /** Half-open connections are kept: see run() and checkpoint.frames.ts. */
  private onConnection(sock: net.Socket): void {
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    sock.on('error', () => sock.destroy());
    let got = Buffer.alloc(0);
    const onEnd = () => sock.destroy(); // shut down before sending its token
    sock.once('end', onEnd);
    const onData = (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length < 16) return;
      sock.off('data', onData);
      sock.off('end', onEnd);
      const key = got.subarray(0, 16).toString('hex');
      const ticket = this.tickets.get(key);
      if (!ticket) {
        this.log.warn({ remote: sock.remoteAddress ?? 'unix' }, 'bulk connection with an unknown or used token');
        sock.destroy();
        return;
      }
      this.tickets.delete(key);
      clearTimeout(ticket.timer);
      if ('channel' in ticket) ticket.channel(sock, got.subarray(16));
      else void this.run(sock, ticket);
    };
    sock.on('data', onData);
  }

  private async run(sock: net.Socket, ticket: Ticket): Promise<void> {
    sock.setNoDelay(true);
    // The listener keeps half-open connections (a write channel's client shuts its side down and
    // still reads its acks); a snapshot reader that shuts its side down is gone.
    sock.once('end', () => sock.destroy());
    let closed = false;
    // The producer's buffers are let go once both the socket is closed (queued writes point into
    // them until then) and the producer has stopped reading them.
    let settled = false;
    let letGo = false;
    const letGoIfDone = () => {
      if (closed && settled && !letGo) {
        letGo = true;
        ticket.onClosed?.();
      }
    };
    sock.once('close', () => {
      closed = true;
      letGoIfDone();
    });
    /** Settles when `written` does; fails when the reader takes nothing for stallTimeoutMs. */
    const orStall = (written: Promise<void>) =>
      new Promise<void>((res, rej) => {
        const timer = setTimeout(() => rej(new Error(`snapshot reader stopped reading for ${this.opts.stallTimeoutMs} ms`)), this.opts.stallTimeoutMs);
        written.then(
          () => (clearTimeout(timer), res()),
          () => (clearTimeout(timer), rej(new Error('snapshot reader disconnected'))),
        );
      });
    const header = (len: number, count: number) => {
      const h = Buffer.allocUnsafe(8);
      h.writeUInt32BE(len, 0);
      h.writeUInt32BE(count, 4);
      return h;
    };
    // Frames handed to the socket and not yet taken by the kernel, oldest first. The producer
    // waits only when FRAMES_QUEUED are, so the socket always holds the next frame when the
    // kernel takes more. Waiting for the queue to empty (the 'drain' event) left the socket with
    // nothing to write until this thread woke up and made the next frame, and the reader, which
    // empties the kernel's buffer (~200 KiB) in under a millisecond, waited for it.
    const queued: Promise<void>[] = [];
    const writer: BulkWriter = {
      frame: async (records, count) => {
        if (closed) throw new Error('snapshot reader disconnected');
        sock.write(header(records.length, count));
        const written = new Promise<void>((res, rej) => sock.write(records, (err) => (err ? rej(err) : res())));
        written.catch(() => undefined); // awaited below, or the connection failed and run() ends on close
        queued.push(written);
        if (queued.length >= FRAMES_QUEUED) await orStall(queued.shift()!);
      },
    };
    try {
      const total = await ticket.producer(writer);
      if (closed) throw new Error('snapshot reader disconnected');
      sock.end(header(0, total));
      ticket.onDone(null, total);
    } catch (err) {
      sock.destroy();
      ticket.onDone(err as Error, 0);
    } finally {
      settled = true;
      letGoIfDone();
    }
  }
}
