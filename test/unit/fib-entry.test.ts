/**
 * FIB records as the proto describes them: canonical prefix keys, the FibEntry wire format (read
 * back by protobufjs, the reference decoder, so a third-party writer and the agent agree), and the
 * iproute2 batch lines and errors the Linux data plane works with.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import protobuf from 'protobufjs';
import { addressBytes, addressText, decodeFibEntry, encodeFibEntry, parsePrefix, prefixFamily, sameFibEntry } from '../../agent/dataplane/fib-entry';
import { parseBatchErrors, routeCommand } from '../../agent/dataplane/linux-data-plane';
import { fibRoutes, trafficTargets } from '../../examples/common/fib-routes';

const PROTO_DIR = path.resolve(__dirname, '../../../proto');

describe('FIB records', () => {
  it('accepts canonical prefixes of both families and names the canonical form of any other spelling', () => {
    for (const k of ['198.18.5.0/24', '0.0.0.0/0', '10.1.2.3/32', '2001:db8:100:5::/64', '::/0', '2001:db8::1/128', 'fe80::/10', '2001:db8:0:1:1:1:1:1/128']) {
      assert.equal(parsePrefix(k).text, k);
    }
    const wrong: [string, RegExp][] = [
      ['198.18.5.1/24', /has host bits set: write it as '198\.18\.5\.0\/24'/],
      ['2001:DB8::/32', /not in canonical form: write it as '2001:db8::\/32'/],
      ['2001:db8:0:0:1:0:0:0/80', /write it as '2001:db8:0:0:1::\/80'/],
      ['2001:db8:100:0::/64', /write it as '2001:db8:100::\/64'/],
      ['198.18.5.0/024', /length must be 0\.\.32/],
      ['198.18.5.0/33', /length must be 0\.\.32/],
      ['198.18.5.0', /not a prefix: write ADDRESS\/LENGTH/],
      ['198.18.5.0/', /length must be/],
      ['example.com/24', /not an IPv4 or IPv6 address/],
    ];
    for (const [k, msg] of wrong) assert.throws(() => parsePrefix(k), msg, k);
  });

  it("prefixFamily (the write path's check) accepts and refuses exactly what parsePrefix does, with its message", () => {
    const outcome = (f: () => number) => {
      try {
        return `family ${f()}`;
      } catch (e) {
        return (e as Error).message;
      }
    };
    // Edge cases first, then random spellings near the canonical form.
    const keys = ['0.0.0.0/0', '255.255.255.255/32', '10.0.0.0/8', '10.0.0.1/8', '10.0.0.0/08', '010.0.0.0/8', '10.0.0.0/33', '10.0.0.0/', '10.0.0/24'];
    keys.push(
      '1.2.3.4/32',
      '128.0.0.0/1',
      '192.0.2.0/23',
      '256.0.0.0/8',
      '10.0.0.0/8x',
      '10.0.0.0.0/8',
      '1.2.3.4',
      '',
      '/8',
      '2001:db8::/32',
      '::/0',
      '1000.0.0.0/8',
    );
    let seed = 7;
    const rand = (n: number) => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n;
    const pieces = ['0', '00', '1', '10', '127', '192', '255', '256', '999', '01', ''];
    for (let i = 0; i < 20_000; i++) {
      const o = () => pieces[rand(pieces.length)];
      const len = ['0', '1', '8', '16', '23', '24', '25', '31', '32', '33', '08', ''][rand(12)];
      keys.push(`${o()}.${o()}.${o()}.${o()}/${len}`);
    }
    // IPv6: groups near the canonical spelling (zero runs, leading zeros, case), with and
    // without "::", and lengths that do and do not cover the bits set.
    keys.push('::/0', '::1/128', '1::/16', '2001:db8::/32', '2001:db8:0:0:1::/80', '2001:db8::1:0:0:1/128', '2001:0:0:1::1/128', '2001:db8:0:1:1:1:1:1/128');
    keys.push(
      '1:0:0:1::1:1/128',
      '1::1:0:0:1:1/128',
      '2001:DB8::/32',
      '2001:db8::0/128',
      '2001:db8:0::/48',
      '1:0:0:2:0:0:0:3/128',
      '1:0:0:0:2:0:0:3/128',
      '1::2:0:0:3/128',
      '::ffff:1.2.3.4/128',
    );
    const groups = ['0', '0', '0', '1', '2', 'a', 'db8', '2001', 'ffff', 'fe80', 'abcd', '00', '01', 'F', '10000', ''];
    for (let i = 0; i < 20_000; i++) {
      const n = 2 + rand(7);
      const g = Array.from({ length: n }, () => groups[rand(groups.length)]);
      if (rand(3) > 0) g.splice(rand(n + 1), 0, ''); // a "::" somewhere (or a stray ':')
      let text = g.join(':');
      if (text.startsWith(':') && !text.startsWith('::')) text = `:${text}`;
      if (text.endsWith(':') && !text.endsWith('::')) text = `${text}:`;
      const len = ['0', '1', '16', '32', '48', '63', '64', '65', '96', '112', '127', '128', '128', '128', '129', '064'][rand(16)];
      keys.push(`${text}/${len}`);
    }
    // Canonical addresses (addressText of random groups, zero runs likely), as written and
    // spelled slightly off: the long form of "::", a leading zero, upper case.
    for (let i = 0; i < 20_000; i++) {
      const b = Buffer.alloc(16);
      for (let g = 0; g < 8; g++) b.writeUInt16BE(rand(3) === 0 ? [1, 0xdb8, 0xfe80, 0x2001, 0xabcd][rand(5)] : 0, g * 2);
      const canon = addressText(b);
      const len = [16, 32, 48, 64, 80, 96, 112, 128, 128, 128][rand(10)];
      const text = [canon, canon.replace('::', ':0:0:'), canon.replace(/:(\w)/, ':0$1'), canon.toUpperCase(), canon, canon][rand(6)];
      keys.push(`${text}/${len}`);
    }
    let accepted = 0;
    let accepted6 = 0;
    for (const k of keys) {
      const want = outcome(() => parsePrefix(k).family);
      assert.equal(
        outcome(() => prefixFamily(k)),
        want,
        k,
      );
      if (want.startsWith('family')) accepted++;
      if (want === 'family 6') accepted6++;
    }
    assert.ok(accepted6 > 300, `IPv6 prefixes accepted: ${accepted6}`);
    assert.ok(accepted > 500 && accepted < keys.length - 500, `both outcomes are exercised (${accepted} of ${keys.length} accepted)`);
  });

  it('writes addresses as inet_ntop does (the longest run of zero groups becomes ::, the first on a tie)', () => {
    const cases: [string, string][] = [
      ['2001:0db8:0000:0000:0001:0000:0000:0001', '2001:db8::1:0:0:1'],
      ['0:0:0:0:0:0:0:0', '::'],
      ['1:0:0:2:0:0:0:3', '1:0:0:2::3'],
      ['1:0:2:3:4:5:6:7', '1:0:2:3:4:5:6:7'],
      ['::ffff:192.0.2.1', '::ffff:c000:201'],
    ];
    for (const [input, want] of cases) assert.equal(addressText(addressBytes(input)!), want, input);
  });

  it('encodes FibEntry so protobufjs reads it from the proto, and reads what protobufjs writes', async () => {
    const root = await protobuf.load(path.join(PROTO_DIR, 'hitless/v1/checkpoint.proto'));
    const T = root.lookupType('hitless.v1.FibEntry');
    const e = {
      nextHops: [
        { gateway: '198.51.100.2', interface: 'port2', weight: 1 },
        { gateway: '', interface: 'port3', weight: 7 },
      ],
    };
    const ours = encodeFibEntry(e);
    const theirs = T.toObject(T.decode(ours), { defaults: true }) as { nextHops: { gateway: string; interface: string; weight: number }[] };
    assert.deepEqual(
      theirs.nextHops.map((h) => [h.gateway, h.interface, h.weight || 1]),
      [
        ['198.51.100.2', 'port2', 1],
        ['', 'port3', 7],
      ],
    );
    const written = Buffer.from(T.encode(T.fromObject({ nextHops: [{ gateway: '2001:db8:2::2', interface: 'port2', weight: 3 }] })).finish());
    assert.deepEqual(decodeFibEntry(written), { nextHops: [{ gateway: '2001:db8:2::2', interface: 'port2', weight: 3 }] });
    assert.throws(() => decodeFibEntry(Buffer.from([0x0a, 0x09, 0x12])), /truncated/);
    assert.ok(sameFibEntry(decodeFibEntry(ours), { nextHops: [...e.nextHops].reverse() }), 'next hops compare as a set');
  });

  it('turns changes into ip -batch lines and reads back which line failed and why', () => {
    assert.equal(
      routeCommand({ prefix: '198.18.0.0/24', entry: { nextHops: [{ gateway: '198.51.100.2', interface: 'port2', weight: 1 }] } }),
      'route replace 198.18.0.0/24 proto 201 via 198.51.100.2 dev port2',
    );
    assert.equal(
      routeCommand({
        prefix: '198.18.1.0/24',
        entry: {
          nextHops: [
            { gateway: '198.51.100.2', interface: 'port2', weight: 1 },
            { gateway: '', interface: 'port3', weight: 2 },
          ],
        },
      }),
      'route replace 198.18.1.0/24 proto 201 nexthop via 198.51.100.2 dev port2 weight 1 nexthop dev port3 weight 2',
    );
    assert.equal(routeCommand({ prefix: '2001:db8::/32', entry: null }), 'route del 2001:db8::/32 proto 201');
    const errs = parseBatchErrors('Error: Nexthop has invalid gateway.\nCommand failed -:3\nRTNETLINK answers: No such process\nCommand failed -:5\n');
    assert.deepEqual(
      [...errs],
      [
        [3, 'Error: Nexthop has invalid gateway.'],
        [5, 'RTNETLINK answers: No such process'],
      ],
    );
  });

  it("the example daemon's FIB: canonical keys, and one traffic target inside each route", () => {
    const routes = [...fibRoutes(1000)];
    assert.equal(new Set(routes.map((r) => r.key)).size, 1000);
    for (const r of routes) assert.equal(parsePrefix(r.key).text, r.key);
    const targets = trafficTargets(1000);
    routes.forEach((r, i) => {
      const p = parsePrefix(r.key);
      const a = addressBytes(targets[i])!;
      assert.equal(a.length, p.bytes.length);
      assert.ok(a.subarray(0, p.length / 8).equals(p.bytes.subarray(0, p.length / 8)), `${targets[i]} in ${r.key}`);
    });
    assert.throws(() => [...fibRoutes(1025)], /at most 1024/);
  });
});
