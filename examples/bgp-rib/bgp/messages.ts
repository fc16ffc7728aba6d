/**
 * BGP-4 messages on the wire (RFC 4271), with 4-octet AS numbers (RFC 6793), multiprotocol
 * IPv4/IPv6 unicast (RFC 4760), route refresh (RFC 2918) and the graceful-restart capability
 * (RFC 4724). decodeMessage() checks everything RFC 4271 section 6 asks a speaker to check and
 * throws BgpError with the NOTIFICATION code and subcode that section names: a malformed message
 * ends the session with that NOTIFICATION, never with an exception.
 *
 * Prefixes are canonical text ("198.18.5.0/24", "2001:db8:100::/64"), as FIB keys are.
 * Numbers on the wire are big-endian.
 */
import { addressBytes, addressText } from '../../../agent/dataplane/fib-entry';

export const MARKER = Buffer.alloc(16, 0xff);
export const HEADER_BYTES = 19;
export const MAX_MESSAGE_BYTES = 4096;
/** The 2-octet AS a 4-octet speaker puts in OPEN's My AS when its AS does not fit (RFC 6793). */
export const AS_TRANS = 23456;

export const enum MsgType {
  OPEN = 1,
  UPDATE = 2,
  NOTIFICATION = 3,
  KEEPALIVE = 4,
  ROUTE_REFRESH = 5,
}

/** NOTIFICATION error codes and subcodes used here (RFC 4271 4.5, 6; RFC 5492; RFC 4486). */
export const Err = {
  HEADER: 1,
  HEADER_NOT_SYNCHRONIZED: 1,
  HEADER_BAD_LENGTH: 2,
  HEADER_BAD_TYPE: 3,
  OPEN: 2,
  OPEN_UNSUPPORTED_VERSION: 1,
  OPEN_BAD_PEER_AS: 2,
  OPEN_BAD_IDENTIFIER: 3,
  OPEN_UNSUPPORTED_PARAMETER: 4,
  OPEN_UNACCEPTABLE_HOLD_TIME: 6,
  UPDATE: 3,
  UPDATE_MALFORMED_ATTRIBUTE_LIST: 1,
  UPDATE_UNRECOGNIZED_WELL_KNOWN: 2,
  UPDATE_MISSING_WELL_KNOWN: 3,
  UPDATE_ATTRIBUTE_FLAGS: 4,
  UPDATE_ATTRIBUTE_LENGTH: 5,
  UPDATE_INVALID_ORIGIN: 6,
  UPDATE_INVALID_NEXT_HOP: 8,
  UPDATE_OPTIONAL_ATTRIBUTE: 9,
  UPDATE_INVALID_NETWORK: 10,
  UPDATE_MALFORMED_AS_PATH: 11,
  HOLD_TIMER_EXPIRED: 4,
  FSM: 5,
  CEASE: 6,
  CEASE_ADMIN_SHUTDOWN: 2,
  CEASE_ADMIN_RESET: 4,
} as const;

/** A reason to end the session with NOTIFICATION (code, subcode, data). */
export class BgpError extends Error {
  constructor(
    readonly code: number,
    readonly subcode: number,
    message: string,
    readonly data: Buffer = Buffer.alloc(0),
  ) {
    super(message);
  }
}

export const AFI_IPV4 = 1;
export const AFI_IPV6 = 2;
export const SAFI_UNICAST = 1;

export interface AfiSafi {
  afi: number;
  safi: number;
}

export interface Capabilities {
  /** Multiprotocol (code 1) address families. */
  multiprotocol: AfiSafi[];
  routeRefresh: boolean;
  /** 4-octet AS (code 65): the speaker's AS, or null when not advertised. */
  as4: number | null;
  /** Graceful restart (code 64), or null when not advertised. */
  gracefulRestart: { restarting: boolean; restartTime: number; families: (AfiSafi & { forwardingPreserved: boolean })[] } | null;
  /** Capabilities this code does not know: code -> value, kept as received. */
  other: { code: number; value: Buffer }[];
}

export interface OpenMessage {
  type: MsgType.OPEN;
  version: number;
  /** The speaker's AS: from the 4-octet AS capability when present, else My AS. */
  as: number;
  holdTime: number;
  /** BGP identifier as dotted quad. */
  identifier: string;
  capabilities: Capabilities;
}

export const enum Origin {
  IGP = 0,
  EGP = 1,
  INCOMPLETE = 2,
}

/** Path attributes of a route, as this speaker keeps them. */
export interface PathAttributes {
  origin: Origin;
  /** AS_SEQUENCE segments flattened in order; AS_SET members in `asSet`. */
  asPath: number[];
  asSet: number[];
  /** Next hop of IPv4 NLRI (NEXT_HOP) or of MP_REACH_NLRI. */
  nextHop: string;
  med: number | null;
  localPref: number | null;
  /** Optional transitive attributes this code does not interpret: passed on as received. */
  other: { flags: number; type: number; value: Buffer }[];
}

export interface UpdateMessage {
  type: MsgType.UPDATE;
  /** Withdrawn prefixes of every family (WITHDRAWN_ROUTES and MP_UNREACH_NLRI). */
  withdrawn: string[];
  /** Attributes of `announced` (null when nothing is announced). */
  attributes: PathAttributes | null;
  /** Announced prefixes of every family (NLRI and MP_REACH_NLRI). */
  announced: string[];
  /** Set when the UPDATE is an End-of-RIB marker of this family (RFC 4724). */
  endOfRib: AfiSafi | null;
}

export interface NotificationMessage {
  type: MsgType.NOTIFICATION;
  code: number;
  subcode: number;
  data: Buffer;
}

export interface KeepaliveMessage {
  type: MsgType.KEEPALIVE;
}

export interface RouteRefreshMessage {
  type: MsgType.ROUTE_REFRESH;
  afi: number;
  safi: number;
}

export type BgpMessage = OpenMessage | UpdateMessage | NotificationMessage | KeepaliveMessage | RouteRefreshMessage;

// ------------------------------------------------------------------ framing

function frame(type: MsgType, body: Buffer): Buffer {
  const len = HEADER_BYTES + body.length;
  if (len > MAX_MESSAGE_BYTES) throw new Error(`BGP message of ${len} bytes exceeds ${MAX_MESSAGE_BYTES}`);
  const b = Buffer.allocUnsafe(len);
  MARKER.copy(b, 0);
  b.writeUInt16BE(len, 16);
  b[18] = type;
  body.copy(b, HEADER_BYTES);
  return b;
}

/**
 * Splits a byte stream into messages. Returns the length of the first complete message in `buf`
 * at `off`, or 0 when more bytes are needed; throws BgpError for a broken header (RFC 4271 6.1).
 */
export function messageLength(buf: Buffer, off: number): number {
  if (buf.length - off < HEADER_BYTES) return 0;
  if (!buf.subarray(off, off + 16).equals(MARKER)) throw new BgpError(Err.HEADER, Err.HEADER_NOT_SYNCHRONIZED, 'the marker is not all ones');
  const len = buf.readUInt16BE(off + 16);
  const type = buf[off + 18];
  const lenData = Buffer.alloc(2);
  lenData.writeUInt16BE(len);
  if (len < HEADER_BYTES || len > MAX_MESSAGE_BYTES) throw new BgpError(Err.HEADER, Err.HEADER_BAD_LENGTH, `message length ${len}`, lenData);
  const min = [0, 29, 23, 21, 19, 23][type];
  if (min === undefined) throw new BgpError(Err.HEADER, Err.HEADER_BAD_TYPE, `message type ${type}`, Buffer.from([type]));
  if (len < min || (type === MsgType.KEEPALIVE && len !== 19) || (type === MsgType.ROUTE_REFRESH && len !== 23)) {
    throw new BgpError(Err.HEADER, Err.HEADER_BAD_LENGTH, `length ${len} for message type ${type}`, lenData);
  }
  return buf.length - off >= len ? len : 0;
}

// ------------------------------------------------------------------ prefixes

function prefixFamily(p: string): number {
  return p.includes(':') ? AFI_IPV6 : AFI_IPV4;
}

function encodePrefix(p: string): Buffer {
  const [addr, lenText] = p.split('/');
  const len = Number(lenText);
  const bytes = addressBytes(addr);
  if (!bytes) throw new Error(`not a prefix: ${p}`);
  const n = (len + 7) >> 3;
  return Buffer.concat([Buffer.from([len]), bytes.subarray(0, n)]);
}

/** Prefixes packed as RFC 4271 4.3 (length octet + the significant octets). */
function decodePrefixes(buf: Buffer, afi: number, what: string): string[] {
  const out: string[] = [];
  const max = afi === AFI_IPV4 ? 32 : 128;
  let o = 0;
  while (o < buf.length) {
    const len = buf[o++];
    const n = (len + 7) >> 3;
    if (len > max || o + n > buf.length) throw new BgpError(Err.UPDATE, Err.UPDATE_INVALID_NETWORK, `${what}: prefix length ${len} does not fit`);
    const bytes = Buffer.alloc(max / 8);
    buf.copy(bytes, 0, o, o + n);
    // Trailing bits past the length are ignored (RFC 4271 4.3), then cleared for the key.
    for (let bit = len; bit < max; bit++) bytes[bit >> 3] &= ~(0x80 >> (bit & 7));
    out.push(`${addressText(bytes)}/${len}`);
    o += n;
  }
  return out;
}

// ------------------------------------------------------------------ OPEN

export function encodeOpen(o: { as: number; holdTime: number; identifier: string; capabilities: Partial<Capabilities> }): Buffer {
  const caps: Buffer[] = [];
  const cap = (code: number, value: Buffer) => caps.push(Buffer.concat([Buffer.from([code, value.length]), value]));
  for (const f of o.capabilities.multiprotocol ?? []) {
    const v = Buffer.alloc(4);
    v.writeUInt16BE(f.afi, 0);
    v[3] = f.safi;
    cap(1, v);
  }
  if (o.capabilities.routeRefresh) cap(2, Buffer.alloc(0));
  const gr = o.capabilities.gracefulRestart;
  if (gr) {
    const v = Buffer.alloc(2 + gr.families.length * 4);
    v.writeUInt16BE((gr.restarting ? 0x8000 : 0) | (gr.restartTime & 0x0fff), 0);
    gr.families.forEach((f, i) => {
      v.writeUInt16BE(f.afi, 2 + i * 4);
      v[4 + i * 4] = f.safi;
      v[5 + i * 4] = f.forwardingPreserved ? 0x80 : 0;
    });
    cap(64, v);
  }
  const as4 = Buffer.alloc(4);
  as4.writeUInt32BE(o.as >>> 0);
  cap(65, as4);
  for (const c of o.capabilities.other ?? []) cap(c.code, c.value);
  const capBytes = Buffer.concat(caps);
  const params = capBytes.length ? Buffer.concat([Buffer.from([2, capBytes.length]), capBytes]) : Buffer.alloc(0);
  const body = Buffer.alloc(10);
  body[0] = 4;
  body.writeUInt16BE(o.as > 0xffff ? AS_TRANS : o.as, 1);
  body.writeUInt16BE(o.holdTime, 3);
  addressBytes(o.identifier)!.copy(body, 5);
  body[9] = params.length;
  return frame(MsgType.OPEN, Buffer.concat([body, params]));
}

function decodeOpen(b: Buffer): OpenMessage {
  const version = b[0];
  if (version !== 4) throw new BgpError(Err.OPEN, Err.OPEN_UNSUPPORTED_VERSION, `BGP version ${version}`, Buffer.from([0, 4]));
  const myAs = b.readUInt16BE(1);
  const holdTime = b.readUInt16BE(3);
  if (holdTime === 1 || holdTime === 2) throw new BgpError(Err.OPEN, Err.OPEN_UNACCEPTABLE_HOLD_TIME, `hold time ${holdTime} s`);
  const identifier = addressText(b.subarray(5, 9));
  if (identifier === '0.0.0.0') throw new BgpError(Err.OPEN, Err.OPEN_BAD_IDENTIFIER, 'BGP identifier 0.0.0.0');
  const paramLen = b[9];
  if (10 + paramLen !== b.length) throw new BgpError(Err.HEADER, Err.HEADER_BAD_LENGTH, `optional parameters length ${paramLen} does not match the message`);
  const caps: Capabilities = { multiprotocol: [], routeRefresh: false, as4: null, gracefulRestart: null, other: [] };
  let o = 10;
  while (o < b.length) {
    if (o + 2 > b.length) throw new BgpError(Err.OPEN, 0, 'truncated optional parameter');
    const ptype = b[o];
    const plen = b[o + 1];
    const pend = o + 2 + plen;
    if (pend > b.length) throw new BgpError(Err.OPEN, 0, 'optional parameter longer than the message');
    if (ptype !== 2) throw new BgpError(Err.OPEN, Err.OPEN_UNSUPPORTED_PARAMETER, `optional parameter type ${ptype}`);
    let c = o + 2;
    while (c < pend) {
      if (c + 2 > pend) throw new BgpError(Err.OPEN, 0, 'truncated capability');
      const code = b[c];
      const clen = b[c + 1];
      const v = b.subarray(c + 2, c + 2 + clen);
      if (c + 2 + clen > pend) throw new BgpError(Err.OPEN, 0, `capability ${code} longer than its parameter`);
      if (code === 1 && clen === 4) caps.multiprotocol.push({ afi: v.readUInt16BE(0), safi: v[3] });
      else if (code === 2 && clen === 0) caps.routeRefresh = true;
      else if (code === 65 && clen === 4) caps.as4 = v.readUInt32BE(0);
      else if (code === 64 && clen >= 2 && (clen - 2) % 4 === 0) {
        const fl = v.readUInt16BE(0);
        const families = [];
        for (let i = 2; i < clen; i += 4) families.push({ afi: v.readUInt16BE(i), safi: v[i + 2], forwardingPreserved: (v[i + 3] & 0x80) !== 0 });
        caps.gracefulRestart = { restarting: (fl & 0x8000) !== 0, restartTime: fl & 0x0fff, families };
      } else caps.other.push({ code, value: Buffer.from(v) });
      c += 2 + clen;
    }
    o = pend;
  }
  const as = caps.as4 ?? myAs;
  if (caps.as4 !== null && caps.as4 <= 0xffff && myAs !== caps.as4) {
    throw new BgpError(Err.OPEN, Err.OPEN_BAD_PEER_AS, `My AS ${myAs} differs from the 4-octet AS ${caps.as4}`);
  }
  return { type: MsgType.OPEN, version, as, holdTime, identifier, capabilities: caps };
}

// ------------------------------------------------------------------ UPDATE

const FLAG_OPTIONAL = 0x80;
const FLAG_TRANSITIVE = 0x40;
const FLAG_PARTIAL = 0x20;
const FLAG_EXTENDED = 0x10;

function attr(flags: number, type: number, value: Buffer): Buffer {
  if (value.length > 255) flags |= FLAG_EXTENDED;
  const h = flags & FLAG_EXTENDED ? Buffer.from([flags, type, value.length >> 8, value.length & 255]) : Buffer.from([flags, type, value.length]);
  return Buffer.concat([h, value]);
}

/**
 * One UPDATE: `announced` prefixes of one family with `attrs`, and/or `withdrawn` prefixes. IPv4
 * goes in the classic fields, IPv6 in MP_REACH_NLRI / MP_UNREACH_NLRI. `as4`: AS numbers are
 * 4 octets on this session (both sides sent the capability).
 */
export function encodeUpdate(u: { withdrawn?: string[]; announced?: string[]; attrs?: PathAttributes; as4: boolean }): Buffer {
  const withdrawn = u.withdrawn ?? [];
  const announced = u.announced ?? [];
  const w4 = withdrawn.filter((p) => prefixFamily(p) === AFI_IPV4);
  const w6 = withdrawn.filter((p) => prefixFamily(p) === AFI_IPV6);
  const a4 = announced.filter((p) => prefixFamily(p) === AFI_IPV4);
  const a6 = announced.filter((p) => prefixFamily(p) === AFI_IPV6);
  const attrs: Buffer[] = [];
  if (announced.length) {
    const a = u.attrs!;
    attrs.push(attr(FLAG_TRANSITIVE, 1, Buffer.from([a.origin])));
    const asBytes = u.as4 ? 4 : 2;
    const segs: Buffer[] = [];
    for (let i = 0; i < a.asPath.length; i += 255) {
      const chunk = a.asPath.slice(i, i + 255);
      const s = Buffer.alloc(2 + chunk.length * asBytes);
      s[0] = 2;
      s[1] = chunk.length;
      chunk.forEach((as, j) => (asBytes === 4 ? s.writeUInt32BE(as >>> 0, 2 + j * 4) : s.writeUInt16BE(as > 0xffff ? AS_TRANS : as, 2 + j * 2)));
      segs.push(s);
    }
    attrs.push(attr(FLAG_TRANSITIVE, 2, Buffer.concat(segs)));
    if (a4.length) attrs.push(attr(FLAG_TRANSITIVE, 3, addressBytes(a.nextHop)!));
    if (a.med !== null) {
      const v = Buffer.alloc(4);
      v.writeUInt32BE(a.med >>> 0);
      attrs.push(attr(FLAG_OPTIONAL, 4, v));
    }
    if (a.localPref !== null) {
      const v = Buffer.alloc(4);
      v.writeUInt32BE(a.localPref >>> 0);
      attrs.push(attr(FLAG_TRANSITIVE, 5, v));
    }
    if (a6.length) {
      const nh = addressBytes(a.nextHop)!;
      const head = Buffer.from([0, AFI_IPV6, SAFI_UNICAST, nh.length]);
      attrs.push(attr(FLAG_OPTIONAL, 14, Buffer.concat([head, nh, Buffer.from([0]), ...a6.map(encodePrefix)])));
    }
    for (const o of a.other) attrs.push(attr(o.flags, o.type, o.value));
  }
  if (w6.length) attrs.push(attr(FLAG_OPTIONAL, 15, Buffer.concat([Buffer.from([0, AFI_IPV6, SAFI_UNICAST]), ...w6.map(encodePrefix)])));
  const wBytes = Buffer.concat(w4.map(encodePrefix));
  const aBytes = Buffer.concat(attrs);
  const head = Buffer.alloc(2);
  head.writeUInt16BE(wBytes.length);
  const alen = Buffer.alloc(2);
  alen.writeUInt16BE(aBytes.length);
  return frame(MsgType.UPDATE, Buffer.concat([head, wBytes, alen, aBytes, ...a4.map(encodePrefix)]));
}

/** End-of-RIB (RFC 4724 2): an empty UPDATE for IPv4 unicast, an empty MP_UNREACH_NLRI for others. */
export function encodeEndOfRib(f: AfiSafi): Buffer {
  if (f.afi === AFI_IPV4 && f.safi === SAFI_UNICAST) return frame(MsgType.UPDATE, Buffer.alloc(4));
  const v = Buffer.from([0, f.afi, f.safi]);
  v.writeUInt16BE(f.afi, 0);
  const a = attr(FLAG_OPTIONAL, 15, v);
  const b = Buffer.alloc(4 + a.length);
  b.writeUInt16BE(a.length, 2);
  a.copy(b, 4);
  return frame(MsgType.UPDATE, b);
}

/** Checks one attribute's flags against what its type requires (RFC 4271 6.3). */
function checkFlags(type: number, flags: number, raw: Buffer): void {
  const wellKnown = [1, 2, 3, 5, 6];
  const want = wellKnown.includes(type) ? FLAG_TRANSITIVE : type === 4 || type === 14 || type === 15 ? FLAG_OPTIONAL : -1;
  if (want < 0) return;
  if ((flags & (FLAG_OPTIONAL | FLAG_TRANSITIVE)) !== want || (want === FLAG_TRANSITIVE && flags & FLAG_PARTIAL)) {
    throw new BgpError(Err.UPDATE, Err.UPDATE_ATTRIBUTE_FLAGS, `attribute ${type} with flags 0x${flags.toString(16)}`, raw);
  }
}

function decodeAsPath(v: Buffer, as4: boolean, raw: Buffer): { path: number[]; set: number[] } {
  const size = as4 ? 4 : 2;
  const path: number[] = [];
  const set: number[] = [];
  let o = 0;
  while (o < v.length) {
    if (o + 2 > v.length) throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_AS_PATH, 'truncated AS_PATH segment', raw);
    const st = v[o];
    const n = v[o + 1];
    if ((st !== 1 && st !== 2) || n === 0 || o + 2 + n * size > v.length) {
      throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_AS_PATH, `AS_PATH segment type ${st} with ${n} ASes`, raw);
    }
    for (let i = 0; i < n; i++) {
      const as = size === 4 ? v.readUInt32BE(o + 2 + i * 4) : v.readUInt16BE(o + 2 + i * 2);
      (st === 2 ? path : set).push(as);
    }
    o += 2 + n * size;
  }
  return { path, set };
}

function decodeUpdate(b: Buffer, as4: boolean): UpdateMessage {
  if (b.length < 4) throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_ATTRIBUTE_LIST, 'UPDATE shorter than its length fields');
  const wlen = b.readUInt16BE(0);
  if (2 + wlen + 2 > b.length) throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_ATTRIBUTE_LIST, `withdrawn routes length ${wlen} exceeds the message`);
  const withdrawn = decodePrefixes(b.subarray(2, 2 + wlen), AFI_IPV4, 'withdrawn routes');
  const alen = b.readUInt16BE(2 + wlen);
  const aStart = 4 + wlen;
  if (aStart + alen > b.length) throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_ATTRIBUTE_LIST, `path attribute length ${alen} exceeds the message`);
  const nlri = decodePrefixes(b.subarray(aStart + alen), AFI_IPV4, 'NLRI');
  const a: PathAttributes = { origin: Origin.IGP, asPath: [], asSet: [], nextHop: '', med: null, localPref: null, other: [] };
  const seen = new Set<number>();
  let announced6: string[] = [];
  let nextHop6 = '';
  let endOfRib: AfiSafi | null = null;
  let mpUnreach: AfiSafi | null = null;
  let o = aStart;
  const end = aStart + alen;
  while (o < end) {
    if (o + 3 > end) throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_ATTRIBUTE_LIST, 'truncated attribute header');
    const flags = b[o];
    const type = b[o + 1];
    const ext = (flags & FLAG_EXTENDED) !== 0;
    if (ext && o + 4 > end) throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_ATTRIBUTE_LIST, 'truncated attribute header');
    const len = ext ? b.readUInt16BE(o + 2) : b[o + 2];
    const vs = o + (ext ? 4 : 3);
    const raw = b.subarray(o, Math.min(end, vs + len));
    if (vs + len > end) throw new BgpError(Err.UPDATE, Err.UPDATE_ATTRIBUTE_LENGTH, `attribute ${type} of ${len} bytes exceeds the attributes`, raw);
    const v = b.subarray(vs, vs + len);
    if (seen.has(type)) throw new BgpError(Err.UPDATE, Err.UPDATE_MALFORMED_ATTRIBUTE_LIST, `attribute ${type} appears twice`);
    seen.add(type);
    checkFlags(type, flags, raw);
    const needLen = (n: number) => {
      if (len !== n) throw new BgpError(Err.UPDATE, Err.UPDATE_ATTRIBUTE_LENGTH, `attribute ${type} of ${len} bytes (want ${n})`, raw);
    };
    switch (type) {
      case 1:
        needLen(1);
        if (v[0] > 2) throw new BgpError(Err.UPDATE, Err.UPDATE_INVALID_ORIGIN, `ORIGIN ${v[0]}`, raw);
        a.origin = v[0];
        break;
      case 2: {
        const p = decodeAsPath(v, as4, raw);
        a.asPath = p.path;
        a.asSet = p.set;
        break;
      }
      case 3: {
        needLen(4);
        const nh = addressText(v);
        if (nh === '0.0.0.0' || v[0] >= 224 || v[0] === 127) throw new BgpError(Err.UPDATE, Err.UPDATE_INVALID_NEXT_HOP, `NEXT_HOP ${nh}`, raw);
        a.nextHop = nh;
        break;
      }
      case 4:
        needLen(4);
        a.med = v.readUInt32BE(0);
        break;
      case 5:
        needLen(4);
        a.localPref = v.readUInt32BE(0);
        break;
      case 14: {
        if (len < 5) throw new BgpError(Err.UPDATE, Err.UPDATE_OPTIONAL_ATTRIBUTE, 'MP_REACH_NLRI too short', raw);
        const afi = v.readUInt16BE(0);
        const safi = v[2];
        const nhLen = v[3];
        if (5 + nhLen > len) throw new BgpError(Err.UPDATE, Err.UPDATE_OPTIONAL_ATTRIBUTE, `MP_REACH_NLRI next hop of ${nhLen} bytes`, raw);
        if (afi !== AFI_IPV6 || safi !== SAFI_UNICAST) break; // a family not negotiated: ignored
        if (nhLen !== 16 && nhLen !== 32) throw new BgpError(Err.UPDATE, Err.UPDATE_OPTIONAL_ATTRIBUTE, `IPv6 next hop of ${nhLen} bytes`, raw);
        // With 32 bytes the second address is the link-local one; the global one routes.
        nextHop6 = addressText(v.subarray(4, 20));
        announced6 = decodePrefixes(v.subarray(5 + nhLen), AFI_IPV6, 'MP_REACH_NLRI');
        break;
      }
      case 15: {
        if (len < 3) throw new BgpError(Err.UPDATE, Err.UPDATE_OPTIONAL_ATTRIBUTE, 'MP_UNREACH_NLRI too short', raw);
        const afi = v.readUInt16BE(0);
        const safi = v[2];
        mpUnreach = { afi, safi };
        if (afi !== AFI_IPV6 || safi !== SAFI_UNICAST) break; // a family not negotiated: ignored
        withdrawn.push(...decodePrefixes(v.subarray(3), AFI_IPV6, 'MP_UNREACH_NLRI'));
        break;
      }
      default:
        if (!(flags & FLAG_OPTIONAL)) throw new BgpError(Err.UPDATE, Err.UPDATE_UNRECOGNIZED_WELL_KNOWN, `well-known attribute ${type} is not recognized`, raw);
        // Optional transitive: passed on, marked partial; optional non-transitive: dropped.
        if (flags & FLAG_TRANSITIVE) a.other.push({ flags: flags | FLAG_PARTIAL, type, value: Buffer.from(v) });
    }
    o = vs + len;
  }
  const announced = [...nlri, ...announced6];
  if (nlri.length) {
    for (const [t, name] of [
      [1, 'ORIGIN'],
      [2, 'AS_PATH'],
      [3, 'NEXT_HOP'],
    ] as const) {
      if (!seen.has(t)) throw new BgpError(Err.UPDATE, Err.UPDATE_MISSING_WELL_KNOWN, `${name} is missing`, Buffer.from([t]));
    }
  } else if (announced6.length) {
    for (const [t, name] of [
      [1, 'ORIGIN'],
      [2, 'AS_PATH'],
    ] as const) {
      if (!seen.has(t)) throw new BgpError(Err.UPDATE, Err.UPDATE_MISSING_WELL_KNOWN, `${name} is missing`, Buffer.from([t]));
    }
  }
  if (announced6.length) a.nextHop = nlri.length ? a.nextHop : nextHop6;
  if (b.length === 4 && wlen === 0 && alen === 0) endOfRib = { afi: AFI_IPV4, safi: SAFI_UNICAST };
  // An UPDATE whose only content is an empty MP_UNREACH_NLRI is that family's End-of-RIB.
  if (mpUnreach && seen.size === 1 && withdrawn.length === 0 && announced.length === 0) endOfRib = mpUnreach;
  return { type: MsgType.UPDATE, withdrawn, attributes: announced.length ? a : null, announced, endOfRib };
}

// ------------------------------------------------------------------ the rest

export function encodeKeepalive(): Buffer {
  return frame(MsgType.KEEPALIVE, Buffer.alloc(0));
}

export function encodeNotification(code: number, subcode: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return frame(MsgType.NOTIFICATION, Buffer.concat([Buffer.from([code, subcode]), data.subarray(0, MAX_MESSAGE_BYTES - 21)]));
}

export function encodeRouteRefresh(f: AfiSafi): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt16BE(f.afi, 0);
  b[3] = f.safi;
  return frame(MsgType.ROUTE_REFRESH, b);
}

/** One complete message (as messageLength() found it). `as4`: the session negotiated 4-octet AS. */
export function decodeMessage(msg: Buffer, as4: boolean): BgpMessage {
  const body = msg.subarray(HEADER_BYTES);
  switch (msg[18]) {
    case MsgType.OPEN:
      return decodeOpen(body);
    case MsgType.UPDATE:
      return decodeUpdate(body, as4);
    case MsgType.NOTIFICATION:
      return { type: MsgType.NOTIFICATION, code: body[0], subcode: body[1], data: Buffer.from(body.subarray(2)) };
    case MsgType.KEEPALIVE:
      return { type: MsgType.KEEPALIVE };
    case MsgType.ROUTE_REFRESH:
      return { type: MsgType.ROUTE_REFRESH, afi: body.readUInt16BE(0), safi: body[3] };
    default:
      throw new BgpError(Err.HEADER, Err.HEADER_BAD_TYPE, `message type ${msg[18]}`, Buffer.from([msg[18]]));
  }
}
