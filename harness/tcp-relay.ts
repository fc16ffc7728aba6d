/**
 * A TCP listener on loopback relaying each connection, both ways, to the socket `connectUp`
 * makes: a guest's QEMU/socat relay, a port forward, in tests. `drop`: that many first
 * connections are closed as soon as they are accepted (a relay that restarts). `pieces`: what
 * comes from upstream goes on in writes of these sizes (cycled), one per event-loop turn, so a
 * client reads its frames and their headers cut at every offset. `delayMs`: each connection is
 * relayed upstream only this long after it was accepted (what the client sends waits), as a
 * slow guest's relay.
 */
import net from 'node:net';

export interface TcpRelay {
  /** host:port to connect to. */
  address: string;
  /** Both ends of every relayed connection. */
  sockets: Set<net.Socket>;
  /** The ends facing the clients. */
  clientSides: Set<net.Socket>;
  /** Connections accepted so far, dropped ones included. */
  accepted(): number;
  /** A partition: drops every connection, and closes new ones as soon as they are accepted, until heal(). */
  cut(): void;
  heal(): void;
  /** Stops listening and drops every connection. */
  close(): void;
}

export async function tcpRelay(connectUp: () => net.Socket, opts: { drop?: number; pieces?: number[]; delayMs?: number } = {}): Promise<TcpRelay> {
  const sockets = new Set<net.Socket>();
  const clientSides = new Set<net.Socket>();
  let accepted = 0;
  let isCut = false;
  const server = net.createServer((down) => {
    if (++accepted <= (opts.drop ?? 0) || isCut) return down.destroy();
    clientSides.add(down);
    down.on('close', () => clientSides.delete(down));
    const relay = () => {
      const up = connectUp();
      for (const [a, b] of [
        [down, up],
        [up, down],
      ]) {
        sockets.add(a);
        a.on('error', () => b.destroy());
        if (a === up && opts.pieces) {
          // The client gets what came before the agent closed, then the close.
          inPieces(up, down, opts.pieces);
          a.on('close', () => sockets.delete(a));
        } else {
          a.pipe(b);
          a.on('close', () => (sockets.delete(a), b.destroy()));
        }
      }
    };
    if (!opts.delayMs) return relay();
    sockets.add(down);
    down.once('close', () => sockets.delete(down));
    down.pause(); // what the client sends meanwhile waits in its socket (pipe() resumes it)
    setTimeout(() => {
      if (!down.destroyed) relay();
    }, opts.delayMs);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    address: `127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    sockets,
    clientSides,
    accepted: () => accepted,
    cut: () => {
      isCut = true;
      for (const s of sockets) s.destroy();
    },
    heal: () => {
      isCut = false;
    },
    close: () => {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}

/**
 * Relays `from` to `to` in writes of `sizes` bytes (cycled), one write per event-loop turn; once
 * `from` closed and everything went on, `to` ends (and is destroyed when `from` failed).
 */
function inPieces(from: net.Socket, to: net.Socket, sizes: number[]): void {
  let queued = Buffer.alloc(0);
  let turn = 0;
  let writing = false;
  let closed = false;
  const next = () => {
    if (to.destroyed) return;
    if (queued.length === 0) {
      writing = false;
      if (closed) to.end();
      return;
    }
    const n = Math.min(queued.length, sizes[turn++ % sizes.length]);
    to.write(queued.subarray(0, n));
    queued = queued.subarray(n);
    setImmediate(next);
  };
  from.on('data', (d: Buffer) => {
    queued = Buffer.concat([queued, d]);
    if (!writing) {
      writing = true;
      next();
    }
  });
  from.on('close', () => {
    closed = true;
    if (!writing) to.end();
  });
}
