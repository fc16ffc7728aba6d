/**
 * The records of a FIB table (checkpoint.proto, "FIB tables"): key = canonical prefix text,
 * value = a protobuf-encoded FibEntry. Encoded and decoded by hand here (three fields) because
 * the agent decodes every record it programs and the SDK encodes every route a daemon publishes:
 * a generic protobuf codec costs several times more per record and brings nothing.
 *
 * Wire format (proto3): FibEntry { repeated FibNextHop next_hops = 1 }, FibNextHop { string
 * gateway = 1; string interface = 2; uint32 weight = 3 }. Unknown fields are skipped, as proto3
 * readers must.
 */
import net from 'node:net';

export interface FibNextHop {
  /** Neighbour address, same family as the prefix; '' = on-link (no gateway). */
  gateway: string;
  /** Data-plane interface the packet leaves by. */
  interface: string;
  /** Multipath weight 1..256 (1 when unset). */
  weight: number;
}

export interface FibEntry {
  nextHops: FibNextHop[];
}

export const MAX_NEXT_HOPS = 32;

export class FibEntryError extends Error {}

// ------------------------------------------------------------------ prefixes

export interface Prefix {
  family: 4 | 6;
  /** Canonical text, the record key: "198.18.5.0/24", "2001:db8::/32". */
  text: string;
  /** Network address bytes (4 or 16), host bits zero. */
  bytes: Buffer;
  length: number;
}

/** Address text -> bytes; null when not an address. */
export function addressBytes(text: string): Buffer | null {
  const fam = net.isIP(text);
  if (fam === 4) return Buffer.from(text.split('.').map(Number));
  if (fam !== 6) return null;
  // Expand "::" and an embedded dotted quad, then read eight groups.
  let s = text.toLowerCase();
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (dotted) {
    const b = dotted[1].split('.').map(Number);
    s = s.slice(0, dotted.index) + `${((b[0] << 8) | b[1]).toString(16)}:${((b[2] << 8) | b[3]).toString(16)}`;
  }
  const [head, tail] = s.includes('::') ? s.split('::') : [s, null];
  const h = head ? head.split(':') : [];
  const t = tail === null ? [] : tail ? tail.split(':') : [];
  const groups = tail === null ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}

/** Bytes -> canonical address text (inet_ntop's form). */
export function addressText(b: Buffer): string {
  if (b.length === 4) return `${b[0]}.${b[1]}.${b[2]}.${b[3]}`;
  const g: number[] = [];
  for (let i = 0; i < 16; i += 2) g.push(b.readUInt16BE(i));
  // The longest run of two or more zero groups becomes "::" (the first such run on a tie).
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8;) {
    if (g[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (a: number[]) => a.map((x) => x.toString(16)).join(':');
  if (best < 0) return hex(g);
  return `${hex(g.slice(0, best))}::${hex(g.slice(best + bestLen))}`;
}

/**
 * Parses a FIB key. Throws FibEntryError saying what is wrong, with the canonical spelling
 * when only the spelling is.
 */
export function parsePrefix(key: string): Prefix {
  const slash = key.indexOf('/');
  if (slash < 0) throw new FibEntryError(`'${key}' is not a prefix: write ADDRESS/LENGTH, e.g. 198.18.5.0/24`);
  const addr = key.slice(0, slash);
  const lenText = key.slice(slash + 1);
  const bytes = addressBytes(addr);
  if (!bytes) throw new FibEntryError(`'${key}' is not a prefix: '${addr}' is not an IPv4 or IPv6 address`);
  const max = bytes.length * 8;
  if (!/^(0|[1-9]\d{0,2})$/.test(lenText) || Number(lenText) > max) {
    throw new FibEntryError(`'${key}' is not a prefix: the length must be 0..${max} in decimal`);
  }
  const length = Number(lenText);
  const masked = Buffer.from(bytes);
  for (let bit = length; bit < max; bit++) masked[bit >> 3] &= ~(0x80 >> (bit & 7));
  const text = `${addressText(masked)}/${length}`;
  if (text !== key) {
    const why = masked.equals(bytes) ? 'is not in canonical form' : 'has host bits set';
    throw new FibEntryError(`'${key}' ${why}: write it as '${text}'`);
  }
  return { family: bytes.length === 4 ? 4 : 6, text, bytes: masked, length };
}

/**
 * The family of a valid FIB key; throws exactly as parsePrefix does for any other. The write path
 * checks every key of every FIB batch and needs nothing else: canonical IPv4 prefixes (nearly
 * all of a full table) are checked here without allocating; anything else goes to parsePrefix.
 */
export function prefixFamily(key: string): 4 | 6 {
  if (isCanonicalIpv4Prefix(key)) return 4;
  if (isCanonicalIpv6Prefix(key)) return 6;
  return parsePrefix(key).family;
}

/**
 * Whether `key` is a.b.c.d/len in parsePrefix's canonical form: decimal octets and length
 * without leading zeros, length 0..32, no host bits set. False sends it to parsePrefix, which
 * accepts it or names what is wrong.
 */
function isCanonicalIpv4Prefix(key: string): boolean {
  let i = 0;
  let addr = 0;
  for (let part = 0; part < 5; part++) {
    const start = i;
    let v = 0;
    for (; i < key.length && i - start < 4; i++) {
      const c = key.charCodeAt(i);
      if (c < 48 || c > 57) break;
      v = v * 10 + (c - 48);
    }
    const digits = i - start;
    if (digits === 0 || digits > 3 || (digits > 1 && key.charCodeAt(start) === 48)) return false;
    if (part < 4) {
      if (v > 255 || key.charCodeAt(i) !== (part < 3 ? 46 : 47)) return false; // '.' or '/'
      addr = addr * 256 + v;
      i++;
    } else {
      if (v > 32 || i !== key.length) return false;
      // Host bits: the low 32 - v bits of the address (an unsigned 32-bit number here).
      return v === 32 || addr % 2 ** (32 - v) === 0;
    }
  }
  return false;
}

/**
 * Whether `key` is an IPv6 prefix in parsePrefix's canonical form (addressText's: lowercase hex
 * groups without leading zeros, the longest run of two or more zero groups as "::", the first
 * on a tie; no dotted quad), length 0..128 without leading zeros, no host bits set. False sends
 * it to parsePrefix, which accepts it or names what is wrong.
 */
function isCanonicalIpv6Prefix(key: string): boolean {
  const slash = key.indexOf('/');
  if (slash < 2) return false;
  const groups: number[] = [];
  let gap = -1; // index in `groups` where "::" stands
  let i = 0;
  if (key.charCodeAt(0) === 58) {
    if (key.charCodeAt(1) !== 58) return false;
    gap = 0;
    i = 2;
  }
  while (i < slash) {
    const start = i;
    let v = 0;
    for (; i < slash; i++) {
      const c = key.charCodeAt(i);
      const d = c >= 48 && c <= 57 ? c - 48 : c >= 97 && c <= 102 ? c - 87 : -1;
      if (d < 0) break;
      v = v * 16 + d;
    }
    const digits = i - start;
    if (digits === 0 || digits > 4 || (digits > 1 && key.charCodeAt(start) === 48)) return false;
    groups.push(v);
    if (i === slash) break;
    if (key.charCodeAt(i) !== 58) return false; // ':'
    i++;
    if (key.charCodeAt(i) === 58) {
      if (gap >= 0) return false;
      gap = groups.length;
      i++;
    } else if (i === slash) return false; // a trailing single ':'
  }
  const run = 8 - groups.length; // zero groups the "::" stands for
  if (gap < 0 ? groups.length !== 8 : run < 2) return false;
  // "::" must stand for the longest run of zero groups (two or more), the first on a tie; a
  // zero group next to it would have been part of it (so no run below touches it).
  if (gap >= 0 && (groups[gap - 1] === 0 || groups[gap] === 0)) return false;
  for (let g = 0; g < groups.length;) {
    if (groups[g] !== 0) {
      g++;
      continue;
    }
    let e = g;
    while (e < groups.length && groups[e] === 0) e++;
    const len = e - g;
    if (len >= 2 && (gap < 0 || len > run || (len === run && e <= gap))) return false;
    g = e;
  }
  // Length, then host bits (each group covers 16 bits of the address).
  const lenStart = slash + 1;
  let len = 0;
  for (i = lenStart; i < key.length; i++) {
    const c = key.charCodeAt(i);
    if (c < 48 || c > 57) return false;
    len = len * 10 + (c - 48);
  }
  const lenDigits = key.length - lenStart;
  if (lenDigits === 0 || lenDigits > 3 || (lenDigits > 1 && key.charCodeAt(lenStart) === 48) || len > 128) return false;
  for (let g = 0; g < 8; g++) {
    const bits = len - g * 16; // prefix bits inside this group
    if (bits >= 16) continue;
    // Group g of the address: an explicit one, or one that "::" stands for (zero).
    const k = gap < 0 || g < gap ? g : g - run;
    const value = gap >= 0 && g >= gap && g < gap + run ? 0 : groups[k];
    const hostMask = bits <= 0 ? 0xffff : 0xffff >> bits;
    if ((value & hostMask) !== 0) return false;
  }
  return true;
}

/** Whether `addr` (bytes) lies inside `net`/`len` (bytes of the same family). */
export function inSubnet(addr: Buffer, netBytes: Buffer, len: number): boolean {
  if (addr.length !== netBytes.length) return false;
  for (let bit = 0; bit < len; bit++) {
    const m = 0x80 >> (bit & 7);
    if ((addr[bit >> 3] & m) !== (netBytes[bit >> 3] & m)) return false;
  }
  return true;
}

// ------------------------------------------------------------------ protobuf wire

function varintLen(n: number): number {
  let l = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 128);
    l++;
  }
  return l;
}

function writeVarint(b: Buffer, o: number, n: number): number {
  while (n >= 0x80) {
    b[o++] = (n & 0x7f) | 0x80;
    n = Math.floor(n / 128);
  }
  b[o++] = n;
  return o;
}

function readVarint(b: Buffer, o: { at: number }, end: number): number {
  let n = 0;
  let mul = 1;
  for (let i = 0; i < 10; i++) {
    if (o.at >= end) throw new FibEntryError('truncated varint');
    const byte = b[o.at++];
    n += (byte & 0x7f) * mul;
    if (byte < 0x80) return n;
    mul *= 128;
  }
  throw new FibEntryError('varint longer than 10 bytes');
}

export function encodeFibEntry(e: FibEntry): Buffer {
  const hops = e.nextHops.map((h) => {
    const gw = Buffer.from(h.gateway, 'utf8');
    const ifc = Buffer.from(h.interface, 'utf8');
    const w = h.weight && h.weight !== 1 ? h.weight : 0;
    const len = (gw.length ? 1 + varintLen(gw.length) + gw.length : 0) + 1 + varintLen(ifc.length) + ifc.length + (w ? 1 + varintLen(w) : 0);
    return { gw, ifc, w, len };
  });
  const total = hops.reduce((s, h) => s + 1 + varintLen(h.len) + h.len, 0);
  const b = Buffer.allocUnsafe(total);
  let o = 0;
  for (const h of hops) {
    b[o++] = 0x0a; // field 1, length-delimited
    o = writeVarint(b, o, h.len);
    if (h.gw.length) {
      b[o++] = 0x0a;
      o = writeVarint(b, o, h.gw.length);
      o += h.gw.copy(b, o);
    }
    b[o++] = 0x12;
    o = writeVarint(b, o, h.ifc.length);
    o += h.ifc.copy(b, o);
    if (h.w) {
      b[o++] = 0x18;
      o = writeVarint(b, o, h.w);
    }
  }
  return b;
}

/** Skips a field of wire type `wt` at o.at. */
function skipField(b: Buffer, o: { at: number }, end: number, wt: number): void {
  if (wt === 0) readVarint(b, o, end);
  else if (wt === 1) o.at += 8;
  else if (wt === 2) o.at += readVarint(b, o, end);
  else if (wt === 5) o.at += 4;
  else throw new FibEntryError(`unsupported wire type ${wt}`);
  if (o.at > end) throw new FibEntryError('truncated field');
}

export function decodeFibEntry(b: Buffer): FibEntry {
  const nextHops: FibNextHop[] = [];
  const o = { at: 0 };
  while (o.at < b.length) {
    const tag = readVarint(b, o, b.length);
    if (tag === 0x0a) {
      const len = readVarint(b, o, b.length);
      const end = o.at + len;
      if (end > b.length) throw new FibEntryError('truncated next hop');
      const h: FibNextHop = { gateway: '', interface: '', weight: 1 };
      while (o.at < end) {
        const t = readVarint(b, o, end);
        if (t === 0x0a || t === 0x12) {
          const l = readVarint(b, o, end);
          if (o.at + l > end) throw new FibEntryError('truncated string');
          const s = b.toString('utf8', o.at, o.at + l);
          o.at += l;
          if (t === 0x0a) h.gateway = s;
          else h.interface = s;
        } else if (t === 0x18) {
          h.weight = readVarint(b, o, end) || 1;
        } else skipField(b, o, end, t & 7);
      }
      nextHops.push(h);
    } else skipField(b, o, b.length, tag & 7);
  }
  return { nextHops };
}

/** One line for logs and errors: "via 198.51.100.2 dev port2, via ... dev port3 weight 2". */
export function describeFibEntry(e: FibEntry): string {
  return e.nextHops.map((h) => `${h.gateway ? `via ${h.gateway} ` : ''}dev ${h.interface}${h.weight !== 1 ? ` weight ${h.weight}` : ''}`).join(', ');
}

/** One next hop as text: "gateway|interface|weight". */
export const nextHopKey = (h: FibNextHop): string => `${h.gateway}|${h.interface}|${h.weight}`;

/**
 * The next-hop set of an entry as one string, equal for equal sets whatever their order (the
 * kernel keeps its own): next-hop keys, sorted, joined by ';'. A reconciliation holds one per
 * route instead of an object graph, so comparing a big table leaves little for the collector.
 */
export function nextHopsKey(hops: readonly FibNextHop[]): string {
  return hops.length === 1 ? nextHopKey(hops[0]) : joinNextHopKeys(hops.map(nextHopKey));
}

/** nextHopsKey from the nextHopKey texts of a set's hops (sorts `keys` in place). */
export function joinNextHopKeys(keys: string[]): string {
  return keys.length === 1 ? keys[0] : keys.sort().join(';');
}

/** Equal next-hop sets (order does not matter: the kernel keeps its own). */
export function sameFibEntry(a: FibEntry, b: FibEntry): boolean {
  return a.nextHops.length === b.nextHops.length && nextHopsKey(a.nextHops) === nextHopsKey(b.nextHops);
}
