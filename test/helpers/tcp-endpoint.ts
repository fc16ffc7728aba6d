/**
 * One end of a TCP connection for the TCP repair test, as a separate process driven by stdin
 * lines, reporting JSON lines on stdout. Both directions carry a known byte pattern (byte i of a
 * stream is patternByte(i)), so every byte received is checked where it lands.
 *
 *   node tcp-endpoint.js peer ADDR PORT          listen, take one connection
 *   node tcp-endpoint.js connect ADDR PORT LOCAL connect from LOCAL
 *   node tcp-endpoint.js restore STATE_FILE      carry on a captured connection
 *
 * Commands: send N | fill (write until the kernel takes no more) | pause | resume | expect N |
 * capture (pause, capture, print the state; the socket stays in repair mode) | release (resume
 * after a capture) | silent-close (closeTcpSilently) | exit (close the captured socket: silent) |
 * end.
 * Events: ready, connected, sent, filled, paused, captured, released, received, mismatch, error,
 * peer-ended, closed.
 */
import fs from 'node:fs';
import net from 'node:net';
import readline from 'node:readline';
import { captureTcp, closeTcpSilently, resumeTcp, restoreTcp, socketFd, tcpStateFromJson, tcpStateToJson } from '../../agent/sdk/tcp-repair';

export const patternByte = (i: number) => (i * 31 + (i >>> 9)) & 0xff;

const say = (o: Record<string, unknown>) => process.stdout.write(JSON.stringify(o) + '\n');

function pattern(from: number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = patternByte(from + i);
  return b;
}

let sock: net.Socket | null = null;
/** Stream offsets: bytes written (handed to the kernel) and bytes received and checked. */
let txOff = 0;
let rxOff = 0;
/** Received bytes not yet "consumed" by this application: handed over with a capture. */
const held: Buffer[] = [];
let heldOff = 0;
const waiters: { n: number; done: () => void }[] = [];

function onBytes(d: Buffer): void {
  for (let i = 0; i < d.length; i++) {
    if (d[i] !== patternByte(rxOff + i)) {
      say({ event: 'mismatch', at: rxOff + i, got: d[i], want: patternByte(rxOff + i) });
      process.exit(3);
    }
  }
  rxOff += d.length;
  // The last 64 KiB stay "unconsumed", as a parser's partial message would.
  held.push(Buffer.from(d));
  let size = held.reduce((a, b) => a + b.length, 0);
  while (size - held[0].length >= 64 * 1024) {
    size -= held[0].length;
    heldOff += held[0].length;
    held.shift();
  }
  for (const w of waiters.splice(0)) {
    if (rxOff >= w.n) w.done();
    else waiters.push(w);
  }
}

function adopt(s: net.Socket): void {
  sock = s;
  s.on('error', (e: NodeJS.ErrnoException) => say({ event: 'error', code: e.code, message: e.message }));
  s.on('end', () => say({ event: 'peer-ended', rx: rxOff }));
  s.on('close', () => say({ event: 'closed' }));
}

/** onread: a buffer of our own, so pause() really stops reading from the kernel (readStop). */
const onread = {
  buffer: Buffer.alloc(256 * 1024),
  callback: (n: number, buf: Buffer) => {
    onBytes(buf.subarray(0, n));
    return true;
  },
};

function fill(): number {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const koffi = require('koffi') as typeof import('koffi');
  const send = koffi.load('libc.so.6').func('long send(int, void *, size_t, int)') as (fd: number, b: Buffer, n: number, f: number) => number;
  const fd = socketFd(sock!)!;
  let total = 0;
  for (;;) {
    const b = pattern(txOff, 16 * 1024);
    const n = send(fd, b, b.length, 0x40 /* MSG_DONTWAIT */);
    if (n <= 0) return total;
    txOff += n;
    total += n;
  }
}

async function main(): Promise<void> {
  const [mode, a, b, c] = process.argv.slice(2);
  if (mode === 'peer') {
    const srv = net.createServer({ pauseOnConnect: false }, (s) => {
      srv.close();
      adopt(s);
      s.on('data', onBytes);
      say({ event: 'connected' });
    });
    srv.listen(Number(b), a, () => say({ event: 'ready' }));
  } else if (mode === 'connect') {
    const s = net.connect({ host: a, port: Number(b), localAddress: c, onread });
    adopt(s);
    s.once('connect', () => say({ event: 'connected', localPort: s.localPort }));
  } else if (mode === 'restore') {
    const saved = JSON.parse(fs.readFileSync(a, 'utf8')) as { state: Record<string, unknown>; txOff: number; rxOff: number };
    const state = tcpStateFromJson(saved.state);
    const t0 = performance.now();
    const { fd, unsent } = restoreTcp(state);
    const restoreMs = performance.now() - t0;
    txOff = saved.txOff;
    rxOff = saved.rxOff; // the held bytes come again from the restored receive queue
    adopt(new net.Socket({ fd, readable: true, writable: true, onread } as net.SocketConstructorOpts));
    sock!.write(unsent);
    say({ event: 'connected', restored: true, restoreMs, unsent: unsent.length });
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const [cmd, arg] = line.trim().split(/\s+/);
    if (cmd === 'send') {
      const n = Number(arg);
      sock!.write(pattern(txOff, n));
      txOff += n;
      say({ event: 'sent', tx: txOff });
    } else if (cmd === 'fill') {
      say({ event: 'filled', bytes: fill(), tx: txOff });
    } else if (cmd === 'pause') {
      sock!.pause();
      say({ event: 'paused' });
    } else if (cmd === 'resume') {
      sock!.resume();
      say({ event: 'resumed' });
    } else if (cmd === 'expect') {
      const n = Number(arg);
      await new Promise<void>((r) => (rxOff >= n ? r() : waiters.push({ n, done: r })));
      say({ event: 'received', rx: rxOff });
    } else if (cmd === 'capture') {
      sock!.pause();
      if (sock!.writableLength) throw new Error(`${sock!.writableLength} bytes not yet in the kernel`);
      const unread = Buffer.concat(held);
      const t0 = performance.now();
      const state = captureTcp(socketFd(sock!)!, sock!, unread);
      const captureMs = performance.now() - t0;
      const saved = { state: tcpStateToJson(state), txOff, rxOff: heldOff };
      fs.writeFileSync(arg, JSON.stringify(saved));
      say({
        event: 'captured',
        captureMs,
        sendQueue: state.sendQueue.length,
        unsent: state.unsent,
        recvQueue: state.recvQueue.length,
        unread: unread.length,
        mss: state.mss,
        wscale: [state.sndWscale, state.rcvWscale],
        timestamps: state.timestamps,
        sack: state.sack,
      });
    } else if (cmd === 'release') {
      resumeTcp(socketFd(sock!)!);
      sock!.resume();
      say({ event: 'released' });
    } else if (cmd === 'silent-close') {
      closeTcpSilently(sock!);
      say({ event: 'silently-closed' });
    } else if (cmd === 'exit') {
      process.exit(0); // the kernel closes the fd; in repair mode that sends nothing
    } else if (cmd === 'end') {
      sock!.end();
    }
  }
}

main().catch((e: Error) => {
  say({ event: 'failed', message: e.message });
  process.exit(2);
});
