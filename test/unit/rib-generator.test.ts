/**
 * rib-generator.test.ts — unit tests for examples/bgp-rib/rib-generator.ts:
 * uniqueness, determinism, prefix-length mix, value size and the
 * path-attribute encoding round trip.
 */
import assert from 'node:assert/strict';
import {
  createRng,
  decodePathAttributes,
  encodePathAttributes,
  generateRib,
  mutateRoute,
  Origin,
  PathAttributes,
  RibRoute,
} from '../../examples/bgp-rib/rib-generator';

const PREFIX_RE = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/;

describe('rib-generator', function () {
  // 1M routes take ~0.5 s to generate; the Set of keys adds a bit.
  this.timeout(60_000);

  describe('generateRib', () => {
    it('yields 1,000,000 unique, well-formed prefixes with the real length mix', () => {
      const n = 1_000_000;
      const keys = new Set<string>();
      const byLen = new Array<number>(33).fill(0);
      let valueBytes = 0;
      let checked = 0;
      for (const r of generateRib(n, { seed: 7 })) {
        keys.add(r.key);
        valueBytes += r.value.length;
        const m = PREFIX_RE.exec(r.key);
        assert.ok(m, `malformed key ${r.key}`);
        const len = Number(m[5]);
        byLen[len]++;
        // Spot-check structure on a sample: host bits zero, no bogon first octets.
        if (checked < 20_000) {
          checked++;
          const o = [m[1], m[2], m[3], m[4]].map(Number);
          const addr = ((o[0] << 24) | (o[1] << 16) | (o[2] << 8) | o[3]) >>> 0;
          const hostMask = len === 32 ? 0 : 0xffffffff >>> len;
          assert.equal((addr & hostMask) >>> 0, 0, `host bits set in ${r.key}`);
          assert.ok(o[0] >= 1 && o[0] <= 223 && o[0] !== 10 && o[0] !== 127, `bogon ${r.key}`);
        }
      }
      assert.equal(keys.size, n, 'keys must be unique');
      const share24 = byLen[24] / n;
      assert.ok(share24 > 0.57 && share24 < 0.63, `/24 share ${share24}`);
      assert.ok(byLen[22] > byLen[20] && byLen[20] > byLen[16] && byLen[16] > byLen[8], 'length ordering');
      assert.ok(byLen[8] > 0, 'some /8s');
      for (let l = 0; l < 8; l++) assert.equal(byLen[l], 0);
      for (let l = 25; l <= 32; l++) assert.equal(byLen[l], 0);
      assert.equal(valueBytes / n, 100, 'values padded to the 100-byte default');
    });

    it('is deterministic for a seed and differs across seeds', () => {
      const take = (seed: number): RibRoute[] => [...generateRib(5_000, { seed })];
      const a = take(123);
      const b = take(123);
      const c = take(124);
      assert.equal(a.length, 5_000);
      for (let i = 0; i < a.length; i++) {
        assert.equal(a[i].key, b[i].key);
        assert.ok(a[i].value.equals(b[i].value), `value ${i} differs`);
      }
      const same = a.filter((r, i) => r.key === c[i].key).length;
      assert.ok(same < 50, `seeds 123 and 124 share ${same} keys at the same position`);
    });

    it('honours valueBytes and produces decodable values', () => {
      for (const size of [66, 100, 150, 300, 1000]) {
        let n = 0;
        for (const r of generateRib(2_000, { seed: 3, valueBytes: size })) {
          assert.equal(r.value.length, size);
          const a = decodePathAttributes(r.value);
          assert.ok(a.asPath.length >= 2 && a.asPath.length <= 6, `path length ${a.asPath.length}`);
          assert.match(a.nextHop, /^\d+\.\d+\.\d+\.\d+$/);
          assert.ok(a.med !== undefined && a.localPref !== undefined);
          assert.ok(a.communities.length >= 1 && a.communities.length <= 4);
          n++;
        }
        assert.equal(n, 2_000);
      }
      // Below the mandatory attributes' size the value is just as long as needed.
      for (const r of generateRib(100, { seed: 3, valueBytes: 16 })) {
        assert.ok(r.value.length > 16 && r.value.length <= 66);
        decodePathAttributes(r.value);
      }
    });

    it('handles 1,200,000 routes and small counts', () => {
      let n = 0;
      for (const _ of generateRib(1_200_000, { seed: 1 })) n++;
      assert.equal(n, 1_200_000);
      assert.equal([...generateRib(0)].length, 0);
      assert.equal([...generateRib(1)].length, 1);
      assert.equal(new Set([...generateRib(1000)].map((r) => r.key)).size, 1000);
    });

    it('rejects bad arguments', () => {
      assert.throws(() => generateRib(-1).next(), RangeError);
      assert.throws(() => generateRib(1.5).next(), RangeError);
      assert.throws(() => generateRib(10, { valueBytes: 0 }).next(), RangeError);
      assert.throws(() => generateRib(100_000_000).next(), RangeError);
    });
  });

  describe('encodePathAttributes / decodePathAttributes', () => {
    const attrs: PathAttributes = {
      origin: Origin.EGP,
      asPath: [64512, 4200000000, 3356, 13335],
      nextHop: '192.0.2.254',
      med: 4294967295,
      localPref: 150,
      communities: [((65000 << 16) | 666) >>> 0, 0xffffff01],
      largeCommunities: [[4200000000, 1, 2]],
    };

    it('round-trips, with and without padding', () => {
      const plain = encodePathAttributes(attrs);
      assert.deepEqual(decodePathAttributes(plain), attrs);
      for (const padTo of [plain.length + 1, plain.length + 2, plain.length + 300, 1000]) {
        const padded = encodePathAttributes(attrs, { padTo });
        assert.equal(padded.length, padTo);
        assert.deepEqual(decodePathAttributes(padded), attrs);
      }
      // padTo smaller than needed: not truncated.
      assert.equal(encodePathAttributes(attrs, { padTo: 10 }).length, plain.length);
    });

    it('round-trips optional attributes left out', () => {
      const minimal: PathAttributes = {
        origin: Origin.IGP,
        asPath: [],
        nextHop: '10.0.0.1',
        communities: [],
        largeCommunities: [],
      };
      assert.deepEqual(decodePathAttributes(encodePathAttributes(minimal)), minimal);
    });

    it('re-encodes generated values byte for byte', () => {
      for (const r of generateRib(1_000, { seed: 11 })) {
        const again = encodePathAttributes(decodePathAttributes(r.value), { padTo: r.value.length });
        assert.deepEqual(decodePathAttributes(again), decodePathAttributes(r.value));
        assert.equal(again.length, r.value.length);
      }
    });

    it('rejects malformed input', () => {
      const good = encodePathAttributes(attrs);
      assert.throws(() => decodePathAttributes(Buffer.alloc(0)));
      assert.throws(() => decodePathAttributes(Buffer.from([2])));
      assert.throws(() => decodePathAttributes(good.subarray(0, good.length - 3)));
      assert.throws(() => encodePathAttributes({ ...attrs, nextHop: '1.2.3' }), RangeError);
      assert.throws(() => encodePathAttributes({ ...attrs, asPath: [2 ** 32] }), RangeError);
    });
  });

  describe('mutateRoute', () => {
    it('changes the value, keeps key and size, stays decodable and deterministic', () => {
      const routes = [...generateRib(5_000, { seed: 5 })];
      const run = (): RibRoute[] => {
        const rng = createRng(99);
        return routes.map((r) => mutateRoute(r, rng));
      };
      const m1 = run();
      const m2 = run();
      for (let i = 0; i < routes.length; i++) {
        assert.equal(m1[i].key, routes[i].key);
        assert.equal(m1[i].value.length, routes[i].value.length);
        assert.ok(!m1[i].value.equals(routes[i].value), `route ${i} unchanged`);
        assert.ok(m1[i].value.equals(m2[i].value));
        decodePathAttributes(m1[i].value);
      }
    });
  });
});
