/**
 * Moving an established TCP connection from one process (or VM) to another with Linux TCP repair
 * (TCP_REPAIR, Linux 3.5+; TCP_REPAIR_WINDOW 4.8+), so that the peer never sees the move: no
 * reset, no FIN, the exact byte stream continues.
 *
 *   captureTcp(fd)      put the socket in repair mode and read what the new endpoint needs:
 *                       sequence numbers, both queues, window, MSS / window-scale / timestamp /
 *                       SACK options, the timestamp clock. The socket stays in repair mode, in
 *                       which it sends nothing at all: closing it then ends it silently.
 *   resumeTcp(fd)       repair off again: the move was called off and the old endpoint goes on.
 *   restoreTcp(state)   a new socket with the same addresses and ports, put straight into
 *                       ESTABLISHED with the captured state; returns its fd, out of repair mode,
 *                       for `new net.Socket({ fd })`, and the bytes still to be written.
 *
 * What the caller must guarantee (the kernel does not):
 * - Between capture and restore nothing reaches either endpoint for this connection: a segment
 *   accepted by the captured socket would be acknowledged and then lost, and one reaching the new
 *   host before the restore would be answered with a reset. The agent takes the old VM's
 *   control-plane NIC down before it freezes the process, and brings the new VM's up only after
 *   the process restored its sockets (see UpgradeService).
 * - The old socket is never taken out of repair mode once the new one exists.
 *
 * Bytes the application already read from the kernel but did not consume (a partial message)
 * can be passed as `unread`: they are put back at the head of the receive queue, so the new
 * endpoint reads them first, as if they had never been read. Bytes the application handed to its
 * runtime but that never reached the kernel cannot be captured here; the caller checks that
 * there are none (net.Socket.writableLength === 0).
 *
 * The system calls go through koffi (a C FFI with prebuilt binaries for x64 and arm64), loaded
 * on first use: Node has no setsockopt for TCP_REPAIR, and a native addon would have to be
 * compiled for every guest architecture. Each call is one FFI call of well under a microsecond of
 * overhead; a whole capture or restore is a few dozen of them. Needs CAP_NET_ADMIN.
 *
 * Constants are Linux's UAPI values (include/uapi/linux/tcp.h, socket.h, sockios.h), the same on
 * x86-64 and arm64.
 */
import net from 'node:net';

const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0o2000000;
const SOCK_NONBLOCK = 0o4000;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_SNDBUFFORCE = 32;
const SO_RCVBUFFORCE = 33;
const IPPROTO_TCP = 6;
const TCP_MAXSEG = 2;
const TCP_INFO = 11;
const TCP_REPAIR = 19;
const TCP_REPAIR_QUEUE = 20;
const TCP_QUEUE_SEQ = 21;
const TCP_REPAIR_OPTIONS = 22;
const TCP_TIMESTAMP = 24;
const TCP_REPAIR_WINDOW = 29;
const TCP_REPAIR_ON = 1;
const TCP_REPAIR_OFF = 0;
/** Repair off without the window probe TCP_REPAIR_OFF sends (Linux 4.17+). */
const TCP_REPAIR_OFF_NO_WP = -1;
const TCP_NO_QUEUE = 0;
const TCP_RECV_QUEUE = 1;
const TCP_SEND_QUEUE = 2;
const TCPOPT_MSS = 2;
const TCPOPT_WINDOW = 3;
const TCPOPT_SACK_PERM = 4;
const TCPOPT_TIMESTAMP = 8;
/** tcp_info.tcpi_options bits. */
const TCPI_OPT_TIMESTAMPS = 1;
const TCPI_OPT_SACK = 2;
const TCPI_OPT_WSCALE = 4;
const SIOCINQ = 0x541b;
const SIOCOUTQ = 0x5411;
const SIOCOUTQNSD = 0x894b;
const MSG_PEEK = 2;
const MSG_DONTWAIT = 0x40;
const TCP_ESTABLISHED = 1;
/** Bytes written to a repair queue per call (the kernel takes a queue in pieces). */
const QUEUE_CHUNK = 64 * 1024;

/** Everything a new endpoint needs to carry on a connection (JSON-able with tcpStateToJson). */
export interface TcpConnectionState {
  family: 4 | 6;
  localAddress: string;
  localPort: number;
  remoteAddress: string;
  remotePort: number;
  /** Sequence number of the first byte of sendQueue: the oldest byte the peer has not acked. */
  sendSeq: number;
  /** Sent but unacknowledged bytes, then bytes never transmitted (the last `unsent`). */
  sendQueue: Buffer;
  unsent: number;
  /** Sequence number of the first byte of recvQueue. */
  recvSeq: number;
  /** Received (and acknowledged) bytes the application has not consumed, `unread` first. */
  recvQueue: Buffer;
  mss: number;
  /** Window-scale shifts (0..14), or -1 when the option was not negotiated. */
  sndWscale: number;
  rcvWscale: number;
  timestamps: boolean;
  sack: boolean;
  /** The connection's TCP timestamp clock at capture (ms ticks, the peer sees these values). */
  tsVal: number;
  window: { sndWl1: number; sndWnd: number; maxWindow: number; rcvWnd: number; rcvWup: number };
  /** Socket buffer sizes, bytes (as getsockopt reports them: twice what was asked for). */
  sndBuf: number;
  rcvBuf: number;
  /** When it was captured, epoch ms (the timestamp clock moves on by the time it took). */
  capturedAt: number;
}

export class TcpRepairError extends Error {
  constructor(
    message: string,
    readonly errno = 0,
  ) {
    super(message);
  }
}

interface Libc {
  socket(domain: number, type: number, proto: number): number;
  setsockopt(fd: number, level: number, name: number, val: Buffer, len: number): number;
  getsockopt(fd: number, level: number, name: number, val: Buffer, len: Buffer): number;
  bind(fd: number, addr: Buffer, len: number): number;
  connect(fd: number, addr: Buffer, len: number): number;
  ioctl(fd: number, req: number, arg: Buffer): number;
  recv(fd: number, buf: Buffer, len: number, flags: number): number;
  send(fd: number, buf: Buffer, len: number, flags: number): number;
  close(fd: number): number;
  errno(): number;
}

let libc: Libc | null = null;
let loadError: string | null = null;

function load(): Libc {
  if (libc) return libc;
  if (loadError) throw new TcpRepairError(loadError);
  if (process.platform !== 'linux') {
    loadError = `TCP repair needs Linux (this is ${process.platform})`;
    throw new TcpRepairError(loadError);
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const koffi = require('koffi') as typeof import('koffi');
    const c = koffi.load('libc.so.6');
    libc = {
      socket: c.func('int socket(int, int, int)'),
      setsockopt: c.func('int setsockopt(int, int, int, void *, uint32_t)'),
      getsockopt: c.func('int getsockopt(int, int, int, void *, void *)'),
      bind: c.func('int bind(int, void *, uint32_t)'),
      connect: c.func('int connect(int, void *, uint32_t)'),
      ioctl: c.func('int ioctl(int, unsigned long, void *)'),
      recv: c.func('long recv(int, void *, size_t, int)'),
      send: c.func('long send(int, void *, size_t, int)'),
      close: c.func('int close(int)'),
      errno: () => koffi.errno(),
    } as Libc;
    return libc;
  } catch (e) {
    loadError = `TCP repair is unavailable: the FFI (koffi) did not load: ${(e as Error).message}`;
    throw new TcpRepairError(loadError);
  }
}

/** Why TCP repair cannot be used in this process, or null when it can (FFI loads, CAP_NET_ADMIN). */
export function tcpRepairUnavailable(): string | null {
  let c: Libc;
  try {
    c = load();
  } catch (e) {
    return (e as Error).message;
  }
  // Repair mode on an unconnected socket is allowed exactly when the caller may use it.
  const fd = c.socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return `socket() failed (errno ${c.errno()})`;
  try {
    if (c.setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, int32(TCP_REPAIR_ON), 4) < 0) {
      const errno = c.errno();
      return errno === 1 ? 'TCP repair needs CAP_NET_ADMIN (EPERM)' : `setsockopt(TCP_REPAIR) failed (errno ${errno})`;
    }
    return null;
  } finally {
    c.close(fd);
  }
}

/** The kernel fd behind a connected net.Socket (Linux; null when it has none). */
export function socketFd(sock: net.Socket): number | null {
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

/**
 * Puts the connected socket `fd` in repair mode and reads its state. The socket is left in repair
 * mode (silent: it neither sends nor answers); resumeTcp undoes that. The application must have
 * stopped reading and writing it.
 */
export function captureTcp(
  fd: number,
  sock: { localAddress?: string; localPort?: number; remoteAddress?: string; remotePort?: number },
  unread?: Buffer,
): TcpConnectionState {
  const c = load();
  const info = Buffer.alloc(104); // the first fields of struct tcp_info are all we read
  getopt(c, fd, TCP_INFO, info, 'TCP_INFO');
  if (info[0] !== TCP_ESTABLISHED) throw new TcpRepairError(`the connection is not established (TCP state ${info[0]})`);
  const options = info[5];
  const wscale = info[6];
  const mss = getInt(c, fd, TCP_MAXSEG, 'TCP_MAXSEG');
  const inq = ioctlInt(c, fd, SIOCINQ, 'SIOCINQ');
  const outq = ioctlInt(c, fd, SIOCOUTQ, 'SIOCOUTQ');
  const unsent = ioctlInt(c, fd, SIOCOUTQNSD, 'SIOCOUTQNSD');
  setopt(c, fd, TCP_REPAIR, TCP_REPAIR_ON, 'TCP_REPAIR on');
  try {
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, 'TCP_REPAIR_QUEUE send');
    const writeSeq = getInt(c, fd, TCP_QUEUE_SEQ, 'TCP_QUEUE_SEQ send') >>> 0;
    const sendQueue = peek(c, fd, outq, 'send');
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, 'TCP_REPAIR_QUEUE recv');
    const rcvNxt = getInt(c, fd, TCP_QUEUE_SEQ, 'TCP_QUEUE_SEQ recv') >>> 0;
    const kernelRecv = peek(c, fd, inq, 'receive');
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, 'TCP_REPAIR_QUEUE none');
    const win = Buffer.alloc(20);
    getopt(c, fd, TCP_REPAIR_WINDOW, win, 'TCP_REPAIR_WINDOW');
    const tsVal = getInt(c, fd, TCP_TIMESTAMP, 'TCP_TIMESTAMP') >>> 0;
    const recvQueue = unread?.length ? Buffer.concat([unread, kernelRecv]) : kernelRecv;
    const v6 = net.isIPv6(sock.localAddress ?? '');
    return {
      family: v6 ? 6 : 4,
      localAddress: required(sock.localAddress, 'local address'),
      localPort: required(sock.localPort, 'local port'),
      remoteAddress: required(sock.remoteAddress, 'remote address'),
      remotePort: required(sock.remotePort, 'remote port'),
      sendSeq: (writeSeq - sendQueue.length) >>> 0,
      sendQueue,
      unsent: Math.min(unsent, sendQueue.length),
      recvSeq: (rcvNxt - recvQueue.length) >>> 0,
      recvQueue,
      mss,
      sndWscale: options & TCPI_OPT_WSCALE ? wscale & 0x0f : -1,
      rcvWscale: options & TCPI_OPT_WSCALE ? wscale >> 4 : -1,
      timestamps: (options & TCPI_OPT_TIMESTAMPS) !== 0,
      sack: (options & TCPI_OPT_SACK) !== 0,
      tsVal,
      sndBuf: getSockInt(c, fd, SO_SNDBUF, 'SO_SNDBUF'),
      rcvBuf: getSockInt(c, fd, SO_RCVBUF, 'SO_RCVBUF'),
      window: {
        sndWl1: win.readUInt32LE(0),
        sndWnd: win.readUInt32LE(4),
        maxWindow: win.readUInt32LE(8),
        rcvWnd: win.readUInt32LE(12),
        rcvWup: win.readUInt32LE(16),
      },
      capturedAt: Date.now(),
    };
  } catch (e) {
    resumeTcp(fd);
    throw e;
  }
}

/**
 * Closes a connected socket without a word to the peer (no FIN, no reset): it is put in repair
 * mode first. For a restored connection that must not be used after all (its promotion was
 * undone): the instance that captured it carries on with the peer. Falls back to a plain destroy
 * when TCP repair is unavailable.
 */
export function closeTcpSilently(sock: net.Socket): void {
  const fd = socketFd(sock);
  if (fd !== null) {
    try {
      const c = load();
      c.setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, int32(TCP_REPAIR_ON), 4);
    } catch {
      // no FFI: an ordinary close is all there is
    }
  }
  sock.destroy();
}

/** Takes a captured socket out of repair mode (no window probe): the old endpoint carries on. */
export function resumeTcp(fd: number): void {
  const c = load();
  if (c.setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, int32(TCP_REPAIR_OFF_NO_WP), 4) < 0) setopt(c, fd, TCP_REPAIR, TCP_REPAIR_OFF, 'TCP_REPAIR off');
}

/**
 * A socket carrying on the captured connection: same addresses and ports, ESTABLISHED without a
 * handshake, the queues and options as captured. Returns its fd (non-blocking, close-on-exec)
 * out of repair mode, and the bytes the old endpoint had queued but never transmitted: the
 * caller writes those first, through its own socket object (the kernel may not take them all at
 * once). Leaving repair mode sends one window probe, which tells the peer where we are.
 * The local address must be configured on this host. Throws TcpRepairError (the fd closed).
 */
export function restoreTcp(s: TcpConnectionState): { fd: number; unsent: Buffer } {
  const c = load();
  const fd = c.socket(s.family === 6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) throw new TcpRepairError(`socket() failed (errno ${c.errno()})`, c.errno());
  try {
    setopt(c, fd, TCP_REPAIR, TCP_REPAIR_ON, 'TCP_REPAIR on');
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, 'TCP_REPAIR_QUEUE send');
    setopt(c, fd, TCP_QUEUE_SEQ, s.sendSeq | 0, 'TCP_QUEUE_SEQ send');
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, 'TCP_REPAIR_QUEUE recv');
    setopt(c, fd, TCP_QUEUE_SEQ, s.recvSeq | 0, 'TCP_QUEUE_SEQ recv');
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, 'TCP_REPAIR_QUEUE none');
    if (c.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, int32(1), 4) < 0) fail(c, 'SO_REUSEADDR');
    // Buffers at least as large as the old socket's had grown (autotuning), and large enough for
    // the queues with their per-packet overhead: the kernel refuses queue data past them. Setting
    // them fixes their size for the connection's life (no more autotuning), as a restore must.
    const buf = (captured: number, queue: number) => int32(Math.ceil(Math.max(captured, 2 * queue + 256 * 1024) / 2));
    if (c.setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, buf(s.sndBuf, s.sendQueue.length), 4) < 0) fail(c, 'SO_SNDBUFFORCE');
    if (c.setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, buf(s.rcvBuf, s.recvQueue.length), 4) < 0) fail(c, 'SO_RCVBUFFORCE');
    const local = sockaddr(s.family, s.localAddress, s.localPort);
    if (c.bind(fd, local, local.length) < 0) {
      const errno = c.errno();
      throw new TcpRepairError(
        errno === 99
          ? `cannot bind ${s.localAddress}:${s.localPort}: the address is not configured on this host (EADDRNOTAVAIL)`
          : errno === 98
            ? `cannot bind ${s.localAddress}:${s.localPort}: a socket here still holds it (EADDRINUSE)`
            : `bind ${s.localAddress}:${s.localPort} failed (errno ${errno})`,
        errno,
      );
    }
    // In repair mode connect() sends no SYN: the socket goes straight to ESTABLISHED.
    const remote = sockaddr(s.family, s.remoteAddress, s.remotePort);
    if (c.connect(fd, remote, remote.length) < 0) fail(c, `connect ${s.remoteAddress}:${s.remotePort}`);
    // Options after connect (connect resets them).
    const opts: [number, number][] = [[TCPOPT_MSS, s.mss]];
    if (s.sndWscale >= 0) opts.push([TCPOPT_WINDOW, s.sndWscale | (s.rcvWscale << 16)]);
    if (s.timestamps) opts.push([TCPOPT_TIMESTAMP, 0]);
    if (s.sack) opts.push([TCPOPT_SACK_PERM, 0]);
    const ob = Buffer.alloc(8 * opts.length);
    opts.forEach(([code, val], i) => {
      ob.writeUInt32LE(code, i * 8);
      ob.writeUInt32LE(val >>> 0, i * 8 + 4);
    });
    if (c.setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPTIONS, ob, ob.length) < 0) fail(c, 'TCP_REPAIR_OPTIONS');
    // The timestamp clock moves on from where the old endpoint's was: the peer discards segments
    // whose timestamp went backwards (PAWS, RFC 7323).
    if (s.timestamps) setopt(c, fd, TCP_TIMESTAMP, (s.tsVal + Math.max(0, Date.now() - s.capturedAt)) | 0, 'TCP_TIMESTAMP');
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, 'TCP_REPAIR_QUEUE recv');
    sendAll(c, fd, s.recvQueue, 'receive');
    // The transmitted part goes in as "sent" (retransmitted if the peer never got it); the
    // untransmitted rest is sent normally once out of repair mode.
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, 'TCP_REPAIR_QUEUE send');
    sendAll(c, fd, s.sendQueue.subarray(0, s.sendQueue.length - s.unsent), 'send');
    setopt(c, fd, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, 'TCP_REPAIR_QUEUE none');
    const w = Buffer.alloc(20);
    w.writeUInt32LE(s.window.sndWl1 >>> 0, 0);
    w.writeUInt32LE(s.window.sndWnd >>> 0, 4);
    w.writeUInt32LE(s.window.maxWindow >>> 0, 8);
    w.writeUInt32LE(s.window.rcvWnd >>> 0, 12);
    w.writeUInt32LE(s.window.rcvWup >>> 0, 16);
    if (c.setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, w, w.length) < 0) fail(c, 'TCP_REPAIR_WINDOW');
    setopt(c, fd, TCP_REPAIR, TCP_REPAIR_OFF, 'TCP_REPAIR off');
    return { fd, unsent: s.sendQueue.subarray(s.sendQueue.length - s.unsent) };
  } catch (e) {
    c.close(fd);
    throw e;
  }
}

/** The state as JSON-safe values (queues base64). */
export function tcpStateToJson(s: TcpConnectionState): Record<string, unknown> {
  return { ...s, sendQueue: s.sendQueue.toString('base64'), recvQueue: s.recvQueue.toString('base64') };
}

export function tcpStateFromJson(o: Record<string, unknown>): TcpConnectionState {
  const s = o as unknown as TcpConnectionState & { sendQueue: string; recvQueue: string };
  for (const k of ['localAddress', 'remoteAddress'] as const) if (typeof s[k] !== 'string') throw new TcpRepairError(`captured TCP state has no ${k}`);
  return { ...s, sendQueue: Buffer.from(s.sendQueue, 'base64'), recvQueue: Buffer.from(s.recvQueue, 'base64') };
}

// ------------------------------------------------------------------ helpers

function int32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32LE(v);
  return b;
}

function fail(c: Libc, what: string): never {
  const errno = c.errno();
  throw new TcpRepairError(`${what} failed (errno ${errno})`, errno);
}

function setopt(c: Libc, fd: number, name: number, v: number, what: string): void {
  if (c.setsockopt(fd, IPPROTO_TCP, name, int32(v), 4) < 0) fail(c, what);
}

function getopt(c: Libc, fd: number, name: number, out: Buffer, what: string): void {
  const len = int32(out.length);
  if (c.getsockopt(fd, IPPROTO_TCP, name, out, len) < 0) fail(c, what);
}

function getInt(c: Libc, fd: number, name: number, what: string): number {
  const b = Buffer.alloc(4);
  getopt(c, fd, name, b, what);
  return b.readInt32LE(0);
}

function getSockInt(c: Libc, fd: number, name: number, what: string): number {
  const b = Buffer.alloc(4);
  if (c.getsockopt(fd, SOL_SOCKET, name, b, int32(4)) < 0) fail(c, what);
  return b.readInt32LE(0);
}

function ioctlInt(c: Libc, fd: number, req: number, what: string): number {
  const b = Buffer.alloc(4);
  if (c.ioctl(fd, req, b) < 0) fail(c, what);
  return b.readInt32LE(0);
}

/** Reads `len` bytes of the selected repair queue without consuming them. */
function peek(c: Libc, fd: number, len: number, which: string): Buffer {
  if (len <= 0) return Buffer.alloc(0);
  const b = Buffer.alloc(len);
  const n = c.recv(fd, b, len, MSG_PEEK | MSG_DONTWAIT);
  if (n < 0) fail(c, `reading the ${which} queue`);
  if (n !== len) throw new TcpRepairError(`the ${which} queue holds ${n} bytes, the kernel counted ${len}`);
  return b;
}

function sendAll(c: Libc, fd: number, data: Buffer, which: string): void {
  for (let off = 0; off < data.length;) {
    const chunk = data.subarray(off, Math.min(data.length, off + QUEUE_CHUNK));
    const n = c.send(fd, chunk, chunk.length, 0);
    if (n <= 0) fail(c, `restoring the ${which} queue at byte ${off} of ${data.length}`);
    off += n;
  }
}

function sockaddr(family: 4 | 6, address: string, port: number): Buffer {
  if (family === 4) {
    const b = Buffer.alloc(16);
    b.writeUInt16LE(AF_INET, 0);
    b.writeUInt16BE(port, 2);
    address.split('.').forEach((o, i) => b.writeUInt8(Number(o), 4 + i));
    return b;
  }
  const b = Buffer.alloc(28);
  b.writeUInt16LE(AF_INET6, 0);
  b.writeUInt16BE(port, 2);
  ipv6Bytes(address).copy(b, 8);
  return b;
}

function ipv6Bytes(a: string): Buffer {
  const [head, tail] = a.includes('::') ? a.split('::') : [a, null];
  const parts = (s: string) => (s ? s.split(':') : []);
  const h = parts(head);
  const t = tail === null ? [] : parts(tail);
  const groups = tail === null ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  const b = Buffer.alloc(16);
  groups.forEach((g, i) => b.writeUInt16BE(parseInt(g, 16), i * 2));
  return b;
}

function required<T>(v: T | undefined, what: string): T {
  if (v === undefined) throw new TcpRepairError(`the socket has no ${what}`);
  return v;
}

/**
 * Moves a loopback connection within this process and checks the bytes arrive: proves TCP repair
 * works here (kernel, capability, FFI) before a switchover depends on it, and runs every code path
 * of a move once, so that the first real one, inside a switchover's freeze window, does not pay
 * for loading the FFI and compiling the code (hundreds of ms in a guest under TCG). Never throws.
 */
export async function tcpRepairSelfTest(): Promise<{ ok: true; captureMs: number; restoreMs: number } | { ok: false; why: string }> {
  const why = tcpRepairUnavailable();
  if (why) return { ok: false, why };
  const server = net.createServer();
  const sockets: net.Socket[] = [];
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
    const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    sockets.push(client);
    await new Promise<void>((resolve, reject) => {
      client.once('connect', resolve);
      client.once('error', reject);
    });
    const peer = await accepted;
    sockets.push(peer);
    const received: Buffer[] = [];
    peer.on('data', (d: Buffer) => received.push(d));
    client.pause();
    const fd = socketFd(client);
    if (fd === null) return { ok: false, why: 'a connected socket has no file descriptor' };
    const t0 = performance.now();
    const state = captureTcp(fd, client, Buffer.from('held'));
    const captureMs = performance.now() - t0;
    client.destroy(); // in repair mode: closes without a word to the peer
    const t1 = performance.now();
    const { fd: fd2, unsent } = restoreTcp(tcpStateFromJson(JSON.parse(JSON.stringify(tcpStateToJson(state))) as Record<string, unknown>));
    const restoreMs = performance.now() - t1;
    const moved = new net.Socket({ fd: fd2, readable: true, writable: true });
    sockets.push(moved);
    moved.write(Buffer.concat([unsent, Buffer.from('moved')]));
    const deadline = Date.now() + 5000;
    while (Buffer.concat(received).toString() !== 'moved') {
      if (Date.now() > deadline)
        return { ok: false, why: `a moved loopback connection did not deliver its bytes (got '${Buffer.concat(received).toString()}')` };
      await new Promise((r) => setTimeout(r, 5));
    }
    return { ok: true, captureMs, restoreMs };
  } catch (e) {
    return { ok: false, why: (e as Error).message };
  } finally {
    for (const s of sockets) s.destroy();
    server.close();
  }
}
