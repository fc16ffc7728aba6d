/**
 * TCP repair (agent/sdk/tcp-repair.ts) with real sockets and separate processes: an endpoint in
 * one network namespace, its peer in another, joined by a veth pair. The endpoint process is
 * captured mid-stream, with bytes in both kernel queues and bytes it read but did not consume,
 * exits, and a second process carries the connection on. The peer must see one unbroken byte
 * stream each way and no reset.
 *
 * As in an upgrade, nothing may reach the connection while it moves: the peer's side of the veth
 * is set down for that time (the endpoint's link loses carrier, as a guest's NIC does when QEMU
 * sets it down), and up again once the new process holds the connection.
 */
import assert from 'node:assert/strict';
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { netLabAvailable } from '../../harness/netlab';
import { tcpRepairUnavailable } from '../../agent/sdk/tcp-repair';

const SCRIPT = path.join(__dirname, '..', 'helpers', 'tcp-endpoint.js');
const PEER = '192.0.2.20';
const LOCAL = '192.0.2.10';
const PORT = 1790;

type Ev = Record<string, unknown> & { event: string };

/** A tcp-endpoint process: send it commands, wait for its events. */
class Endpoint {
  readonly events: Ev[] = [];
  private waiters: { pred: (e: Ev) => boolean; resolve: (e: Ev) => void }[] = [];
  readonly exited: Promise<void>;
  stderr = '';

  constructor(
    readonly name: string,
    readonly proc: ChildProcess,
  ) {
    this.exited = new Promise((r) => proc.once('exit', () => r()));
    proc.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    readline.createInterface({ input: proc.stdout! }).on('line', (l) => {
      const e = JSON.parse(l) as Ev;
      this.events.push(e);
      for (const w of this.waiters.splice(0)) {
        if (w.pred(e)) w.resolve(e);
        else this.waiters.push(w);
      }
    });
  }

  static start(name: string, ns: string, args: string[]): Endpoint {
    return new Endpoint(name, spawn('ip', ['netns', 'exec', ns, process.execPath, SCRIPT, ...args], { stdio: ['pipe', 'pipe', 'pipe'] }));
  }

  send(cmd: string): void {
    this.proc.stdin!.write(cmd + '\n');
  }

  wait(event: string, timeoutMs = 20_000): Promise<Ev> {
    const seen = this.events.find((e) => e.event === event || e.event === 'failed' || e.event === 'mismatch');
    if (seen) return Promise.resolve(seen).then(check);
    return new Promise<Ev>((resolve, reject) => {
      const t = setTimeout(
        () => reject(new Error(`${this.name}: no '${event}' in ${timeoutMs} ms (events ${JSON.stringify(this.events)}; stderr ${this.stderr})`)),
        timeoutMs,
      );
      this.waiters.push({
        pred: (e) => e.event === event || e.event === 'failed' || e.event === 'mismatch',
        resolve: (e) => {
          clearTimeout(t);
          resolve(e);
        },
      });
    }).then(check);
    function check(e: Ev): Ev {
      if (e.event !== event) throw new Error(`${e.event}: ${JSON.stringify(e)}`);
      return e;
    }
  }

  /** Sends `cmd` and waits for `event` (events before the command are not taken for it). */
  async ask(cmd: string, event: string): Promise<Ev> {
    this.events.length = 0;
    this.send(cmd);
    return this.wait(event);
  }

  errors(): Ev[] {
    return this.events.filter((e) => e.event === 'error');
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
    await this.exited;
  }
}

describe('TCP repair: a connection moves to another process, the peer sees nothing', function () {
  this.timeout(60_000);
  const lab = netLabAvailable();
  const why = lab.ok ? tcpRepairUnavailable() : lab.reason;
  const id = crypto.randomBytes(3).toString('hex');
  const nsE = `hl-tcpe-${id}`;
  const nsP = `hl-tcpp-${id}`;
  const running: Endpoint[] = [];
  let dir = '';
  const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });

  before(function () {
    if (why) {
      // Needs root (namespaces, CAP_NET_ADMIN for TCP repair) and the koffi FFI.
      this.skip();
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hl-tcprepair-'));
    ip('netns', 'add', nsE);
    ip('netns', 'add', nsP);
    ip('-n', nsE, 'link', 'add', 'veth0', 'type', 'veth', 'peer', 'name', 'veth0', 'netns', nsP);
    ip('-n', nsE, 'addr', 'add', `${LOCAL}/24`, 'dev', 'veth0');
    ip('-n', nsP, 'addr', 'add', `${PEER}/24`, 'dev', 'veth0');
    for (const ns of [nsE, nsP]) {
      ip('-n', ns, 'link', 'set', 'lo', 'up');
      ip('-n', ns, 'link', 'set', 'veth0', 'up');
    }
  });

  afterEach(async () => {
    for (const e of running.splice(0)) await e.stop();
    if (!why) ip('-n', nsP, 'link', 'set', 'veth0', 'up'); // a failed move may have left it down
  });

  after(() => {
    for (const ns of [nsE, nsP]) {
      try {
        ip('netns', 'del', ns);
      } catch {
        // never made
      }
    }
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  const start = (name: string, ns: string, args: string[]) => {
    const e = Endpoint.start(name, ns, args);
    running.push(e);
    return e;
  };

  /** A listening peer and an endpoint connected to it on `port`. */
  const connectedPair = async (port: number, endpointName = 'endpoint') => {
    const peer = start('peer', nsP, ['peer', PEER, String(port)]);
    await peer.wait('ready');
    const a = start(endpointName, nsE, ['connect', PEER, String(port), LOCAL]);
    await Promise.all([a.wait('connected'), peer.wait('connected')]);
    return { peer, a };
  };

  it('moves a connection with data in both queues and unconsumed bytes; both streams stay exact', async () => {
    const { peer, a } = await connectedPair(PORT, 'old endpoint');

    // Some traffic both ways, read and checked.
    await peer.ask('send 300000', 'sent');
    await a.ask('expect 300000', 'received');
    await a.ask('send 200000', 'sent');
    await peer.ask('expect 200000', 'received');
    // The endpoint stops reading: what the peer sends next waits in its receive queue. The peer
    // stops reading too, and the endpoint writes until its kernel takes no more: its send queue
    // then holds bytes sent but unacknowledged and bytes never sent (the peer's window is shut).
    await a.ask('pause', 'paused');
    await peer.ask('send 150000', 'sent');
    await peer.ask('pause', 'paused');
    const filled = await a.ask('fill', 'filled');
    assert.ok((filled.bytes as number) > 0, 'the kernel took bytes');

    // The move: the endpoint loses its link, is captured, exits; another process restores.
    ip('-n', nsP, 'link', 'set', 'veth0', 'down');
    const stateFile = path.join(dir, 'state.json');
    const cap = await a.ask(`capture ${stateFile}`, 'captured');
    assert.ok((cap.unread as number) > 0, `bytes read but not consumed: ${JSON.stringify(cap)}`);
    assert.ok((cap.recvQueue as number) > (cap.unread as number), `receive queue (unconsumed + kernel): ${JSON.stringify(cap)}`);
    assert.ok((cap.sendQueue as number) > 0, `send queue: ${JSON.stringify(cap)}`);
    assert.ok((cap.mss as number) > 500, `MSS: ${JSON.stringify(cap)}`);
    a.send('exit');
    await a.exited;
    const b = start('new endpoint', nsE, ['restore', stateFile]);
    const restored = await b.wait('connected');
    assert.equal(restored.restored, true);
    ip('-n', nsP, 'link', 'set', 'veth0', 'up');

    // Everything carries on: the peer reads all the endpoint ever wrote, and the new endpoint
    // reads everything the peer sent, from the first unconsumed byte on.
    const totalToPeer = filled.tx as number;
    await peer.ask('resume', 'resumed');
    await peer.ask(`expect ${totalToPeer}`, 'received');
    await b.ask('expect 450000', 'received');
    await b.ask('send 100000', 'sent');
    await peer.ask(`expect ${totalToPeer + 100000}`, 'received');
    await peer.ask('send 50000', 'sent');
    await b.ask('expect 500000', 'received');
    // A clean close from the new endpoint: the peer sees FIN, never a reset.
    b.send('end');
    await peer.wait('peer-ended');
    assert.deepEqual(peer.errors(), [], 'errors at the peer (a reset shows as ECONNRESET)');
    assert.deepEqual(b.errors(), []);
  });

  it('a silent close sends neither FIN nor reset: the peer learns only when it sends', async () => {
    const { peer, a } = await connectedPair(PORT + 2);
    await a.ask('send 1000', 'sent');
    await peer.ask('expect 1000', 'received');
    await a.ask('silent-close', 'silently-closed');
    // The socket is gone: the next segment from the peer is answered with a reset, which the
    // peer sees as ECONNRESET. Had the close sent a FIN, 'peer-ended' would come before it.
    peer.send('send 1000');
    const err = await peer.wait('error');
    assert.equal(err.code, 'ECONNRESET');
    assert.ok(!peer.events.some((e) => e.event === 'peer-ended'), `no FIN before the reset: ${JSON.stringify(peer.events)}`);
  });

  it('a capture that is called off leaves the connection with the old endpoint, intact', async () => {
    const { peer, a } = await connectedPair(PORT + 1);
    await peer.ask('send 100000', 'sent');
    await a.ask('expect 100000', 'received');
    await a.ask('pause', 'paused');
    await peer.ask('send 70000', 'sent');
    await a.ask(`capture ${path.join(dir, 'called-off.json')}`, 'captured');
    await a.ask('release', 'released');
    await a.ask('expect 170000', 'received');
    await a.ask('send 80000', 'sent');
    await peer.ask('expect 80000', 'received');
    a.send('end');
    await peer.wait('peer-ended');
    assert.deepEqual(peer.errors(), []);
    assert.deepEqual(a.errors(), []);
  });
});
