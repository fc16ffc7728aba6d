/**
 * BulkServer on a real unix socket: `onClosed` (which releases the snapshot whose arenas the
 * frames point into) must come only once nothing can still read those bytes: after the reader
 * got every byte, or after the transfer failed, or when the ticket expired unredeemed.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { BulkServer } from '../../agent/checkpoint/bulk-server';
import { silentLogger } from '../../agent/common/logger';

describe('BulkServer: when a transfer lets go of its buffers', () => {
  let dir: string;
  let server: BulkServer;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-bulk-'));
    server = new BulkServer({ unixPath: path.join(dir, 'bulk.sock'), ticketTtlMs: 300, stallTimeoutMs: 2000 }, silentLogger);
    await server.listen();
  });

  afterEach(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Connects, presents the token, waits `pauseMs` before reading, then reads to the end. */
  function read(token: Buffer, pauseMs: number, stopAfter = Infinity): { received: () => number; done: Promise<void> } {
    let received = 0;
    const sock = net.connect(server.unixPath);
    const done = new Promise<void>((resolve) => {
      sock.on('connect', () => {
        sock.write(token);
        sock.pause();
        setTimeout(() => sock.resume(), pauseMs);
      });
      sock.on('data', (d: Buffer) => {
        received += d.length;
        if (received >= stopAfter) sock.destroy();
      });
      sock.on('close', () => resolve());
      sock.on('error', () => undefined);
    });
    return { received: () => received, done };
  }

  it('a slow reader: onDone may come first, onClosed only after every byte was read, once', async () => {
    const payload = Buffer.alloc(4 * 1024 * 1024, 7); // far more than the socket buffers hold
    const frames = 16;
    const expected = frames * (8 + payload.length / frames) + 8;
    const events: string[] = [];
    let receivedAtClose = -1;
    let reader: ReturnType<typeof read> | null = null;
    const closed = new Promise<void>((resolve) => {
      const token = server.issue(
        async (out) => {
          for (let i = 0; i < frames; i++) await out.frame(payload.subarray((i * payload.length) / frames, ((i + 1) * payload.length) / frames), 1);
          return frames;
        },
        (err) => events.push(err ? `done:${err.message}` : 'done'),
        () => {
          events.push('closed');
          receivedAtClose = reader!.received();
          resolve();
        },
      );
      reader = read(token, 200);
    });
    await closed;
    await reader!.done;
    await new Promise((r) => setTimeout(r, 50)); // a second onClosed would have come by now
    assert.deepEqual(events, ['done', 'closed']);
    assert.equal(receivedAtClose, expected, 'every byte had reached the reader when the buffers were let go');
  });

  it('a reader that goes away mid-transfer: onDone with the error, then onClosed once', async () => {
    const payload = Buffer.alloc(4 * 1024 * 1024, 1);
    const events: string[] = [];
    await new Promise<void>((resolve) => {
      const token = server.issue(
        async (out) => {
          for (let i = 0; i < 64; i++) await out.frame(payload.subarray(i * 65536, (i + 1) * 65536), 1);
          return 64;
        },
        (err) => events.push(err ? 'done:error' : 'done'),
        () => {
          events.push('closed');
          resolve();
        },
      );
      read(token, 0, 256 * 1024);
    });
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(events, ['done:error', 'closed']);
  });

  it('a reader that stops reading: the producer waits, onDone says so after the stall timeout, then onClosed once', async () => {
    const payload = Buffer.alloc(1024 * 1024, 3);
    const events: string[] = [];
    let framesHanded = 0;
    let sock: net.Socket | null = null;
    await new Promise<void>((resolve) => {
      const token = server.issue(
        async (out) => {
          for (let i = 0; i < 64; i++) {
            await out.frame(payload, 1);
            framesHanded++;
          }
          return 64;
        },
        (err) => events.push(err ? `done:${err.message}` : 'done'),
        () => {
          events.push('closed');
          resolve();
        },
      );
      sock = net.connect(server.unixPath, () => {
        sock!.write(token);
        sock!.pause(); // reads nothing, stays connected
      });
      sock.on('error', () => undefined);
    });
    sock!.destroy();
    assert.deepEqual(events, ['done:snapshot reader stopped reading for 2000 ms', 'closed']);
    // The socket buffers hold a few hundred KiB: the producer stopped within a few frames.
    assert.ok(framesHanded < 8, `the producer waited for the reader (${framesHanded} frames handed over)`);
  });

  it('a ticket never redeemed: onDone says so when it expires, then onClosed once; the producer never ran', async () => {
    const events: string[] = [];
    let ran = false;
    await new Promise<void>((resolve) => {
      server.issue(
        async () => {
          ran = true;
          return 0;
        },
        (err) => events.push(err ? err.message : 'done'),
        () => {
          events.push('closed');
          resolve();
        },
      );
    });
    assert.equal(ran, false);
    assert.match(events[0], /not redeemed within 300 ms/);
    assert.equal(events[1], 'closed');
  });
});
