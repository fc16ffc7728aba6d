/**
 * LinuxDataPlane on a real network namespace of its own: routes programmed through `ip -batch`
 * and read back through `ip route show`, both started by the command runner, single-hop and
 * multipath, compared as a reconciliation compares them.
 *
 * Needs root (namespaces); the namespace is removed in `after`, also when a test fails.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import { FibEntry, nextHopsKey } from '../../agent/dataplane/fib-entry';
import { LinuxDataPlane } from '../../agent/dataplane/linux-data-plane';
import { netLabAvailable } from '../../harness/netlab';

const ip = (args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] });

describe('LinuxDataPlane (a network namespace of its own)', function () {
  this.timeout(30_000);
  const ns = `hl-ldp-${crypto.randomBytes(3).toString('hex')}`;
  let dp: LinuxDataPlane;

  before(function () {
    const can = netLabAvailable();
    if (!can.ok) this.skip();
    ip(['netns', 'add', ns]);
    ip(['-n', ns, 'link', 'add', 'port1', 'type', 'veth', 'peer', 'name', 'port1-peer']);
    ip(['-n', ns, 'addr', 'add', '10.9.0.1/24', 'dev', 'port1']);
    ip(['-n', ns, 'addr', 'add', '2001:db8:9::1/64', 'dev', 'port1', 'nodad']);
    ip(['-n', ns, 'link', 'set', 'port1-peer', 'up']);
    ip(['-n', ns, 'link', 'set', 'port1', 'up']);
    dp = new LinuxDataPlane(ns);
  });

  after(() => {
    try {
      ip(['netns', 'del', ns]);
    } catch {
      // never created (skipped)
    }
  });

  it('reads back what it programmed, multipath included, as the keys a reconciliation compares', async () => {
    const hop = (gateway: string, weight = 1) => ({ gateway, interface: 'port1', weight });
    const wanted = new Map<string, FibEntry>([
      ['198.18.1.0/24', { nextHops: [hop('10.9.0.2')] }],
      ['198.18.2.0/24', { nextHops: [hop('10.9.0.3', 2), hop('10.9.0.2', 1)] }],
      ['2001:db8:100::/48', { nextHops: [hop('2001:db8:9::2')] }],
      ['2001:db8:200::/48', { nextHops: [hop('2001:db8:9::2', 3), hop('2001:db8:9::3', 1)] }],
    ]);
    const r = await dp.apply([...wanted].map(([prefix, entry]) => ({ prefix, entry })));
    assert.deepEqual(r, { applied: 4, failed: [] });
    // Someone else's route in the namespace is never read as ours.
    ip(['-n', ns, 'route', 'add', '198.18.3.0/24', 'via', '10.9.0.2']);
    const held = await dp.readRoutes();
    assert.deepEqual([...held].sort(), [...wanted].map(([p, e]) => [p, nextHopsKey(e.nextHops)]).sort());
    // Next hops in another order are the same set.
    assert.equal(held.get('198.18.2.0/24'), nextHopsKey([hop('10.9.0.2', 1), hop('10.9.0.3', 2)]));
  });

  it('names each route the kernel refused, and removes what it was asked to', async () => {
    const r = await dp.apply([
      { prefix: '198.18.1.0/24', entry: null },
      { prefix: '198.18.4.0/24', entry: { nextHops: [{ gateway: '10.8.0.2', interface: 'port1', weight: 1 }] } },
      { prefix: '198.18.9.0/24', entry: null }, // never there: removing it is what was wanted
    ]);
    assert.equal(r.applied, 2);
    assert.deepEqual(
      r.failed.map((f) => f.prefix),
      ['198.18.4.0/24'],
    );
    const held = await dp.readRoutes();
    assert.equal(held.has('198.18.1.0/24'), false);
    assert.equal(held.has('198.18.4.0/24'), false);
  });
});
