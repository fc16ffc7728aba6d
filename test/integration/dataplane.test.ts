/**
 * The data plane through the agent, on a real test network (network namespaces and veth pairs,
 * harness/netlab.ts) with real packets: a routing process publishes a FIB table over gRPC, the
 * agent validates it, programs the data-plane namespace and reconciles it; UDP sent from the
 * sender namespace reaches the receiver namespace only through those routes.
 *
 * Needs root (namespaces). Every namespace is removed in `after`, also when a test fails.
 */
import * as grpc from '@grpc/grpc-js';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { RecordBuilder } from '../../agent/checkpoint/records';
import { encodeFibEntry } from '../../agent/dataplane/fib-entry';
import { ROUTE_PROTO } from '../../agent/dataplane/linux-data-plane';
import type { DataPlaneStatusView } from '../../agent/dataplane/fib.service';
import { fibRoutes, trafficTargets } from '../../examples/common/fib-routes';
import { AgentHandle, startAgent, stopAllAgents } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, registerRaw, registration, unaryCall } from '../../harness/grpc-client';
import { NetLab, createNetLab, netLabAvailable } from '../../harness/netlab';
import { Traffic, startTraffic } from '../../harness/traffic';
import { until } from '../../harness/wait';

const FIB_TABLES = [{ name: 'fib', durability: 'ASYNC', kind: 'FIB' }];

/** Routes with the agent's protocol number in the namespace, prefix -> "via G dev I" text. */
function kernelRoutes(ns: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const fam of ['-4', '-6']) {
    const text = execFileSync('ip', ['-n', ns, fam, 'route', 'show', 'proto', String(ROUTE_PROTO)], { encoding: 'utf8', maxBuffer: 64 << 20 });
    for (const line of text.split('\n').filter((l) => l && !l.startsWith('\t'))) {
      const [prefix, ...rest] = line.trim().split(/\s+/);
      out.set(prefix, rest.join(' '));
    }
  }
  return out;
}

function fibBatch(fill: (b: RecordBuilder) => void): { records: Buffer; count: number } {
  const b = new RecordBuilder();
  fill(b);
  return b.take();
}

const entry = (gateway: string, iface: string): Buffer => encodeFibEntry({ nextHops: [{ gateway, interface: iface, weight: 1 }] });

describe('data plane: FIB through the agent (network namespaces, real packets)', function () {
  this.timeout(120_000);
  let lab: NetLab | null = null;
  let agent: AgentHandle;
  let ck: AnyClient;
  let up: AnyClient;
  let session: grpc.ClientDuplexStream<unknown, Record<string, unknown>> | null = null;
  let sessionId = '';
  let seq = 0;
  let traffic: Traffic | null = null;
  const dpArgs = () => ['--dataplane', `netns:${lab!.dataplane}`];
  const dpStatus = async () => (await unaryCall<{ dataplane: DataPlaneStatusView }>(up, 'Status', {})).dataplane;
  const write = (b: { records: Buffer; count: number }) =>
    unaryCall(ck, 'Write', { sessionId, table: 'fib', seq: seq + 1, records: b.records, count: b.count });
  const programmed = () =>
    until(
      'the FIB programmed',
      async () => {
        const d = await dpStatus();
        return d.programmedSeq === d.tableSeq && d.pending === 0;
      },
      30_000,
      50,
    );

  async function connect(): Promise<void> {
    ck = rawClient('hitless.v1.Checkpoint', agent.socket);
    up = rawClient('hitless.v1.Upgrade', agent.socket);
    const r = await registerRaw(ck, registration({ tables: FIB_TABLES, rejoin: seq > 0 }));
    sessionId = r.registered.sessionId;
    session = r.call;
    session.on('error', () => undefined);
  }

  before(async function () {
    const can = netLabAvailable();
    if (!can.ok) {
      // Not a pass: mocha reports it as pending, with the reason.
      this.skip();
    }
    lab = createNetLab();
    agent = await startAgent({ args: dpArgs() });
    await connect();
  });

  after(async () => {
    traffic?.kill();
    session?.cancel();
    await stopAllAgents();
    lab?.remove();
  });

  it('programs the routes the active publishes, and packets follow them (IPv4 and IPv6)', async () => {
    const b = fibBatch((rb) => {
      for (const r of fibRoutes(200)) rb.put(r.key, 1, r.value);
    });
    await write(b);
    seq++;
    await programmed();
    const routes = kernelRoutes(lab!.dataplane);
    assert.equal(routes.size, 200);
    assert.match(routes.get('198.18.0.0/24')!, /^via 198\.51\.100\.2 dev port2/);
    assert.match(routes.get('2001:db8:100:63::/64')!, /^via 2001:db8:2::2 dev port2/);
    const d = await dpStatus();
    assert.equal(d.routes, 200);
    assert.equal(d.failureCount, 0);
    assert.equal(d.table, 'bgp/fib');

    traffic = await startTraffic(lab!, trafficTargets(200), 5000);
    await new Promise((r) => setTimeout(r, 1500));
    const t = await traffic.stop();
    traffic = null;
    assert.ok(t.packetsSent >= 5000, `sent ${t.packetsSent}`);
    assert.equal(t.packetsLost, 0, JSON.stringify(t));
  });

  it('sends nothing anywhere without a route: a destination the FIB lacks gets no packet through', async () => {
    // 198.19.255.1 is inside the receiver's range but no route covers it.
    traffic = await startTraffic(lab!, ['198.19.255.1'], 1000);
    await new Promise((r) => setTimeout(r, 500));
    const t = await traffic.stop();
    traffic = null;
    assert.ok(t.packetsSent > 0);
    assert.equal(t.packetsReceived, 0);
  });

  it('refuses a bad entry with INVALID_ARGUMENT naming it, and changes nothing', async () => {
    const before = kernelRoutes(lab!.dataplane);
    const good = (rb: RecordBuilder) => rb.put('198.19.0.0/24', 1, entry('198.51.100.2', 'port2'));
    const cases: [string, (rb: RecordBuilder) => void, RegExp][] = [
      [
        'host bits',
        (rb) => rb.put('198.19.1.1/24', 1, entry('198.51.100.2', 'port2')),
        /entry '198\.19\.1\.1\/24'.*host bits set: write it as '198\.19\.1\.0\/24'/,
      ],
      ['not an address', (rb) => rb.put('300.1.1.0/24', 1, entry('198.51.100.2', 'port2')), /entry '300\.1\.1\.0\/24'.*not an IPv4 or IPv6 address/],
      ['IPv6 spelling', (rb) => rb.put('2001:DB8:100::/64', 1, entry('2001:db8:2::2', 'port2')), /write it as '2001:db8:100::\/64'/],
      [
        'unknown interface',
        (rb) => rb.put('198.19.2.0/24', 1, entry('198.51.100.2', 'port9')),
        /entry '198\.19\.2\.0\/24'.*interface 'port9' is not a port of the data plane \(ports: .*port2/,
      ],
      [
        'unreachable next hop',
        (rb) => rb.put('198.19.3.0/24', 1, entry('10.0.0.1', 'port2')),
        /entry '198\.19\.3\.0\/24'.*next hop 10\.0\.0\.1 cannot be reached: it is in no subnet of port2 \(198\.51\.100\.1\/24/,
      ],
      ['other family', (rb) => rb.put('198.19.4.0/24', 1, entry('2001:db8:2::2', 'port2')), /not an IPv4 address/],
      // A FibEntry with only a field this version does not know (4): it decodes, with no next hop.
      ['no next hop', (rb) => rb.put('198.19.5.0/24', 1, Buffer.from([0x20, 0x01])), /no next hop/],
      ['not a FibEntry', (rb) => rb.put('198.19.6.0/24', 1, Buffer.from([0x0a, 0x50])), /not a FibEntry/],
    ];
    for (const [what, bad, msg] of cases) {
      const b = fibBatch((rb) => {
        good(rb);
        bad(rb);
      });
      const err = await expectStatus(write(b), grpc.status.INVALID_ARGUMENT, msg).catch((e: Error) => {
        throw new Error(`${what}: ${e.message}`);
      });
      assert.match(err.details, /nothing was applied/, what);
    }
    const d = await dpStatus();
    assert.equal(d.tableSeq, seq, 'no refused batch was stored');
    assert.deepEqual(kernelRoutes(lab!.dataplane), before, 'the data plane is unchanged');
  });

  it('takes routes through a port created while it runs, once the kernel has announced the port', async () => {
    const ns = lab!.dataplane;
    const route = fibBatch((rb) => rb.put('198.19.7.0/24', 1, entry('198.51.107.2', 'port7')));
    await expectStatus(write(route), grpc.status.INVALID_ARGUMENT, /interface 'port7' is not a port of the data plane/);
    // A veth pair with both ends in the namespace (this kernel may lack the dummy driver).
    execFileSync('ip', ['-n', ns, 'link', 'add', 'port7', 'type', 'veth', 'peer', 'name', 'port7-peer']);
    try {
      execFileSync('ip', ['-n', ns, 'addr', 'add', '198.51.107.1/24', 'dev', 'port7']);
      execFileSync('ip', ['-n', ns, 'link', 'set', 'port7-peer', 'up']);
      execFileSync('ip', ['-n', ns, 'link', 'set', 'port7', 'up']);
      // The agent reads its ports again when the kernel announces a change, never on the write
      // path: until then the port is unknown and the write refused, as above.
      await until(
        'a route through port7 taken',
        () =>
          write(route).then(
            () => true,
            (e: grpc.ServiceError) => {
              if (!/'port7' is not a port/.test(e.details)) throw e;
              return false;
            },
          ),
        10_000,
        50,
      );
      seq++;
      await programmed();
      assert.match(kernelRoutes(ns).get('198.19.7.0/24') ?? '', /^via 198\.51\.107\.2 dev port7/);
      // Withdrawn again, so the tests after this one see the table they expect.
      await write(fibBatch((rb) => rb.delete('198.19.7.0/24')));
      seq++;
      await programmed();
      assert.equal(kernelRoutes(ns).has('198.19.7.0/24'), false);
    } finally {
      execFileSync('ip', ['-n', ns, 'link', 'del', 'port7']);
    }
  });

  it('shows a route the kernel refused in status and the logs, and programs it once it can', async () => {
    execFileSync('ip', ['-n', lab!.dataplane, 'link', 'set', 'port2', 'down']);
    try {
      await write(fibBatch((rb) => rb.put('198.19.10.0/24', 1, entry('198.51.100.2', 'port2'))));
      seq++;
      await until('the refusal in status', async () => (await dpStatus()).failureCount === 1, 20_000, 50);
      const d = await dpStatus();
      assert.match(d.failures[0], /^198\.19\.10\.0\/24: .*invalid gateway/i);
      assert.match(agent.stderr(), /the data plane refused 1 route change/);
    } finally {
      execFileSync('ip', ['-n', lab!.dataplane, 'link', 'set', 'port2', 'up']);
    }
    // The retry (a reconciliation every 5 s while something is refused) programs it now. Setting
    // the port down dropped the kernel's routes through it; the reconciliation puts them back too.
    await until(
      'the refused route programmed',
      async () => (await dpStatus()).failureCount === 0 && kernelRoutes(lab!.dataplane).has('198.19.10.0/24'),
      30_000,
      100,
    );
    assert.equal(kernelRoutes(lab!.dataplane).size, 201);
  });

  it('keeps forwarding while the agent is killed and restarted, and the restart changes nothing', async () => {
    traffic = await startTraffic(lab!, trafficTargets(200), 5000);
    await new Promise((r) => setTimeout(r, 500));
    session?.cancel();
    await agent.kill9();
    await new Promise((r) => setTimeout(r, 1000));
    agent = await startAgent({ stateDir: agent.stateDir, args: dpArgs() });
    await connect();
    const d = await dpStatus();
    assert.equal(d.lastReconcile?.cause, 'agent start');
    assert.deepEqual(
      [d.lastReconcile?.routes, d.lastReconcile?.added, d.lastReconcile?.replaced, d.lastReconcile?.deleted],
      [201, 0, 0, 0],
      JSON.stringify(d.lastReconcile),
    );
    await new Promise((r) => setTimeout(r, 500));
    const t = await traffic.stop();
    traffic = null;
    assert.equal(t.packetsLost, 0, JSON.stringify(t));
  });

  it('repairs what changed behind its back while it was down, and only that', async () => {
    session?.cancel();
    await agent.kill9();
    const dp = lab!.dataplane;
    execFileSync('ip', ['-n', dp, 'route', 'del', '198.18.5.0/24', 'proto', String(ROUTE_PROTO)]);
    execFileSync('ip', ['-n', dp, 'route', 'replace', '198.18.6.0/24', 'via', '192.0.2.2', 'dev', 'port1', 'proto', String(ROUTE_PROTO)]);
    execFileSync('ip', ['-n', dp, 'route', 'add', '198.19.99.0/24', 'via', '198.51.100.2', 'dev', 'port2', 'proto', String(ROUTE_PROTO)]);
    // Not ours (another protocol number): never read, never removed.
    execFileSync('ip', ['-n', dp, 'route', 'add', '198.19.98.0/24', 'via', '198.51.100.2', 'dev', 'port2', 'proto', 'static']);
    agent = await startAgent({ stateDir: agent.stateDir, args: dpArgs() });
    await connect();
    const r = (await dpStatus()).lastReconcile!;
    assert.deepEqual([r.added, r.replaced, r.deleted, r.failed], [1, 1, 1, 0], JSON.stringify(r));
    const routes = kernelRoutes(dp);
    assert.equal(routes.size, 201);
    assert.match(routes.get('198.18.6.0/24')!, /^via 198\.51\.100\.2 dev port2/);
    assert.ok(!routes.has('198.19.99.0/24'));
    assert.match(execFileSync('ip', ['-n', dp, 'route', 'show', '198.19.98.0/24'], { encoding: 'utf8' }), /proto static/);
  });

  it('refuses a second FIB table, from another process, with FAILED_PRECONDITION', async () => {
    await expectStatus(
      registerRaw(ck, registration({ process: 'ospf', instanceId: 'ospf@vm1', tables: [{ name: 'routes', durability: 'ASYNC', kind: 'FIB' }] })),
      grpc.status.FAILED_PRECONDITION,
      /'bgp\/fib' already feeds the data plane/,
    );
  });

  it('says clearly when it cannot program the data plane, and replicates FIB tables all the same', async () => {
    const other = await startAgent({ args: ['--dataplane', 'netns:hl-no-such-namespace'] });
    try {
      const u = rawClient('hitless.v1.Upgrade', other.socket);
      const d = (await unaryCall<{ dataplane: DataPlaneStatusView }>(u, 'Status', {})).dataplane;
      assert.equal(d.available, false);
      assert.match(d.detail, /network namespace hl-no-such-namespace cannot be read: .*ip netns add hl-no-such-namespace/);
      assert.match(other.stderr(), /the data plane cannot be programmed/);
      const c = rawClient('hitless.v1.Checkpoint', other.socket);
      const r = await registerRaw(c, registration({ tables: FIB_TABLES }));
      const b = fibBatch((rb) => rb.put('198.18.0.0/24', 1, entry('198.51.100.2', 'port2')));
      await unaryCall(c, 'Write', { sessionId: r.registered.sessionId, table: 'fib', seq: 1, records: b.records, count: b.count });
      // The format is still checked.
      const bad = fibBatch((rb) => rb.put('198.18.0.1/24', 1, entry('198.51.100.2', 'port2')));
      await expectStatus(
        unaryCall(c, 'Write', { sessionId: r.registered.sessionId, table: 'fib', seq: 2, records: bad.records, count: bad.count }),
        grpc.status.INVALID_ARGUMENT,
        /host bits/,
      );
      r.call.cancel();
    } finally {
      await other.stop();
    }
  });

  it('programs a table larger than one programming operation, and a CLEAR removes every route it programmed', async () => {
    // 60,000 routes: more than one flush takes (50,000), so the rest follows in a second one.
    const prefixes = Array.from({ length: 60_000 }, (_, i) => `240.${i >> 8}.${i & 255}.0/24`);
    const value = entry('198.51.100.2', 'port2');
    for (let i = 0; i < prefixes.length; i += 5000) {
      await write(fibBatch((rb) => prefixes.slice(i, i + 5000).forEach((p) => rb.put(p, 1, value))));
      seq++;
    }
    await until(
      '60,201 routes programmed',
      async () => {
        const d = await dpStatus();
        return d.programmedSeq === d.tableSeq && d.pending === 0 ? d : undefined;
      },
      90_000,
      100,
    );
    assert.equal(kernelRoutes(lab!.dataplane).size, 60_201);
    await write(fibBatch((rb) => rb.clear()));
    seq++;
    await until('nothing left', async () => kernelRoutes(lab!.dataplane).size === 0, 90_000, 200);
    const d = await dpStatus();
    assert.deepEqual([d.routes, d.failureCount, d.lastReconcile?.cause, d.lastReconcile?.deleted], [0, 0, 'the table was cleared', 60_201]);
  });
});
