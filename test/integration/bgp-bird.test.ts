/**
 * The example router's BGP speaker against BIRD 2, a BGP implementation nobody here wrote, on a
 * real test network (harness/netlab.ts): BIRD in the receiver namespace (AS 65000, 198.51.100.2)
 * announces 20,000 IPv4 and 2,000 IPv6 prefixes; the speaker in the data-plane namespace (AS 65001,
 * 198.51.100.1) announces three of its own. What BIRD saw is read from BIRD itself (birdc).
 * Needs root and Debian's bird2; every namespace and process is removed in `after`.
 */
import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { BirdPeer, startBird } from '../../harness/bird-peer';
import { NetLab, createNetLab, netLabAvailable } from '../../harness/netlab';
import { until } from '../../harness/wait';

const SPEAK = path.resolve(__dirname, '../../examples/bgp-rib/speak.js');
const OURS = ['198.18.0.0/24', '198.18.1.0/24', '2001:db8:100::/64'];

interface Speaker {
  proc: ChildProcess;
  events: Record<string, unknown>[];
  ask(cmd: string, event: string): Promise<Record<string, unknown>>;
}

function startSpeaker(lab: NetLab): Speaker {
  const proc = spawn(
    'ip',
    [
      'netns',
      'exec',
      lab.dataplane,
      process.execPath,
      SPEAK,
      '--as',
      '65001',
      '--router-id',
      '198.51.100.1',
      '--peer',
      '198.51.100.2:65000',
      '--announce',
      OURS.join(','),
      '--next-hop6',
      '2001:db8:2::1',
      '--graceful-restart',
      '120',
    ],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const events: Record<string, unknown>[] = [];
  const waiters: (() => void)[] = [];
  readline.createInterface({ input: proc.stdout! }).on('line', (l) => {
    events.push(JSON.parse(l) as Record<string, unknown>);
    for (const w of waiters.splice(0)) w();
  });
  return {
    proc,
    events,
    ask: (cmd, event) =>
      new Promise((resolve) => {
        const from = events.length;
        const check = () => {
          const e = events.slice(from).find((x) => x.event === event);
          if (e) resolve(e);
          else waiters.push(check);
        };
        waiters.push(check);
        proc.stdin!.write(cmd + '\n');
      }),
  };
}

describe('BGP: the example speaker peers with BIRD 2 (real sessions, network namespaces)', function () {
  this.timeout(120_000);
  let lab: NetLab | null = null;
  let bird: BirdPeer | null = null;
  let speaker: Speaker | null = null;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-bird-'));

  before(async function () {
    if (!netLabAvailable().ok) this.skip();
    lab = createNetLab();
    bird = await startBird({
      netns: lab.receiver,
      dir,
      routerId: '198.51.100.2',
      localAddress: '198.51.100.2',
      localAs: 65000,
      neighbor: '198.51.100.1',
      neighborAs: 65001,
      routes: 20_000,
      nextHop6: '2001:db8:2::2',
    });
  });

  after(async () => {
    try {
      speaker?.proc.kill('SIGKILL');
      await bird?.stop();
    } finally {
      lab?.remove();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('establishes a session with BIRD and exchanges routes of both families', async () => {
    speaker = startSpeaker(lab!);
    const s = speaker;
    await until(
      'BIRD Established with our 3 routes',
      async () => {
        const p = await bird!.protocol();
        return p.state === 'Established' && p.imported === OURS.length;
      },
      30_000,
      100,
    );
    await until('22,000 routes in our Loc-RIB', async () => (await s.ask('summary', 'summary')).best === 22_000, 30_000, 200);
    const p = await bird!.protocol();
    assert.equal(p.exported, 22_000);
    const shown = await bird!.birdc('show route protocol peer all');
    assert.match(shown, /198\.18\.0\.0\/24 .*\n\s+via 198\.51\.100\.1 on eth0/);
    assert.match(shown, /BGP\.as_path: 65001/);
    assert.match(shown, /2001:db8:100::\/64/);
    const routes = (await s.ask('routes', 'routes')).routes as { prefix: string; nextHop: string; asPath: number[] }[];
    const r = routes.find((x) => x.prefix === '10.0.5.0/24')!;
    assert.deepEqual([r.nextHop, r.asPath], ['198.51.100.2', [65000]]);
    assert.equal(routes.find((x) => x.prefix === '2001:db8:f001::/48')?.nextHop, '2001:db8:2::2');
    assert.ok(s.events.some((e) => e.event === 'established' && e.as4 === true && (e.families as unknown[]).length === 2));
    assert.equal(s.events.filter((e) => e.event === 'end-of-rib').length, 2, 'End-of-RIB of IPv4 and IPv6 from BIRD');
  });

  it('answers ROUTE-REFRESH (birdc reload in) without resetting the session', async () => {
    const before = await bird!.protocol();
    await bird!.birdc('reload in peer');
    await until(
      'the refresh answered',
      async () => /Import updates:\s+(\d+)/.exec((await bird!.protocol()).text)![1] !== /Import updates:\s+(\d+)/.exec(before.text)![1],
      20_000,
      100,
    );
    const after = await bird!.protocol();
    assert.deepEqual([after.state, after.since, after.imported], ['Established', before.since, OURS.length]);
  });

  it('on a crash of the speaker, BIRD keeps our routes (graceful restart) until the restarted one sends End-of-RIB', async () => {
    speaker!.proc.kill('SIGKILL');
    await until('BIRD noticed the session is gone', async () => (await bird!.protocol()).state !== 'Established', 30_000, 100);
    // Still there, stale, while we restart (RFC 4724 receiving speaker): nothing withdrawn.
    const during = await bird!.birdc('show route protocol peer');
    for (const p of OURS) assert.ok(during.includes(p), `${p} kept during the restart`);
    speaker = startSpeaker(lab!);
    await until('Established again', async () => (await bird!.protocol()).state === 'Established', 60_000, 100);
    await until('our routes current again', async () => (await bird!.protocol()).imported === OURS.length, 30_000, 100);
    assert.equal((await bird!.protocol()).withdrawsReceived, 0, 'BIRD received no withdrawal');
  });

  it('ends the session with a Cease NOTIFICATION when stopped', async () => {
    speaker!.proc.stdin!.write('quit\n');
    await until('BIRD saw the Cease', async () => /Administrative shutdown/.test((await bird!.protocol()).text), 20_000, 100);
  });
});
