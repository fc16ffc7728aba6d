/**
 * The frame channel's wire format, shared by the agent and the SDK (the proto documents it for
 * other implementations: proto/hitless/v1/checkpoint.proto, "Frame channels").
 *
 * Why it exists: on the change path (a batch in from the active, out to each standby, an ack
 * back) gRPC cost the agent about half of its main thread per batch (HTTP/2 framing, grpc-js
 * call bookkeeping, protobuf encoding of a message that is one big `bytes` field). A frame is a
 * 5-byte header and the batch's packed records as they are, with no copy on the way in.
 *
 *   frame := type:u8  length:u32  body[length]            (integers big-endian)
 *
 * Bodies:
 *   WRITE      (1, client -> agent)  seq:u64  count:u32  table_len:u16  table  records
 *   WRITE_ACK  (2, agent -> client)  seq:u64  table_len:u16  table
 *   CHANGE     (3, agent -> client)  seq:u64  count:u32  table_len:u16  table  records
 *   EVENT      (4, agent -> client)  a SubscribeEvent, protobuf-encoded (snapshot, reset, caught_up)
 *   ACK        (5, client -> agent)  seq:u64  table_len:u16  table
 *   STATUS     (6, agent -> client)  code:u32  message (UTF-8): the channel failed with this gRPC
 *                                    status; the agent closes the connection after it
 *
 * Table names are UTF-8, as in the protobuf messages. Sequences are u64 on the wire and stay far below 2^53 (see messages.ts), so they are read as
 * JS numbers; a larger one is refused as a malformed frame.
 */

export const FRAME_HEADER_BYTES = 5;

export const enum FrameType {
  WRITE = 1,
  WRITE_ACK = 2,
  CHANGE = 3,
  EVENT = 4,
  ACK = 5,
  STATUS = 6,
}

/** A frame the reader could not accept; the channel ends with INVALID_ARGUMENT naming it. */
export class FrameError extends Error {}

/** A batch as WRITE and CHANGE frames carry it. `records` may view the received chunk. */
export interface BatchFrame {
  table: string;
  seq: number;
  count: number;
  records: Buffer;
}

/** An acknowledgement as WRITE_ACK and ACK frames carry it. */
export interface SeqFrame {
  table: string;
  seq: number;
}

/**
 * WRITE or CHANGE without its records: the frame header, sequence, count and table. The records
 * follow as they are (see writeFrame), so a batch is never copied to be framed.
 */
export function batchHeader(type: FrameType.WRITE | FrameType.CHANGE, b: BatchFrame): Buffer {
  const tableLen = Buffer.byteLength(b.table);
  const out = Buffer.allocUnsafe(19 + tableLen);
  out[0] = type;
  out.writeUInt32BE(8 + 4 + 2 + tableLen + b.records.length, 1);
  writeSeq(out, 5, b.seq);
  out.writeUInt32BE(b.count, 13);
  out.writeUInt16BE(tableLen, 17);
  out.write(b.table, 19, 'utf8');
  return out;
}

/** WRITE or CHANGE as one buffer (tests, tools): batchHeader followed by the records. */
export function encodeBatch(type: FrameType.WRITE | FrameType.CHANGE, b: BatchFrame): Buffer {
  return Buffer.concat([batchHeader(type, b), b.records]);
}

/**
 * Writes a frame given as parts (a batch's header and its records) in one go: corked, so the
 * socket hands both to the kernel in one writev. Returns what the last write() returned (false:
 * wait for 'drain').
 */
export function writeFrame(sock: { cork(): void; uncork(): void; write(b: Buffer): boolean }, parts: Buffer | Buffer[]): boolean {
  if (!Array.isArray(parts)) return sock.write(parts);
  sock.cork();
  let ok = true;
  for (const p of parts) ok = sock.write(p);
  sock.uncork();
  return ok;
}

export function decodeBatch(body: Buffer): BatchFrame {
  if (body.length < 14) throw new FrameError(`batch frame of ${body.length} bytes is shorter than its 14-byte header`);
  const seq = readSeq(body, 0);
  const count = body.readUInt32BE(8);
  const tableLen = body.readUInt16BE(12);
  if (14 + tableLen > body.length) throw new FrameError(`batch frame names a ${tableLen}-byte table but holds ${body.length - 14} bytes after its header`);
  return { seq, count, table: body.toString('utf8', 14, 14 + tableLen), records: body.subarray(14 + tableLen) };
}

/** WRITE_ACK or ACK. */
export function encodeSeq(type: FrameType.WRITE_ACK | FrameType.ACK, a: SeqFrame): Buffer {
  const tableLen = Buffer.byteLength(a.table);
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + 10 + tableLen);
  out[0] = type;
  out.writeUInt32BE(10 + tableLen, 1);
  writeSeq(out, 5, a.seq);
  out.writeUInt16BE(tableLen, 13);
  out.write(a.table, 15, 'utf8');
  return out;
}

export function decodeSeq(body: Buffer): SeqFrame {
  if (body.length < 10) throw new FrameError(`ack frame of ${body.length} bytes is shorter than its 10-byte header`);
  const tableLen = body.readUInt16BE(8);
  if (10 + tableLen !== body.length) throw new FrameError(`ack frame names a ${tableLen}-byte table but holds ${body.length - 10} bytes after its header`);
  return { seq: readSeq(body, 0), table: body.toString('utf8', 10, 10 + tableLen) };
}

export function encodeStatus(code: number, message: string): Buffer {
  const msg = Buffer.from(message, 'utf8');
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + 4 + msg.length);
  out[0] = FrameType.STATUS;
  out.writeUInt32BE(4 + msg.length, 1);
  out.writeUInt32BE(code, 5);
  msg.copy(out, 9);
  return out;
}

export function decodeStatus(body: Buffer): { code: number; message: string } {
  if (body.length < 4) throw new FrameError(`status frame of ${body.length} bytes is shorter than its code`);
  return { code: body.readUInt32BE(0), message: body.toString('utf8', 4) };
}

/** EVENT: an already protobuf-encoded SubscribeEvent. */
export function encodeEvent(encoded: Buffer): Buffer {
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + encoded.length);
  out[0] = FrameType.EVENT;
  out.writeUInt32BE(encoded.length, 1);
  encoded.copy(out, FRAME_HEADER_BYTES);
  return out;
}

function writeSeq(buf: Buffer, off: number, seq: number): void {
  buf.writeUInt32BE(Math.floor(seq / 0x1_0000_0000), off);
  buf.writeUInt32BE(seq >>> 0, off + 4);
}

function readSeq(buf: Buffer, off: number): number {
  const hi = buf.readUInt32BE(off);
  if (hi >= 0x20_0000) throw new FrameError('sequence above 2^53');
  return hi * 0x1_0000_0000 + buf.readUInt32BE(off + 4);
}

/**
 * Splits a byte stream into frames. A frame inside one received chunk is handed over as a view
 * of that chunk (no copy); one spread over chunks is assembled once. Frames longer than
 * `maxBody` are refused before anything of them is buffered.
 */
export class FrameReader {
  /** The start of an incomplete frame, as received (chunks kept, not concatenated, until it is whole). */
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  /** Bytes the pending frame needs in all (header included); 0 while its header is incomplete. */
  private need = 0;

  constructor(
    private readonly maxBody: number,
    private readonly onFrame: (type: number, body: Buffer) => void,
  ) {}

  /** Feeds received bytes; throws FrameError on a frame over the limit (the stream is then unusable). */
  push(chunk: Buffer): void {
    let buf = chunk;
    if (this.pendingBytes > 0) {
      this.pending.push(chunk);
      this.pendingBytes += chunk.length;
      if (this.need === 0) {
        if (this.pendingBytes < FRAME_HEADER_BYTES) return;
        // At most 5 chunks hold the header: this copy is small whatever the cut.
        this.need = this.frameLength(Buffer.concat(this.pending, FRAME_HEADER_BYTES), 0);
      }
      if (this.pendingBytes < this.need) return;
      buf = Buffer.concat(this.pending, this.pendingBytes);
      this.pending = [];
      this.pendingBytes = 0;
      this.need = 0;
    }
    let off = 0;
    while (buf.length - off >= FRAME_HEADER_BYTES) {
      const whole = this.frameLength(buf, off);
      if (buf.length - off < whole) break;
      const type = buf[off];
      const body = buf.subarray(off + FRAME_HEADER_BYTES, off + whole);
      off += whole;
      this.onFrame(type, body);
    }
    if (off < buf.length) {
      const rest = buf.subarray(off);
      this.pending = [rest];
      this.pendingBytes = rest.length;
      this.need = rest.length >= FRAME_HEADER_BYTES ? this.frameLength(rest, 0) : 0;
    }
  }

  /** Header and body bytes of the frame whose header starts at `off`; throws when over the limit. */
  private frameLength(buf: Buffer, off: number): number {
    const len = buf.readUInt32BE(off + 1);
    if (len > this.maxBody) throw new FrameError(`frame of ${len} bytes exceeds the limit of ${this.maxBody}`);
    return FRAME_HEADER_BYTES + len;
  }
}
