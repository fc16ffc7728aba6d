#!/usr/bin/env node
/**
 * Sequence-numbered UDP through the data plane: run inside a namespace of the test network
 * (harness/netlab.ts) as `ip netns exec NS node udp-flow.js send|recv ...`; harness/traffic.ts
 * drives a pair of them.
 *
 *   send --port P --rate R --targets A,B,...   sends R packets/s round-robin to the targets until
 *                                              stdin says "stop" (or closes), then prints
 *                                              {"event":"sent","sent":N,"errors":E,"max_send_gap_ms":G}
 *   recv --port P                              counts until stdin says "stop", then prints
 *                                              {"event":"received","unique":U,"duplicates":D,
 *                                               "max_gap_ms":G,"first_at":T0,"last_at":T1}
 *
 * A packet is 12 bytes: magic "HLTF", sequence u32 and target index u32 (big-endian). The
 * receiver keeps a bitmap of sequences, so loss is sent minus unique received, whatever the
 * order. Both print {"event":"ready"} once their sockets are open.
 *
 * The receiver asks for a 4 MiB socket buffer (the kernel doubles it): at 5,000 packets/s it
 * rides out an event-loop pause of well over a second under a loaded CPU, so a packet it counts
 * as lost was lost by the network, not by this process.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import readline from 'node:readline';
import { parseArgs } from 'node:util';

const MAGIC = 0x484c5446; // "HLTF"
const TICK_MS = 2;

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: { port: { type: 'string', default: '9999' }, rate: { type: 'string', default: '5000' }, targets: { type: 'string', default: '' } },
});
const out = (o: Record<string, unknown>) => process.stdout.write(JSON.stringify(o) + '\n');
const port = Number(values.port);

function onStop(fn: () => void): void {
  const rl = readline.createInterface({ input: process.stdin });
  let done = false;
  const once = () => {
    if (done) return;
    done = true;
    fn();
  };
  rl.on('line', (l) => l.trim() === 'stop' && once());
  rl.on('close', once);
}

function send(): void {
  const targets = values.targets!.split(',').filter(Boolean);
  if (targets.length === 0 || targets.some((t) => !net.isIP(t))) {
    process.stderr.write('udp-flow send: --targets must list IPv4/IPv6 addresses\n');
    process.exit(2);
  }
  const rate = Number(values.rate);
  const s4 = dgram.createSocket('udp4');
  const s6 = dgram.createSocket({ type: 'udp6', ipv6Only: true });
  let seq = 0;
  let sent = 0;
  let errors = 0;
  let lastTick = 0;
  let maxGap = 0;
  const t0 = performance.now();
  const buf = Buffer.alloc(12);
  const tick = () => {
    const now = performance.now();
    if (lastTick) maxGap = Math.max(maxGap, now - lastTick);
    lastTick = now;
    // Catch up to the rate: the number sent follows elapsed time, not the timer's punctuality.
    const due = Math.floor(((now - t0) * rate) / 1000);
    while (seq < due) {
      const i = seq % targets.length;
      const b = Buffer.from(buf);
      b.writeUInt32BE(MAGIC, 0);
      b.writeUInt32BE(seq, 4);
      b.writeUInt32BE(i, 8);
      const t = targets[i];
      (t.includes(':') ? s6 : s4).send(b, port, t, (err) => (err ? errors++ : sent++));
      seq++;
    }
  };
  const timer = setInterval(tick, TICK_MS);
  out({ event: 'ready', targets: targets.length, rate });
  onStop(() => {
    clearInterval(timer);
    // Let the last callbacks come in.
    setTimeout(() => {
      out({ event: 'sent', sent, errors, attempted: seq, max_send_gap_ms: Math.round(maxGap * 100) / 100 });
      s4.close();
      s6.close();
    }, 200);
  });
}

function recv(): void {
  let bits = Buffer.alloc(1 << 16);
  let unique = 0;
  let duplicates = 0;
  let maxGap = 0;
  let last = 0;
  let first = 0;
  let maxSeq = -1;
  const onMsg = (m: Buffer) => {
    if (m.length < 12 || m.readUInt32BE(0) !== MAGIC) return;
    const now = performance.now();
    if (last) maxGap = Math.max(maxGap, now - last);
    else first = Date.now();
    last = now;
    const seq = m.readUInt32BE(4);
    if (seq >> 3 >= bits.length) {
      const bigger = Buffer.alloc(Math.max(bits.length * 2, (seq >> 3) + 1));
      bits.copy(bigger);
      bits = bigger;
    }
    const mask = 1 << (seq & 7);
    if (bits[seq >> 3] & mask) duplicates++;
    else {
      bits[seq >> 3] |= mask;
      unique++;
    }
    maxSeq = Math.max(maxSeq, seq);
  };
  const s4 = dgram.createSocket({ type: 'udp4', recvBufferSize: 4 << 20 });
  const s6 = dgram.createSocket({ type: 'udp6', ipv6Only: true, recvBufferSize: 4 << 20 });
  s4.on('message', onMsg);
  s6.on('message', onMsg);
  let bound = 0;
  const ready = () => ++bound === 2 && out({ event: 'ready' });
  s4.bind(port, '0.0.0.0', ready);
  s6.bind(port, '::', ready);
  onStop(() => {
    out({
      event: 'received',
      unique,
      duplicates,
      max_seq: maxSeq,
      max_gap_ms: Math.round(maxGap * 100) / 100,
      first_at: first,
      last_at: first ? Date.now() - Math.round(performance.now() - last) : 0,
    });
    s4.close();
    s6.close();
  });
}

if (positionals[0] === 'send') send();
else if (positionals[0] === 'recv') recv();
else {
  process.stderr.write('usage: udp-flow send --port P --rate R --targets A,B,... | recv --port P\n');
  process.exit(2);
}
