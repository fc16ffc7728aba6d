/**
 * rib-generator.ts — owns the synthetic IPv4 BGP table used by the example
 * routing daemon, the checkpoint benchmark and the tests.
 *
 * It provides:
 *  - a compact binary TLV encoding of BGP path attributes
 *    (`encodePathAttributes` / `decodePathAttributes`, `PathAttributes`);
 *  - `generateRib(count, opts)`: a deterministic (per seed) stream of unique
 *    IPv4 prefixes with today's Internet prefix-length mix, each carrying an
 *    encoded attribute blob of a target size (default 100 bytes);
 *  - `mutateRoute(route, rng)`: a changed value for an existing key, for
 *    incremental-update load generators;
 *  - `createRng(seed)`: the small PRNG (mulberry32) everything above uses.
 *
 * No dependencies beyond Node's Buffer. Speed matters (benchmarks generate
 * 1M+ routes), so the hot path writes straight into shared slabs and builds
 * keys from precomputed strings.
 */

// ---------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------

/** A PRNG: each call returns a uniform unsigned 32-bit integer. */
export type Rng = () => number;

/** mulberry32: tiny, fast, good enough statistically for synthetic data. */
export function createRng(seed: number): Rng {
  let a = seed >>> 0;
  return (): number => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/** Uniform integer in [0, n) for n <= 2^32 (bias < n / 2^32, negligible here). */
function below(rng: Rng, n: number): number {
  return Math.floor((rng() / 4294967296) * n);
}

/**
 * Uniform integer in [0, n) for n <= 65536 using only integer ops
 * (high 16 bits scaled by n). Much cheaper than `%` on values >= 2^31,
 * which V8 does as a floating-point fmod.
 */
function small(rng: Rng, n: number): number {
  return ((rng() >>> 16) * n) >>> 16;
}

// ---------------------------------------------------------------------------
// Path attribute encoding
// ---------------------------------------------------------------------------

/** BGP ORIGIN values (RFC 4271). */
export const Origin = { IGP: 0, EGP: 1, INCOMPLETE: 2 } as const;
export type Origin = (typeof Origin)[keyof typeof Origin];

/** Decoded path attributes of one route. ASNs are 32-bit (RFC 6793). */
export interface PathAttributes {
  origin: Origin;
  /** AS_SEQUENCE, neighbour first, originating AS last. */
  asPath: number[];
  /** Dotted-quad IPv4 next hop. */
  nextHop: string;
  /** MULTI_EXIT_DISC; absent when the route carried none. */
  med?: number;
  /** LOCAL_PREF; absent when the route carried none. */
  localPref?: number;
  /** RFC 1997 communities, each packed as (high16 << 16 | low16) unsigned. */
  communities: number[];
  /** RFC 8092 large communities: [global admin, local data 1, local data 2]. */
  largeCommunities: Array<[number, number, number]>;
}

/*
 * Wire format (all integers big-endian):
 *
 *   byte 0        format version (= 1)
 *   then TLVs     type:u8 len:u8 data[len]   -- except PAD1, a lone 0x00 byte
 *
 * Type codes reuse BGP attribute type codes where one exists so a hex dump
 * reads naturally. Unknown types are skipped by the decoder.
 */
const FORMAT_VERSION = 1;
const T_PAD1 = 0; // single padding byte, no length (like TCP's NOP option)
const T_ORIGIN = 1; // 1 byte
const T_AS_PATH = 2; // n x u32
const T_NEXT_HOP = 3; // u32 (IPv4)
const T_MED = 4; // u32
const T_LOCAL_PREF = 5; // u32
const T_COMMUNITIES = 8; // n x u32
const T_LARGE_COMMUNITIES = 32; // n x 3 x u32
const T_PADN = 255; // len bytes of zeros

/** Maximum data bytes in one TLV (length is one byte). */
const TLV_MAX = 255;

/** Parse "a.b.c.d" into an unsigned 32-bit integer; throws on bad input. */
export function ipv4FromString(s: string): number {
  const parts = s.split('.');
  if (parts.length !== 4) throw new RangeError(`bad IPv4 address: ${s}`);
  let v = 0;
  for (const p of parts) {
    const o = Number(p);
    if (!/^\d{1,3}$/.test(p) || o > 255) throw new RangeError(`bad IPv4 address: ${s}`);
    v = v * 256 + o;
  }
  return v;
}

/** Format an unsigned 32-bit integer as "a.b.c.d". */
export function ipv4ToString(v: number): string {
  return `${v >>> 24}.${(v >>> 16) & 255}.${(v >>> 8) & 255}.${v & 255}`;
}

/** Format a packed RFC 1997 community as "high:low". */
export function formatCommunity(c: number): string {
  return `${c >>> 16}:${c & 0xffff}`;
}

/** One-line human-readable rendering, e.g. for the example daemon's `show route`. */
export function formatPathAttributes(a: PathAttributes): string {
  const origin = a.origin === Origin.IGP ? 'i' : a.origin === Origin.EGP ? 'e' : '?';
  const parts = [`via ${a.nextHop}`, `path ${a.asPath.join(' ')} ${origin}`];
  if (a.med !== undefined) parts.push(`med ${a.med}`);
  if (a.localPref !== undefined) parts.push(`lp ${a.localPref}`);
  if (a.communities.length > 0) parts.push(`comm ${a.communities.map(formatCommunity).join(' ')}`);
  if (a.largeCommunities.length > 0) {
    parts.push(`lcomm ${a.largeCommunities.map((l) => l.join(':')).join(' ')}`);
  }
  return parts.join(', ');
}

function checkU32(name: string, v: number): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw new RangeError(`${name} must be an unsigned 32-bit integer, got ${v}`);
  }
}

/** Bytes `encodePathAttributes` needs for `a` before padding. */
export function encodedAttributesLength(a: PathAttributes): number {
  let n = 1 + 3 + 6; // version, ORIGIN, NEXT_HOP
  n += 2 + 4 * a.asPath.length;
  if (a.med !== undefined) n += 6;
  if (a.localPref !== undefined) n += 6;
  if (a.communities.length > 0) n += 2 + 4 * a.communities.length;
  if (a.largeCommunities.length > 0) n += 2 + 12 * a.largeCommunities.length;
  return n;
}

/** Write padding of exactly `n` bytes at `pos`; returns the new position. */
function writePadding(buf: Buffer, pos: number, n: number): number {
  while (n >= 2) {
    const len = Math.min(n - 2, TLV_MAX);
    buf[pos] = T_PADN;
    buf[pos + 1] = len;
    for (let i = pos + 2; i < pos + 2 + len; i++) buf[i] = 0; // short: a loop beats fill()
    pos += 2 + len;
    n -= 2 + len;
  }
  if (n === 1) buf[pos++] = T_PAD1;
  return pos;
}

/**
 * Encode attributes. With `padTo`, the result is padded to exactly `padTo`
 * bytes when the attributes fit; otherwise it is just as long as needed.
 */
export function encodePathAttributes(a: PathAttributes, opts?: { padTo?: number }): Buffer {
  if (a.origin !== Origin.IGP && a.origin !== Origin.EGP && a.origin !== Origin.INCOMPLETE) {
    throw new RangeError(`bad origin ${String(a.origin)}`);
  }
  if (a.asPath.length * 4 > TLV_MAX) throw new RangeError('AS_PATH too long (max 63 ASNs)');
  if (a.communities.length * 4 > TLV_MAX) throw new RangeError('too many communities (max 63)');
  if (a.largeCommunities.length * 12 > TLV_MAX) throw new RangeError('too many large communities (max 21)');
  const need = encodedAttributesLength(a);
  const total = Math.max(need, opts?.padTo ?? 0);
  const buf = Buffer.allocUnsafe(total);
  let p = 0;
  buf[p++] = FORMAT_VERSION;
  buf[p++] = T_ORIGIN;
  buf[p++] = 1;
  buf[p++] = a.origin;
  buf[p++] = T_AS_PATH;
  buf[p++] = 4 * a.asPath.length;
  for (const asn of a.asPath) {
    checkU32('ASN', asn);
    p = buf.writeUInt32BE(asn, p);
  }
  buf[p++] = T_NEXT_HOP;
  buf[p++] = 4;
  p = buf.writeUInt32BE(ipv4FromString(a.nextHop), p);
  if (a.med !== undefined) {
    checkU32('MED', a.med);
    buf[p++] = T_MED;
    buf[p++] = 4;
    p = buf.writeUInt32BE(a.med, p);
  }
  if (a.localPref !== undefined) {
    checkU32('LOCAL_PREF', a.localPref);
    buf[p++] = T_LOCAL_PREF;
    buf[p++] = 4;
    p = buf.writeUInt32BE(a.localPref, p);
  }
  if (a.communities.length > 0) {
    buf[p++] = T_COMMUNITIES;
    buf[p++] = 4 * a.communities.length;
    for (const c of a.communities) {
      checkU32('community', c);
      p = buf.writeUInt32BE(c, p);
    }
  }
  if (a.largeCommunities.length > 0) {
    buf[p++] = T_LARGE_COMMUNITIES;
    buf[p++] = 12 * a.largeCommunities.length;
    for (const l of a.largeCommunities) {
      for (const v of l) {
        checkU32('large community', v);
        p = buf.writeUInt32BE(v, p);
      }
    }
  }
  p = writePadding(buf, p, total - p);
  return buf;
}

/** Decode a blob produced by `encodePathAttributes` or `generateRib`. */
export function decodePathAttributes(buf: Uint8Array): PathAttributes {
  const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  if (b.length < 1 || b[0] !== FORMAT_VERSION) {
    throw new Error(`unsupported path-attribute format version ${b.length > 0 ? b[0] : 'none'}`);
  }
  const out: PathAttributes = {
    origin: Origin.INCOMPLETE,
    asPath: [],
    nextHop: '0.0.0.0',
    communities: [],
    largeCommunities: [],
  };
  let sawOrigin = false;
  let sawNextHop = false;
  let p = 1;
  while (p < b.length) {
    const type = b[p];
    if (type === T_PAD1) {
      p += 1;
      continue;
    }
    if (p + 2 > b.length) throw new Error(`truncated TLV header at offset ${p}`);
    const len = b[p + 1];
    const d = p + 2;
    const end = d + len;
    if (end > b.length) throw new Error(`TLV type ${type} at offset ${p} overruns the buffer`);
    const needLen = (expected: number): void => {
      if (len !== expected) throw new Error(`TLV type ${type} has length ${len}, expected ${expected}`);
    };
    const needMultiple = (unit: number): void => {
      if (len % unit !== 0) throw new Error(`TLV type ${type} length ${len} is not a multiple of ${unit}`);
    };
    switch (type) {
      case T_ORIGIN:
        needLen(1);
        if (b[d] > Origin.INCOMPLETE) throw new Error(`bad origin ${b[d]}`);
        out.origin = b[d] as Origin;
        sawOrigin = true;
        break;
      case T_AS_PATH:
        needMultiple(4);
        for (let q = d; q < end; q += 4) out.asPath.push(b.readUInt32BE(q));
        break;
      case T_NEXT_HOP:
        needLen(4);
        out.nextHop = ipv4ToString(b.readUInt32BE(d));
        sawNextHop = true;
        break;
      case T_MED:
        needLen(4);
        out.med = b.readUInt32BE(d);
        break;
      case T_LOCAL_PREF:
        needLen(4);
        out.localPref = b.readUInt32BE(d);
        break;
      case T_COMMUNITIES:
        needMultiple(4);
        for (let q = d; q < end; q += 4) out.communities.push(b.readUInt32BE(q));
        break;
      case T_LARGE_COMMUNITIES:
        needMultiple(12);
        for (let q = d; q < end; q += 12) {
          out.largeCommunities.push([b.readUInt32BE(q), b.readUInt32BE(q + 4), b.readUInt32BE(q + 8)]);
        }
        break;
      default:
        break; // PADN and unknown types: skip
    }
    p = end;
  }
  if (!sawOrigin || !sawNextHop) throw new Error('path attributes lack ORIGIN or NEXT_HOP');
  return out;
}

// ---------------------------------------------------------------------------
// Prefix-length mix and address space
// ---------------------------------------------------------------------------

/*
 * Approximate share of each prefix length in today's global IPv4 table,
 * in routes per million (sums to 1,000,000). Longer than /24 is filtered
 * by nearly everyone, so it is left out.
 *
 *   len   per 1M   share
 *   /8        16   0.002%
 *   /9        14   0.001%
 *   /10       38   0.004%
 *   /11      105   0.01%
 *   /12      320   0.03%
 *   /13      620   0.06%
 *   /14     1150   0.12%
 *   /15     2000   0.20%
 *   /16    13600   1.36%
 *   /17     8600   0.86%
 *   /18    14800   1.48%
 *   /19    26500   2.65%
 *   /20    47500   4.75%
 *   /21    54000   5.40%
 *   /22   121000  12.10%
 *   /23   112000  11.20%
 *   /24   597737  59.77%
 */
const MIN_LEN = 8;
const MAX_LEN = 24;
const SHARES_PER_MILLION: Readonly<Record<number, number>> = {
  8: 16,
  9: 14,
  10: 38,
  11: 105,
  12: 320,
  13: 620,
  14: 1150,
  15: 2000,
  16: 13600,
  17: 8600,
  18: 14800,
  19: 26500,
  20: 47500,
  21: 54000,
  22: 121000,
  23: 112000,
  24: 597737,
};

/** Share (0..1) of each prefix length the generator aims for. */
export function prefixLengthShares(): Map<number, number> {
  const m = new Map<number, number>();
  for (let l = MIN_LEN; l <= MAX_LEN; l++) m.set(l, SHARES_PER_MILLION[l] / 1e6);
  return m;
}

/**
 * Space never announced on the Internet (RFC 6890 special-purpose blocks and
 * class D/E). A generated prefix must not overlap any of these.
 */
const BOGONS: ReadonlyArray<readonly [number, number]> = [
  ['0.0.0.0', 8],
  ['10.0.0.0', 8],
  ['100.64.0.0', 10],
  ['127.0.0.0', 8],
  ['169.254.0.0', 16],
  ['172.16.0.0', 12],
  ['192.0.0.0', 24],
  ['192.0.2.0', 24],
  ['192.168.0.0', 16],
  ['198.18.0.0', 15],
  ['198.51.100.0', 24],
  ['203.0.113.0', 24],
  ['224.0.0.0', 3],
].map(([a, l]) => [ipv4FromString(a as string), l as number] as const);

/** First octets touched by some bogon block: only those need the full check. */
const OCTET_NEEDS_CHECK = new Uint8Array(256);
for (const [net, len] of BOGONS) {
  const first = net >>> 24;
  const span = len >= 8 ? 1 : 1 << (8 - len);
  for (let o = first; o < first + span; o++) OCTET_NEEDS_CHECK[o] = 1;
}

function maskOf(len: number): number {
  return len === 0 ? 0 : (0xffffffff << (32 - len)) >>> 0;
}

/** BOGONS as flat arrays for the hot path. */
const BOGON_NET = Uint32Array.from(BOGONS, (b) => b[0]);
const BOGON_LEN = Uint8Array.from(BOGONS, (b) => b[1]);

/** Does network/len overlap any bogon block? `net` is an unsigned 32-bit address. */
function isBogon(net: number, len: number): boolean {
  for (let i = 0; i < BOGON_NET.length; i++) {
    const m = maskOf(len < BOGON_LEN[i] ? len : BOGON_LEN[i]);
    if ((net ^ BOGON_NET[i]) & m) continue;
    return true;
  }
  return false;
}

let capacityCache: number[] | undefined;

/**
 * Lower bound on the number of distinct announceable prefixes of each length
 * (index = length). Exact up to /16 (brute force, ~131k checks, done once);
 * beyond, every sub-prefix of a clean /16 is clean, so cap16 * 2^(len-16).
 */
function capacities(): number[] {
  if (capacityCache) return capacityCache;
  const caps: number[] = [];
  for (let len = MIN_LEN; len <= 16; len++) {
    let n = 0;
    const shift = 32 - len;
    for (let x = 0; x < 2 ** len; x++) if (!isBogon((x << shift) >>> 0, len)) n++;
    caps[len] = n;
  }
  for (let len = 17; len <= MAX_LEN; len++) caps[len] = caps[16] * 2 ** (len - 16);
  capacityCache = caps;
  return caps;
}

/** Largest `count` generateRib accepts (about 28.9 million). */
export function maxRibSize(): number {
  const caps = capacities();
  let s = 0;
  for (let l = MIN_LEN; l <= MAX_LEN; l++) s += caps[l];
  return s;
}

/**
 * Split `count` routes across prefix lengths: largest-remainder rounding of
 * the share table, then overflow beyond a length's capacity (only at huge
 * counts, small lengths first) moves to the longest lengths with room.
 */
function quotas(count: number): number[] {
  const caps = capacities();
  const q: number[] = new Array<number>(MAX_LEN + 1).fill(0);
  const frac: Array<[number, number]> = [];
  let assigned = 0;
  for (let l = MIN_LEN; l <= MAX_LEN; l++) {
    const raw = (count * SHARES_PER_MILLION[l]) / 1e6;
    q[l] = Math.floor(raw);
    assigned += q[l];
    frac.push([raw - q[l], l]);
  }
  frac.sort((x, y) => y[0] - x[0] || y[1] - x[1]);
  for (let i = 0; assigned < count; i++, assigned++) q[frac[i % frac.length][1]]++;
  let overflow = 0;
  for (let l = MIN_LEN; l <= MAX_LEN; l++) {
    if (q[l] > caps[l]) {
      overflow += q[l] - caps[l];
      q[l] = caps[l];
    }
  }
  for (let l = MAX_LEN; l >= MIN_LEN && overflow > 0; l--) {
    const take = Math.min(overflow, caps[l] - q[l]);
    q[l] += take;
    overflow -= take;
  }
  if (overflow > 0) throw new RangeError(`count ${count} exceeds the ${maxRibSize()} distinct prefixes available`);
  return q;
}

/**
 * A seeded bijection on [0, 2^len): multiply by odd / add / xorshift-right are
 * each invertible modulo 2^len, so walking i = 0, 1, 2, ... through it yields
 * distinct, scattered prefix indices without remembering which were used.
 */
interface LengthState {
  len: number;
  mask: number;
  mulA: number;
  addA: number;
  shiftA: number;
  mulB: number;
  addB: number;
  shiftB: number;
  next: number; // next counter value to permute
}

function permute(s: LengthState, i: number): number {
  let x = (Math.imul(i, s.mulA) + s.addA) & s.mask;
  x ^= x >>> s.shiftA;
  x = (Math.imul(x, s.mulB) + s.addB) & s.mask;
  x ^= x >>> s.shiftB;
  return x;
}

// ---------------------------------------------------------------------------
// Route generation
// ---------------------------------------------------------------------------

export interface RibRoute {
  /** Prefix as ASCII text, e.g. "203.0.113.0/24". */
  key: string;
  /** Encoded path attributes (see `decodePathAttributes`). */
  value: Buffer;
}

export interface RibGeneratorOptions {
  /** PRNG seed; same seed and count give the same routes in the same order. Default 1. */
  seed?: number;
  /**
   * Target size of each value in bytes (default 100). Values are padded to
   * exactly this size; below 66 bytes the attributes always present may exceed it.
   */
  valueBytes?: number;
}

/** Neighbours the synthetic router learns routes from: [peer ASN, next hop]. */
const PEERS: ReadonlyArray<readonly [number, number]> = [174, 1299, 2914, 3257, 3356, 3491, 6453, 6461, 6762, 6939, 7018, 9002, 12956, 1273, 5511, 6830].map(
  (asn, i) => [asn, ipv4FromString(`198.51.100.${i + 1}`)] as const,
);

/** Our own (private) ASN, used as the administrator in communities we tag. */
const LOCAL_ASN = 65000;

/** Weighted AS-path lengths 2..6 (cumulative per 100): 15%, 30%, 30%, 17%, 8%. */
const PATH_LEN_CDF = [15, 45, 75, 92, 100];

/** Random ASN: ~70% 16-bit public, ~30% 32-bit from the allocated range. */
function randomAsn(rng: Rng): number {
  if (small(rng, 10) < 7) {
    const asn = 1 + below(rng, 64495); // 1..64495
    return asn === 23456 ? 23457 : asn; // AS_TRANS never appears in a path
  }
  return 131072 + below(rng, 270000);
}

/** Worst-case bytes of the attributes every generated value carries (before large communities/padding). */
const MAX_MANDATORY = 1 + 3 + (2 + 4 * 6) + 6 + 6 + 6 + (2 + 4 * 4);
const SLAB_BYTES = 256 * 1024;

/**
 * The generator's state machine, kept out of the generator function so V8
 * optimises the hot path as a plain method. `next()` returns undefined once
 * `count` routes have been produced.
 */
class RibStream {
  private readonly rng: Rng;
  private readonly q: number[];
  private readonly states: LengthState[] = [];
  private readonly octDot: string[] = [];
  private readonly tail: string[] = [];
  private readonly reserve: number;
  private slab: Buffer;
  private pos = 0;
  private remaining: number;

  constructor(
    count: number,
    private readonly valueBytes: number,
    seed: number,
  ) {
    this.rng = createRng(seed);
    this.q = quotas(count);
    this.remaining = count;
    const rng = this.rng;
    for (let len = 0; len <= MAX_LEN; len++) {
      // Lengths below MIN_LEN get a placeholder so the array stays packed.
      this.states.push({
        len,
        mask: 2 ** len - 1,
        mulA: (rng() | 1) >>> 0,
        addA: rng(),
        shiftA: Math.ceil(len / 2),
        mulB: (rng() | 1) >>> 0,
        addB: rng(),
        shiftB: Math.ceil(len / 3),
        next: 0,
      });
    }
    // Precomputed key fragments: "a." and "0/len" (last octet is 0 for len <= 24).
    for (let i = 0; i < 256; i++) this.octDot.push(`${i}.`);
    for (let l = 0; l <= MAX_LEN; l++) this.tail.push(`0/${l}`);
    this.reserve = Math.max(valueBytes, MAX_MANDATORY);
    this.slab = Buffer.allocUnsafeSlow(Math.max(SLAB_BYTES, this.reserve));
  }

  next(): RibRoute | undefined {
    if (this.remaining === 0) return undefined;
    const rng = this.rng;
    const q = this.q;
    // Pick a length with probability proportional to its remaining quota,
    // checking /24 first since it wins ~60% of the time.
    let r = below(rng, this.remaining);
    let len = MAX_LEN;
    while (r >= q[len]) {
      r -= q[len];
      len--;
    }
    q[len]--;
    this.remaining--;

    // Next distinct index for this length that is not in bogon space.
    const st = this.states[len];
    const shift = 32 - len;
    let net = 0;
    for (;;) {
      if (st.next > st.mask) throw new Error(`prefix space for /${len} exhausted`); // quotas prevent this
      net = (permute(st, st.next++) << shift) >>> 0;
      if (OCTET_NEEDS_CHECK[net >>> 24] === 0 || !isBogon(net, len)) break;
    }
    const od = this.octDot;
    const key = od[net >>> 24] + od[(net >>> 16) & 255] + od[(net >>> 8) & 255] + this.tail[len];
    return { key, value: this.encodeValue() };
  }

  /** Random attributes written straight into the current slab. */
  private encodeValue(): Buffer {
    const rng = this.rng;
    if (this.pos + this.reserve > this.slab.length) {
      this.slab = Buffer.allocUnsafeSlow(Math.max(SLAB_BYTES, this.reserve));
      this.pos = 0;
    }
    const b = this.slab;
    const start = this.pos;
    let p = start;
    const peer = PEERS[rng() & 15];
    b[p++] = FORMAT_VERSION;
    // ORIGIN: mostly IGP, some INCOMPLETE (redistributed statics).
    b[p++] = T_ORIGIN;
    b[p++] = 1;
    b[p++] = small(rng, 100) < 88 ? Origin.IGP : Origin.INCOMPLETE;
    // AS_PATH: neighbour AS first, then transit and origin ASes.
    const pr = small(rng, 100);
    let plen = 2;
    while (pr >= PATH_LEN_CDF[plen - 2]) plen++;
    b[p++] = T_AS_PATH;
    b[p++] = 4 * plen;
    p = putU32(b, p, peer[0]);
    for (let i = 1; i < plen; i++) p = putU32(b, p, randomAsn(rng));
    b[p++] = T_NEXT_HOP;
    b[p++] = 4;
    p = putU32(b, p, peer[1]);
    // MED: half the routes carry 0, the rest an IGP-metric-like value.
    b[p++] = T_MED;
    b[p++] = 4;
    p = putU32(b, p, (rng() & 1) === 0 ? 0 : small(rng, 1000));
    // LOCAL_PREF: 100 default, 200 customer, 80 depreferred.
    const lr = small(rng, 10);
    b[p++] = T_LOCAL_PREF;
    b[p++] = 4;
    p = putU32(b, p, lr < 8 ? 100 : lr === 8 ? 200 : 80);
    // 1..4 communities we tag on import (LOCAL_ASN:tag).
    const nc = 1 + (rng() & 3);
    b[p++] = T_COMMUNITIES;
    b[p++] = 4 * nc;
    for (let i = 0; i < nc; i++) p = putU32(b, p, (LOCAL_ASN << 16) | small(rng, 3000));
    // Large communities fill up to the target, then padding makes it exact.
    let left = this.valueBytes - (p - start);
    const nl = left >= 14 ? Math.min(Math.floor((left - 2) / 12), 21) : 0;
    if (nl > 0) {
      b[p++] = T_LARGE_COMMUNITIES;
      b[p++] = 12 * nl;
      for (let i = 0; i < nl; i++) {
        p = putU32(b, p, LOCAL_ASN);
        p = putU32(b, p, 1 + (rng() & 7));
        p = putU32(b, p, below(rng, 100000));
      }
      left -= 2 + 12 * nl;
    }
    if (left > 0) p = writePadding(b, p, left);
    this.pos = p;
    return b.subarray(start, p);
  }
}

/** Big-endian u32 store without Buffer.writeUInt32BE's argument checks (~4x faster). */
function putU32(b: Buffer, p: number, v: number): number {
  b[p] = v >>> 24;
  b[p + 1] = v >>> 16;
  b[p + 2] = v >>> 8;
  b[p + 3] = v;
  return p + 4;
}

/**
 * Generate `count` unique IPv4 routes, deterministically for `opts.seed`.
 * Prefix lengths follow the table above exactly (per-length quotas for this
 * count, randomly interleaved), so the routes for count N are not a prefix
 * of those for count M != N. Values share 256 KiB backing slabs: keeping one
 * value keeps its slab alive (like Node's own Buffer pool).
 */
export function* generateRib(count: number, opts?: RibGeneratorOptions): Generator<RibRoute> {
  if (!Number.isInteger(count) || count < 0) throw new RangeError(`count must be a non-negative integer, got ${count}`);
  const valueBytes = opts?.valueBytes ?? 100;
  if (!Number.isInteger(valueBytes) || valueBytes < 1 || valueBytes > 65536) {
    throw new RangeError(`valueBytes must be an integer in 1..65536, got ${valueBytes}`);
  }
  const s = new RibStream(count, valueBytes, opts?.seed ?? 1);
  for (let r = s.next(); r !== undefined; r = s.next()) yield r;
}

// ---------------------------------------------------------------------------
// Incremental updates
// ---------------------------------------------------------------------------

/**
 * A changed route for the same key, as a BGP UPDATE would bring: new MED,
 * new LOCAL_PREF, a different best path (peer, next hop, AS path) or changed
 * communities. The value keeps the original length when the new attributes
 * fit (large communities are dropped first to make room). The result always
 * differs from the input.
 */
export function mutateRoute(route: RibRoute, rng: Rng): RibRoute {
  const a = decodePathAttributes(route.value);
  switch (rng() % 4) {
    case 0:
      a.med = ((a.med ?? 0) + 1 + (rng() % 999)) % 1000;
      break;
    case 1: {
      const choices = [80, 100, 150, 200].filter((x) => x !== a.localPref);
      a.localPref = choices[rng() % choices.length];
      break;
    }
    case 2: {
      const peer = PEERS[rng() & 15];
      const plen = 2 + (rng() % 5);
      const path = [peer[0]];
      for (let i = 1; i < plen; i++) path.push(randomAsn(rng));
      // Keep the origin AS when there was one: same prefix, different route to it.
      if (a.asPath.length > 1) path[path.length - 1] = a.asPath[a.asPath.length - 1];
      a.asPath = path;
      a.nextHop = ipv4ToString(peer[1]);
      break;
    }
    default: {
      const nc = 1 + (rng() & 3);
      a.communities = [];
      for (let i = 0; i < nc; i++) a.communities.push(((LOCAL_ASN << 16) | (rng() % 3000)) >>> 0);
      break;
    }
  }
  const target = route.value.length;
  while (a.largeCommunities.length > 0 && encodedAttributesLength(a) > target) a.largeCommunities.pop();
  let value = encodePathAttributes(a, { padTo: target });
  if (value.equals(route.value)) {
    // Rare (e.g. the new path drew the same ASNs): force a visible change.
    a.med = ((a.med ?? 0) + 1) % 1000;
    value = encodePathAttributes(a, { padTo: target });
  }
  return { key: route.key, value };
}
