/**
 * Packed record codec: the byte layout documented at the top of proto/hitless/v1/checkpoint.proto.
 *
 * Shared by the agent (validation) and the SDK (building batches). Tables hold records in this
 * same layout (see record-table.ts). Keys given as JS strings are latin1: one char per byte, so
 * the conversion is lossless.
 */

// Buffer's latin1Slice/latin1Write are the methods toString('latin1')/write(.., 'latin1') call
// after argument checks; calling them directly saves that per record on the hot path.
declare module 'buffer' {
  interface Buffer {
    latin1Slice(start: number, end: number): string;
    latin1Write(str: string, offset: number): number;
  }
}

export const OP_PUT = 1;
export const OP_DELETE = 2;
export const OP_CLEAR = 3;

/** op:u8 key_len:u16 val_len:u32 */
export const RECORD_HEADER_BYTES = 7;
export const SCHEMA_BYTES = 2;

export interface RecordLimits {
  /** Largest key in bytes (keys must be at least 1 byte). */
  maxKeyBytes: number;
  /** Largest value in bytes, schema prefix excluded (values must be at least 1 byte). */
  maxValueBytes: number;
}

export const DEFAULT_LIMITS: RecordLimits = { maxKeyBytes: 1024, maxValueBytes: 64 * 1024 };

/** A validation failure; `index` is the record's position in the batch (0-based). */
export class RecordFormatError extends Error {
  constructor(
    message: string,
    readonly index: number,
  ) {
    super(message);
  }
}

export interface BatchSummary {
  count: number;
  /** Schema versions seen in PUT records of the batch. */
  schemas: Set<number>;
}

/**
 * Checks a packed batch completely before anything is applied, so a bad batch changes nothing.
 * Throws RecordFormatError naming the first bad record.
 */
export function validateRecords(buf: Buffer, expectedCount: number, limits: RecordLimits): BatchSummary {
  let off = 0;
  let count = 0;
  const schemas = new Set<number>();
  const end = buf.length;
  while (off < end) {
    if (off + RECORD_HEADER_BYTES > end) {
      throw new RecordFormatError(`record ${count}: truncated header (${end - off} bytes left, need 7)`, count);
    }
    const op = buf[off];
    const keyLen = buf.readUInt16BE(off + 1);
    const valLen = buf.readUInt32BE(off + 3);
    off += RECORD_HEADER_BYTES;
    if (op === OP_PUT || op === OP_DELETE) {
      if (keyLen === 0) throw new RecordFormatError(`record ${count}: empty key`, count);
      if (keyLen > limits.maxKeyBytes) {
        throw new RecordFormatError(`record ${count}: key of ${keyLen} bytes exceeds the limit of ${limits.maxKeyBytes}`, count);
      }
    }
    if (op === OP_PUT) {
      if (valLen === 0) throw new RecordFormatError(`record ${count}: empty value for a PUT (use DELETE to remove a key)`, count);
      if (valLen > limits.maxValueBytes) {
        throw new RecordFormatError(`record ${count}: value of ${valLen} bytes exceeds the limit of ${limits.maxValueBytes}`, count);
      }
      const need = keyLen + SCHEMA_BYTES + valLen;
      if (off + need > end) throw new RecordFormatError(`record ${count}: truncated (needs ${need} bytes, ${end - off} left)`, count);
      const schema = buf.readUInt16BE(off + keyLen);
      if (schema === 0) throw new RecordFormatError(`record ${count}: schema version 0 is not valid`, count);
      schemas.add(schema);
      off += need;
    } else if (op === OP_DELETE) {
      if (valLen !== 0) throw new RecordFormatError(`record ${count}: DELETE carries a value length of ${valLen}`, count);
      if (off + keyLen > end) throw new RecordFormatError(`record ${count}: truncated key`, count);
      off += keyLen;
    } else if (op === OP_CLEAR) {
      if (keyLen !== 0 || valLen !== 0) throw new RecordFormatError(`record ${count}: CLEAR carries a key or value`, count);
    } else {
      throw new RecordFormatError(`record ${count}: unknown op ${op} (1 PUT, 2 DELETE, 3 CLEAR)`, count);
    }
    count++;
  }
  if (count === 0) throw new RecordFormatError('batch holds no records', 0);
  if (count !== expectedCount) {
    throw new RecordFormatError(`batch declares ${expectedCount} records but holds ${count}`, count);
  }
  return { count, schemas };
}

/** What a builder holds after takeOwned() gave its buffer away. */
const EMPTY = Buffer.alloc(0);

/**
 * Appends records to a growing buffer: the SDK's write batches (and tests' hand-made ones).
 * Reuse one builder with take(), or give a single-use one up with takeOwned().
 */
export class RecordBuilder {
  private buf: Buffer;
  private off = 0;
  count = 0;

  constructor(initialBytes = 256 * 1024) {
    this.buf = Buffer.allocUnsafe(initialBytes);
  }

  get bytes(): number {
    return this.off;
  }

  private ensure(n: number): void {
    if (this.off + n <= this.buf.length) return;
    let size = Math.max(256, this.buf.length * 2);
    while (size < this.off + n) size *= 2;
    const next = Buffer.allocUnsafe(size);
    this.buf.copy(next, 0, 0, this.off);
    this.buf = next;
  }

  put(key: Buffer | string, schema: number, value: Buffer): void {
    const keyLen = typeof key === 'string' ? Buffer.byteLength(key, 'latin1') : key.length;
    this.ensure(RECORD_HEADER_BYTES + keyLen + SCHEMA_BYTES + value.length);
    const b = this.buf;
    let o = this.off;
    b[o] = OP_PUT;
    b.writeUInt16BE(keyLen, o + 1);
    b.writeUInt32BE(value.length, o + 3);
    o += RECORD_HEADER_BYTES;
    if (typeof key === 'string') b.latin1Write(key, o);
    else key.copy(b, o);
    o += keyLen;
    b.writeUInt16BE(schema, o);
    o += SCHEMA_BYTES;
    value.copy(b, o);
    this.off = o + value.length;
    this.count++;
  }

  delete(key: Buffer | string): void {
    const keyLen = typeof key === 'string' ? Buffer.byteLength(key, 'latin1') : key.length;
    this.ensure(RECORD_HEADER_BYTES + keyLen);
    const b = this.buf;
    const o = this.off;
    b[o] = OP_DELETE;
    b.writeUInt16BE(keyLen, o + 1);
    b.writeUInt32BE(0, o + 3);
    if (typeof key === 'string') b.latin1Write(key, o + RECORD_HEADER_BYTES);
    else key.copy(b, o + RECORD_HEADER_BYTES);
    this.off = o + RECORD_HEADER_BYTES + keyLen;
    this.count++;
  }

  clear(): void {
    this.ensure(RECORD_HEADER_BYTES);
    this.buf[this.off] = OP_CLEAR;
    this.buf.writeUInt16BE(0, this.off + 1);
    this.buf.writeUInt32BE(0, this.off + 3);
    this.off += RECORD_HEADER_BYTES;
    this.count++;
  }

  /**
   * Returns the records so far without copying and gives up the buffer (for single-use builders:
   * saves a copy and an allocation per batch, which matters for GC at thousands of batches/s).
   */
  takeOwned(): { records: Buffer; count: number } {
    const records = this.buf.subarray(0, this.off);
    const count = this.count;
    this.buf = EMPTY; // a builder given up usually dies with its batch: allocate only if reused
    this.off = 0;
    this.count = 0;
    return { records, count };
  }

  /** Returns a copy of the records so far and starts over. */
  take(): { records: Buffer; count: number } {
    const records = Buffer.from(this.buf.subarray(0, this.off));
    const count = this.count;
    this.off = 0;
    this.count = 0;
    return { records, count };
  }
}
