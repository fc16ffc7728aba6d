/**
 * A batch sent again while its first copy is still on the store's writer thread: an active that
 * lost its connection registers again, is told the applied sequence (the batches still being
 * stored are not applied yet), and resends from there. The service runs in this process on a real
 * SQLite store with its real writer thread; the session channel is a stand-in that records
 * nothing (no role command is expected).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { BulkServer } from '../../agent/checkpoint/bulk-server';
import { CheckpointService } from '../../agent/checkpoint/checkpoint.service';
import { RecordBuilder } from '../../agent/checkpoint/records';
import { HitlessError } from '../../agent/common/errors';
import { silentLogger } from '../../agent/common/logger';
import { SqliteCheckpointStore } from '../../agent/store/checkpoint-store';
import { closeDatabase, Db, openDatabase } from '../../agent/store/database';

describe('write path: a batch resent while its first copy is being stored', () => {
  let dir = '';
  let db: Db;
  let svc: CheckpointService;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-resend-'));
    db = openDatabase(dir);
    svc = new CheckpointService(new SqliteCheckpointStore(db), {} as BulkServer, silentLogger);
  });

  afterEach(async () => {
    await closeDatabase(db);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const channel = { send: () => undefined, close: () => undefined };
  const register = () =>
    svc.register(
      {
        process: 'bgp',
        instanceId: 'bgp@vm1',
        vmId: 'vm1',
        softwareVersion: '1',
        schemaWrites: 1,
        schemaReads: [],
        wantedRole: 'ACTIVE',
        tables: [{ name: 'rib', durability: 'ASYNC' }],
        schemaCanWrite: [],
        rejoin: true,
      },
      channel,
      null,
    );
  const batch = (fill: number) => {
    const b = new RecordBuilder();
    b.put(`10.${fill}.0.0/16`, 1, Buffer.alloc(64, fill));
    return b.take();
  };
  const stored = () =>
    (db.prepare("SELECT seq, records FROM ckpt_batches WHERE process = 'bgp' ORDER BY seq").all() as { seq: number; records: Buffer }[]).map((r) => r.seq);

  it('acknowledges the resent copy once the first is applied, and stores it once', async () => {
    const first = register();
    const one = batch(1);
    const a = svc.write({ sessionId: first.sessionId, table: 'rib', seq: 1, ...one }, null);
    // The connection is lost before the ack; the instance registers again at once.
    svc.unregister(first.sessionId, 'connection lost');
    const again = register();
    assert.equal(again.tableSeqs.rib, 0, 'told the applied sequence: batch 1 is still being stored');
    const b = svc.write({ sessionId: again.sessionId, table: 'rib', seq: 1, ...batch(1) }, null);
    assert.deepEqual(await b, { table: 'rib', seq: 1 });
    assert.deepEqual(await a, { table: 'rib', seq: 1 });
    assert.deepEqual(stored(), [1]);
    // And the writer carries on from there.
    assert.deepEqual(await svc.write({ sessionId: again.sessionId, table: 'rib', seq: 2, ...batch(2) }, null), { table: 'rib', seq: 2 });
    assert.deepEqual(stored(), [1, 2]);
  });

  it('refuses a different batch under the sequence being stored, with ALREADY_EXISTS, changing nothing', async () => {
    const s = register();
    const a = svc.write({ sessionId: s.sessionId, table: 'rib', seq: 1, ...batch(1) }, null);
    assert.throws(
      () => svc.write({ sessionId: s.sessionId, table: 'rib', seq: 1, ...batch(9) }, null),
      (e: unknown) => e instanceof HitlessError && e.code === grpc.status.ALREADY_EXISTS && /being stored with other contents/.test(e.message),
    );
    await a;
    const row = db.prepare("SELECT records FROM ckpt_batches WHERE process = 'bgp' AND seq = 1").get() as { records: Buffer };
    assert.ok(row.records.equals(batch(1).records), 'the first copy is what is stored');
  });
});
