/**
 * The example router's BGP-4 codec and session: messages round-trip; each malformed message gets
 * the NOTIFICATION RFC 4271 section 6 names; and a fuzzer (random bytes, and valid messages with
 * bytes flipped, cut or stretched, with a fixed seed) finds no input that makes the decoder throw
 * anything but BgpError, nor a session crash instead of ending with a NOTIFICATION.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  AFI_IPV4,
  AFI_IPV6,
  BgpError,
  Err,
  MsgType,
  OpenMessage,
  Origin,
  PathAttributes,
  SAFI_UNICAST,
  UpdateMessage,
  decodeMessage,
  encodeEndOfRib,
  encodeKeepalive,
  encodeNotification,
  encodeOpen,
  encodeRouteRefresh,
  encodeUpdate,
  messageLength,
} from '../../examples/bgp-rib/bgp/messages';
import { BgpSession } from '../../examples/bgp-rib/bgp/session';
import { mulberry } from '../../examples/common/daemon-runner';

const attrs = (over: Partial<PathAttributes> = {}): PathAttributes => ({
  origin: Origin.IGP,
  asPath: [65001, 4200000000],
  asSet: [],
  nextHop: '198.51.100.1',
  med: 10,
  localPref: null,
  other: [],
  ...over,
});

function decodeOne(b: Buffer, as4 = true) {
  assert.equal(messageLength(b, 0), b.length);
  return decodeMessage(b, as4);
}

function expectNotification(b: Buffer, code: number, subcode: number): void {
  assert.throws(
    () => {
      const len = messageLength(b, 0);
      decodeMessage(b.subarray(0, len || b.length), true);
    },
    (e: unknown) => e instanceof BgpError && e.code === code && e.subcode === subcode,
    `want NOTIFICATION ${code}/${subcode}`,
  );
}

/** Rewrites the length field of a framed message after its body was changed. */
function reframe(b: Buffer): Buffer {
  const c = Buffer.from(b);
  c.writeUInt16BE(c.length, 16);
  return c;
}

describe('BGP-4 messages (RFC 4271, 4760, 6793, 2918, 4724)', () => {
  it('round-trips OPEN with its capabilities, 4-octet AS through AS_TRANS', () => {
    const b = encodeOpen({
      as: 4200000001,
      holdTime: 90,
      identifier: '198.51.100.1',
      capabilities: {
        multiprotocol: [
          { afi: AFI_IPV4, safi: SAFI_UNICAST },
          { afi: AFI_IPV6, safi: SAFI_UNICAST },
        ],
        routeRefresh: true,
        gracefulRestart: { restarting: true, restartTime: 120, families: [{ afi: AFI_IPV4, safi: SAFI_UNICAST, forwardingPreserved: true }] },
      },
    });
    assert.equal(b.readUInt16BE(19 + 1), 23456, 'My AS is AS_TRANS');
    const o = decodeOne(b) as OpenMessage;
    assert.deepEqual([o.as, o.holdTime, o.identifier, o.capabilities.routeRefresh], [4200000001, 90, '198.51.100.1', true]);
    assert.equal(o.capabilities.multiprotocol.length, 2);
    assert.deepEqual(o.capabilities.gracefulRestart, { restarting: true, restartTime: 120, families: [{ afi: 1, safi: 1, forwardingPreserved: true }] });
  });

  it('round-trips UPDATEs of both families, withdrawals and End-of-RIB markers', () => {
    const u = decodeOne(encodeUpdate({ announced: ['198.18.0.0/24', '10.0.0.0/8', '0.0.0.0/0'], attrs: attrs(), as4: true })) as UpdateMessage;
    assert.deepEqual(u.announced, ['198.18.0.0/24', '10.0.0.0/8', '0.0.0.0/0']);
    assert.deepEqual([u.attributes!.asPath, u.attributes!.nextHop, u.attributes!.med], [[65001, 4200000000], '198.51.100.1', 10]);
    const v6 = decodeOne(
      encodeUpdate({ announced: ['2001:db8:100::/64', '2001:db8::/32'], attrs: attrs({ nextHop: '2001:db8:2::1' }), as4: true }),
    ) as UpdateMessage;
    assert.deepEqual([v6.announced, v6.attributes!.nextHop], [['2001:db8:100::/64', '2001:db8::/32'], '2001:db8:2::1']);
    const w = decodeOne(encodeUpdate({ withdrawn: ['198.18.0.0/24', '2001:db8:100::/64'], as4: true })) as UpdateMessage;
    assert.deepEqual([w.withdrawn, w.attributes, w.endOfRib], [['198.18.0.0/24', '2001:db8:100::/64'], null, null]);
    assert.deepEqual((decodeOne(encodeEndOfRib({ afi: AFI_IPV4, safi: SAFI_UNICAST })) as UpdateMessage).endOfRib, { afi: 1, safi: 1 });
    assert.deepEqual((decodeOne(encodeEndOfRib({ afi: AFI_IPV6, safi: SAFI_UNICAST })) as UpdateMessage).endOfRib, { afi: 2, safi: 1 });
    // 2-octet AS sessions: ASes above 65535 become AS_TRANS.
    const two = decodeOne(encodeUpdate({ announced: ['198.18.0.0/24'], attrs: attrs(), as4: false }), false) as UpdateMessage;
    assert.deepEqual(two.attributes!.asPath, [65001, 23456]);
    assert.equal(decodeOne(encodeKeepalive()).type, MsgType.KEEPALIVE);
    assert.deepEqual(decodeOne(encodeRouteRefresh({ afi: 2, safi: 1 })), { type: MsgType.ROUTE_REFRESH, afi: 2, safi: 1 });
    assert.deepEqual(decodeOne(encodeNotification(6, 2, Buffer.from('bye'))), { type: MsgType.NOTIFICATION, code: 6, subcode: 2, data: Buffer.from('bye') });
  });

  it('answers each malformed message with the NOTIFICATION RFC 4271 names', () => {
    const ka = encodeKeepalive();
    const badMarker = Buffer.from(ka);
    badMarker[3] = 0;
    expectNotification(badMarker, Err.HEADER, Err.HEADER_NOT_SYNCHRONIZED);
    const badLen = Buffer.from(ka);
    badLen.writeUInt16BE(18, 16);
    expectNotification(badLen, Err.HEADER, Err.HEADER_BAD_LENGTH);
    const badType = Buffer.from(ka);
    badType[18] = 9;
    expectNotification(badType, Err.HEADER, Err.HEADER_BAD_TYPE);
    const open = encodeOpen({ as: 65001, holdTime: 90, identifier: '198.51.100.1', capabilities: {} });
    const v3 = Buffer.from(open);
    v3[19] = 3;
    expectNotification(v3, Err.OPEN, Err.OPEN_UNSUPPORTED_VERSION);
    const hold2 = Buffer.from(open);
    hold2.writeUInt16BE(2, 22);
    expectNotification(hold2, Err.OPEN, Err.OPEN_UNACCEPTABLE_HOLD_TIME);
    const id0 = Buffer.from(open);
    id0.fill(0, 24, 28);
    expectNotification(id0, Err.OPEN, Err.OPEN_BAD_IDENTIFIER);
    const param1 = Buffer.from(open);
    param1[29] = 1; // optional parameter type 1 (deprecated authentication)
    expectNotification(param1, Err.OPEN, Err.OPEN_UNSUPPORTED_PARAMETER);

    const up = encodeUpdate({ announced: ['198.18.0.0/24'], attrs: attrs({ med: null }), as4: true });
    // Body: withdrawn len (2) = 0, attr len (2), ORIGIN at 23, AS_PATH at 27, NEXT_HOP after it.
    const origin3 = Buffer.from(up);
    origin3[26] = 3;
    expectNotification(origin3, Err.UPDATE, Err.UPDATE_INVALID_ORIGIN);
    const originFlags = Buffer.from(up);
    originFlags[23] = 0xc0; // optional + transitive on a well-known attribute
    expectNotification(originFlags, Err.UPDATE, Err.UPDATE_ATTRIBUTE_FLAGS);
    const originLen = Buffer.from(up);
    originLen[25] = 2;
    expectNotification(originLen, Err.UPDATE, Err.UPDATE_ATTRIBUTE_LENGTH);
    const segType = Buffer.from(up);
    segType[30] = 7;
    expectNotification(segType, Err.UPDATE, Err.UPDATE_MALFORMED_AS_PATH);
    const nh = Buffer.from(up);
    const nhAt = up.indexOf(Buffer.from([0x40, 3, 4])) + 3;
    nh[nhAt] = 0;
    nh.fill(0, nhAt, nhAt + 4);
    expectNotification(nh, Err.UPDATE, Err.UPDATE_INVALID_NEXT_HOP);
    const prefix33 = Buffer.from(up);
    prefix33[up.length - 4] = 33;
    expectNotification(prefix33, Err.UPDATE, Err.UPDATE_INVALID_NETWORK);
    // NLRI without NEXT_HOP: drop the attribute and reframe.
    const noNh = Buffer.concat([up.subarray(0, nhAt - 3), up.subarray(nhAt + 4)]);
    noNh.writeUInt16BE(up.readUInt16BE(21) - 7, 21);
    expectNotification(reframe(noNh), Err.UPDATE, Err.UPDATE_MISSING_WELL_KNOWN);
    // An unknown well-known (non-optional) attribute.
    const unknownWk = Buffer.concat([up.subarray(0, 23), Buffer.from([0x40, 99, 0]), up.subarray(23)]);
    unknownWk.writeUInt16BE(up.readUInt16BE(21) + 3, 21);
    expectNotification(reframe(unknownWk), Err.UPDATE, Err.UPDATE_UNRECOGNIZED_WELL_KNOWN);
    const dup = Buffer.concat([up.subarray(0, 23), up.subarray(23, 27), up.subarray(23)]);
    dup.writeUInt16BE(up.readUInt16BE(21) + 4, 21);
    expectNotification(reframe(dup), Err.UPDATE, Err.UPDATE_MALFORMED_ATTRIBUTE_LIST);
  });

  it('fuzz: random and mutated messages only ever raise BgpError (20,000 cases, seeded)', () => {
    const rand = mulberry(2026);
    const valid = [
      encodeOpen({ as: 65001, holdTime: 90, identifier: '198.51.100.1', capabilities: { multiprotocol: [{ afi: 1, safi: 1 }], routeRefresh: true } }),
      encodeUpdate({ announced: ['198.18.0.0/24', '198.18.1.0/24'], attrs: attrs(), as4: true }),
      encodeUpdate({
        announced: ['2001:db8:100::/64'],
        attrs: attrs({ nextHop: '2001:db8:2::1', other: [{ flags: 0xc0, type: 32, value: Buffer.alloc(12, 1) }] }),
        as4: true,
      }),
      encodeUpdate({ withdrawn: ['198.18.0.0/24', '2001:db8::/32'], as4: true }),
      encodeEndOfRib({ afi: 2, safi: 1 }),
      encodeRouteRefresh({ afi: 1, safi: 1 }),
      encodeNotification(3, 1),
      encodeKeepalive(),
    ];
    const kinds = new Map<string, number>();
    for (let i = 0; i < 20_000; i++) {
      let b: Buffer;
      const pick = valid[Math.floor(rand() * valid.length)];
      const r = rand();
      if (r < 0.15) {
        b = Buffer.alloc(Math.floor(rand() * 80));
        for (let j = 0; j < b.length; j++) b[j] = Math.floor(rand() * 256);
        if (rand() < 0.5 && b.length >= 19) b.fill(0xff, 0, 16);
      } else {
        b = Buffer.from(pick);
        const flips = 1 + Math.floor(rand() * 4);
        for (let f = 0; f < flips; f++) b[16 + Math.floor(rand() * (b.length - 16))] = Math.floor(rand() * 256);
        if (rand() < 0.2) b = b.subarray(0, Math.floor(rand() * b.length));
        if (rand() < 0.1) b = Buffer.concat([b, Buffer.alloc(Math.floor(rand() * 10), Math.floor(rand() * 256))]);
        if (rand() < 0.5 && b.length >= 18) b.writeUInt16BE(b.length, 16);
      }
      let kind = 'decoded';
      try {
        const len = messageLength(b, 0);
        if (len) decodeMessage(b.subarray(0, len), rand() < 0.8);
        else kind = 'incomplete';
      } catch (e) {
        if (!(e instanceof BgpError)) throw new Error(`case ${i} (${b.toString('hex')}): ${(e as Error).stack}`);
        kind = `notification ${e.code}/${e.subcode}`;
      }
      kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
    }
    // The fuzzer reached deep: decoded messages and many different NOTIFICATIONs.
    assert.ok((kinds.get('decoded') ?? 0) > 500, JSON.stringify([...kinds]));
    assert.ok([...kinds.keys()].filter((k) => k.startsWith('notification')).length >= 10, JSON.stringify([...kinds]));
  });

  it('a session fed mutated messages over TCP ends each time with a NOTIFICATION, never a crash', async () => {
    const rand = mulberry(7);
    const open = encodeOpen({ as: 65000, holdTime: 90, identifier: '198.51.100.2', capabilities: { multiprotocol: [{ afi: 1, safi: 1 }] } });
    const update = encodeUpdate({ announced: ['198.18.0.0/24'], attrs: attrs(), as4: true });
    let notified = 0;
    for (let i = 0; i < 40; i++) {
      const server = net.createServer();
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
      const port = (server.address() as net.AddressInfo).port;
      const ended = new Promise<{ notification: { code: number; sent: boolean } | null }>((resolve) => {
        server.once('connection', (sock) => {
          const s = new BgpSession({ localAs: 65001, routerId: '198.51.100.1', peerAs: 65000, peerAddress: '127.0.0.1', holdTime: 90, gracefulRestartTime: 0 });
          s.on('down', resolve);
          s.attach(sock);
        });
      });
      const c = net.connect(port, '127.0.0.1');
      await new Promise((r) => c.once('connect', r));
      c.on('error', () => undefined);
      const bad = Buffer.from(i % 2 ? update : open);
      for (let f = 0; f < 3; f++) bad[19 + Math.floor(rand() * (bad.length - 19))] = Math.floor(rand() * 256);
      // Always a malformed one: a broken marker on even rounds if the flips happened to be benign.
      if (i % 4 === 0) bad[0] = 0;
      // A valid OPEN and KEEPALIVE first on odd rounds, so the bad UPDATE arrives Established.
      c.write(i % 2 ? Buffer.concat([open, encodeKeepalive(), bad]) : bad);
      const to = setTimeout(() => c.destroy(), 1000);
      const d = await ended;
      clearTimeout(to);
      c.destroy();
      server.close();
      if (d.notification?.sent) notified++;
    }
    assert.ok(notified >= 20, `sessions that ended with a NOTIFICATION sent: ${notified} of 40`);
  });
});
