/**
 * The frame channel codec (agent/checkpoint/frames.ts): whatever way a byte stream is cut into
 * chunks, the reader hands over exactly the frames that were written, and refuses an over-long
 * frame as soon as its header is complete, before buffering its body.
 */
import assert from 'node:assert/strict';
import {
  FrameError,
  FrameReader,
  FrameType,
  decodeBatch,
  decodeSeq,
  decodeStatus,
  encodeBatch,
  encodeEvent,
  encodeSeq,
  encodeStatus,
} from '../../agent/checkpoint/frames';

/** Deterministic pseudo-random numbers (xorshift32), so a failure can be replayed. */
function rng(seed: number): () => number {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x1_0000_0000;
  };
}

describe('frame channel codec', () => {
  const frames = [
    encodeBatch(FrameType.WRITE, { table: 'rib', seq: 1, count: 2, records: Buffer.from('two records here') }),
    encodeSeq(FrameType.WRITE_ACK, { table: 'rib', seq: 1 }),
    encodeBatch(FrameType.CHANGE, { table: 'adj-rib-in·peer', seq: 2 ** 40 + 7, count: 1, records: Buffer.alloc(70_000, 9) }),
    encodeEvent(Buffer.from([0x0a, 0x00])),
    encodeSeq(FrameType.ACK, { table: '', seq: Number.MAX_SAFE_INTEGER }),
    encodeStatus(11, 'batch seq 9 leaves a gap — the next must be 8'),
  ];
  const stream = Buffer.concat(frames);

  it('reads back exactly the frames written, however the stream is cut into chunks', () => {
    const next = rng(42);
    for (let round = 0; round < 300; round++) {
      const got: { type: number; body: Buffer }[] = [];
      const reader = new FrameReader(1 << 20, (type, body) => got.push({ type, body: Buffer.from(body) }));
      // Every cut: chunks of 1 byte up to a few KB, so headers and bodies split everywhere.
      let off = 0;
      while (off < stream.length) {
        const n = round === 0 ? 1 : 1 + Math.floor(next() * (next() < 0.5 ? 8 : 9000));
        reader.push(stream.subarray(off, off + n));
        off += n;
      }
      assert.equal(got.length, frames.length, `round ${round}`);
      got.forEach((f, i) => {
        assert.equal(f.type, frames[i][0]);
        assert.deepEqual(f.body, frames[i].subarray(5));
      });
    }
  });

  it('decodes each kind of body into what was encoded', () => {
    const bodies: Buffer[] = [];
    new FrameReader(1 << 20, (_t, body) => bodies.push(body)).push(stream);
    assert.deepEqual(decodeBatch(bodies[0]), { table: 'rib', seq: 1, count: 2, records: Buffer.from('two records here') });
    assert.deepEqual(decodeSeq(bodies[1]), { table: 'rib', seq: 1 });
    const change = decodeBatch(bodies[2]);
    assert.equal(change.table, 'adj-rib-in·peer');
    assert.equal(change.seq, 2 ** 40 + 7);
    assert.equal(change.records.length, 70_000);
    assert.deepEqual(decodeSeq(bodies[4]), { table: '', seq: Number.MAX_SAFE_INTEGER });
    assert.deepEqual(decodeStatus(bodies[5]), { code: 11, message: 'batch seq 9 leaves a gap — the next must be 8' });
  });

  it('refuses a frame over the limit once its header is complete, even when the header arrives byte by byte', () => {
    const big = Buffer.alloc(5);
    big[0] = FrameType.WRITE;
    big.writeUInt32BE(1025, 1);
    const reader = new FrameReader(1024, () => assert.fail('no frame may be handed over'));
    reader.push(Buffer.alloc(0)); // an empty chunk changes nothing
    for (let i = 0; i < 4; i++) reader.push(big.subarray(i, i + 1));
    assert.throws(() => reader.push(big.subarray(4, 5)), FrameError);
    assert.throws(() => new FrameReader(1024, () => undefined).push(big), /frame of 1025 bytes exceeds the limit of 1024/);
  });

  it('refuses malformed bodies with a FrameError that says what is wrong', () => {
    assert.throws(() => decodeBatch(Buffer.alloc(13)), /shorter than its 14-byte header/);
    const lying = Buffer.alloc(14);
    lying.writeUInt16BE(5, 12);
    assert.throws(() => decodeBatch(lying), /names a 5-byte table but holds 0 bytes/);
    assert.throws(() => decodeSeq(Buffer.alloc(9)), /shorter than its 10-byte header/);
    const extra = Buffer.concat([encodeSeq(FrameType.ACK, { table: 'rib', seq: 3 }).subarray(5), Buffer.from('x')]);
    assert.throws(() => decodeSeq(extra), /names a 3-byte table but holds 4 bytes/);
    const huge = Buffer.alloc(14);
    huge.writeUInt32BE(0x20_0000, 0);
    assert.throws(() => decodeBatch(huge), /sequence above 2\^53/);
  });
});
