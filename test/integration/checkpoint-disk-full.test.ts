/**
 * The agent's state disk gets full: writes are refused with RESOURCE_EXHAUSTED and a sentence an
 * operator can act on, nothing acknowledged is lost or changed (also across a kill -9 of the
 * agent while the disk is full), nothing of a refused batch reaches the agent's replica or a
 * subscriber, and once there is room again the writer's kept batches are stored in order by
 * themselves. Real processes on a real (small) tmpfs, filled with a file until writes fail.
 */
import * as grpc from '@grpc/grpc-js';
import Database from 'better-sqlite3';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { AuditResponse, StatusResponse, TableDigest } from '../../agent/checkpoint/messages';
import { RecordBuilder } from '../../agent/checkpoint/records';
import { TableReplica } from '../../agent/checkpoint/table-replica';
import { CheckpointService } from '../../agent/checkpoint/checkpoint.service';
import type { BulkServer } from '../../agent/checkpoint/bulk-server';
import { HitlessError } from '../../agent/common/errors';
import { silentLogger } from '../../agent/common/logger';
import { CheckpointClient, CheckpointError } from '../../agent/sdk/checkpoint-client';
import { SqliteCheckpointStore } from '../../agent/store/checkpoint-store';
import { closeDatabase, Db, openDatabase } from '../../agent/store/database';
import { freeBytes } from '../../agent/common/disk-space';
import { checkpointIfRoom } from '../../agent/store/wal-checkpoint';
import { AgentHandle, startAgent, stopAllAgents, tempDir } from '../../harness/agent-process';
import { AnyClient, expectStatus, rawClient, registerRaw, unaryCall } from '../../harness/grpc-client';
import { until } from '../../harness/wait';

const FULL = (dir: string) => new RegExp(`^the agent's state disk is full \\(${dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\): free space, then `);

/** A tmpfs of `size` mounted on a fresh temporary directory; `remove()` unmounts and deletes it. */
function mountTmpfs(prefix: string, size: string): { dir: string; remove: () => void } {
  const dir = tempDir(prefix);
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'pipe' });
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  return {
    dir,
    remove: () => {
      try {
        execFileSync('umount', [dir], { stdio: 'pipe' });
      } catch {
        execFileSync('umount', ['-l', dir], { stdio: 'pipe' }); // something still holds a file open
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Appends to `file` until the filesystem refuses more (ENOSPC); returns the bytes written. */
function fillDisk(file: string): number {
  const fd = fs.openSync(file, 'a');
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  let total = 0;
  try {
    for (;;) {
      try {
        total += fs.writeSync(fd, chunk);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOSPC') return total;
        throw e;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Holds a standby's acknowledgements back while `hold()` is on, so SYNC batches stay unacknowledged. */
class AckGate {
  private held: (() => void)[] | null = null;

  hold(): void {
    this.held = [];
  }

  release(): void {
    const held = this.held ?? [];
    this.held = null;
    for (const go of held) go();
  }

  interceptor(): grpc.Interceptor {
    return (options, nextCall) => {
      const isAck = options.method_definition.path.endsWith('/Ack');
      return new grpc.InterceptingCall(nextCall(options), {
        sendMessage: (msg, next) => {
          if (isAck && this.held) this.held.push(() => next(msg));
          else next(msg);
        },
      });
    };
  }
}

/** Skips the suite when this process cannot mount a tmpfs, saying why. */
function requireRoot(ctx: Mocha.Context): void {
  if (process.getuid?.() !== 0) {
    console.log('    (skipped: mounting the small tmpfs that gets full needs root)');
    ctx.skip();
  }
}

describe("checkpoint: the agent's state disk gets full", function () {
  this.timeout(180_000);
  let disk: { dir: string; remove: () => void } | null = null;
  let agent: AgentHandle;
  let c: AnyClient | null = null;
  const clients: CheckpointClient[] = [];

  before(function () {
    requireRoot(this);
    disk = mountTmpfs('diskfull', '24m');
  });

  after(async () => {
    for (const x of clients) await x.close().catch(() => undefined);
    c?.close();
    await stopAllAgents();
    disk?.remove();
  });

  it('refuses writes with RESOURCE_EXHAUSTED, loses nothing acknowledged, and resumes by itself once there is room', async () => {
    const stateDir = path.join(disk!.dir, 'state');
    const filler = path.join(disk!.dir, 'filler');
    agent = await startAgent({ stateDir });
    c = rawClient('hitless.v1.Checkpoint', agent.socket);
    const status = async (p = 'bgp') => (await unaryCall<StatusResponse>(c!, 'Status', { process: p })).processes[0];
    const seqsAtAgent = async () => Object.fromEntries((await status()).tables.map((t) => [t.name, t.seq]));

    const common = {
      address: agent.socket,
      process: 'bgp',
      softwareVersion: '1.0.0',
      schema: 1,
      tables: [
        { name: 'rib', durability: 'ASYNC' as const },
        { name: 'adj', durability: 'SYNC' as const },
      ],
    };
    const active = new CheckpointClient({ ...common, instanceId: 'bgp@vm1', vmId: 'vm1', role: 'ACTIVE' });
    const acks = new AckGate();
    // The gate is a gRPC interceptor: this standby acknowledges on the gRPC Ack stream (the
    // active writes on a frame channel, the SDK's default).
    const standby = new CheckpointClient({
      ...common,
      instanceId: 'bgp@vm2',
      vmId: 'vm2',
      role: 'STANDBY',
      interceptors: [acks.interceptor()],
      channels: 'grpc',
    });
    clients.push(active, standby);
    const errors: Error[] = [];
    const fullEvents: CheckpointError[] = [];
    let resumedEvents = 0;
    active.on('error', (e: Error) => errors.push(e));
    standby.on('error', (e: Error) => errors.push(e));
    active.on('storage-full', (e: CheckpointError) => fullEvents.push(e));
    active.on('storage-resumed', () => resumedEvents++);

    // The writer: batch i goes to 'rib' or 'adj', overwrites some keys and deletes others. It
    // records the order batches were written in and the order their acknowledgements arrive in.
    const submitted: string[] = [];
    const acked: string[] = [];
    const lastAcked: Record<string, number> = { rib: 0, adj: 0 };
    const written: Record<string, number> = { rib: 0, adj: 0 };
    let n = 0;
    const submit = (to?: string): Promise<number> => {
      const i = n++;
      const table = to ?? (i % 3 === 2 ? 'adj' : 'rib');
      const b = active.batch(table);
      for (let j = 0; j < 8; j++) b.put(`10.${i % 50}.${j}.0/24`, Buffer.alloc(2000, (i + j) & 0xff));
      if (i % 7 === 0) b.delete(`10.${(i + 25) % 50}.0.0/24`);
      submitted.push(`${table}/${++written[table]}`);
      return b.commit().then((seq) => {
        acked.push(`${table}/${seq}`);
        lastAcked[table] = Math.max(lastAcked[table], seq);
        return seq;
      });
    };

    await active.start();
    await standby.start();
    await Promise.all(Array.from({ length: 120 }, () => submit()));
    await until('the standby is READY', async () => (await status()).peers.find((p) => p.instanceId === 'bgp@vm2')?.ready);

    // A second process writes with raw Write calls (the status check); declared while there is room.
    const probe = await registerRaw(c, {
      process: 'probe',
      instanceId: 'probe@vm1',
      vmId: 'vm1',
      softwareVersion: '1.0.0',
      schemaWrites: 1,
      schemaReads: [1],
      wantedRole: 'ACTIVE',
      tables: [{ name: 'fill', durability: 'ASYNC' }],
    });
    const probeBatch = (seq: number) => {
      const b = new RecordBuilder();
      for (let j = 0; j < 4; j++) b.put(`p${seq}.${j}`, 1, Buffer.alloc(60_000, seq & 0xff));
      return { sessionId: probe.registered.sessionId, table: 'fill', seq, ...b.take() };
    };

    let probeSeq = 0;
    /** Writes until the agent refuses (the room left in the WAL it holds takes some batches first). */
    const probeUntilRefused = async (): Promise<grpc.ServiceError> => {
      for (let tries = 0; tries < 1000; tries++) {
        try {
          await unaryCall(c!, 'Write', probeBatch(probeSeq + 1));
          probeSeq++;
        } catch (e) {
          return e as grpc.ServiceError;
        }
      }
      throw new Error('writes are still accepted on a full disk');
    };

    assert.ok(fillDisk(filler) > 0);
    const refusal = await probeUntilRefused();
    assert.equal(grpc.status[refusal.code], 'RESOURCE_EXHAUSTED', refusal.details);
    assert.match(refusal.details, FULL(stateDir));
    assert.match(refusal.details, /nothing of this batch was applied/);
    // Nothing of the refused batch was applied: the same sequence is refused again, not a duplicate.
    await expectStatus(unaryCall(c, 'Write', probeBatch(probeSeq + 1)), grpc.status.RESOURCE_EXHAUSTED, FULL(stateDir));
    assert.equal((await status('probe')).tables[0].seq, probeSeq);

    // Everything acknowledged is there and every copy is equal (the writer is idle: no batch of
    // it is outstanding).
    assert.equal(active.inFlight, 0);
    const audit1 = await unaryCall<AuditResponse>(c, 'Audit', { process: 'bgp' });
    assert.ok(audit1.consistent, audit1.detail);
    assert.deepEqual(Object.fromEntries(audit1.agent.map((d) => [d.table, d.seq])), lastAcked);

    // A SYNC batch is stored while there is a little room, and its acknowledgement waits for the
    // standby (held back here) when the batches written after it are refused: it must still be
    // acknowledged, or the writer would resend a batch the agent already holds.
    acks.hold();
    fs.truncateSync(filler, fs.statSync(filler).size - 1024 * 1024);
    const stored = submit('adj');
    await until('the SYNC batch is stored', async () => (await seqsAtAgent()).adj === written.adj);
    assert.equal(active.inFlight, 1);
    fillDisk(filler);
    const again = await probeUntilRefused();
    assert.equal(grpc.status[again.code], 'RESOURCE_EXHAUSTED', again.details);
    probe.call.end();

    // The SDK writer goes on writing: its batches are refused, kept, and resent with backoff; it
    // warns once and does not fail.
    const pending = Array.from({ length: 12 }, () => submit());
    acks.release();
    await stored;
    await until('the writer hears that the agent cannot store its batches', () => fullEvents.length > 0);
    assert.equal(fullEvents[0].code, grpc.status.RESOURCE_EXHAUSTED);
    assert.match(fullEvents[0].message, FULL(stateDir));
    const refusedWrites = () =>
      agent
        .stderr()
        .split('\n')
        .filter((l) => l.includes('WriteStream') && l.includes('RESOURCE_EXHAUSTED')).length;
    await until('the writer resent and was refused again', () => refusedWrites() >= 2);
    assert.equal(errors.length, 0, errors.map((e) => e.message).join('; '));
    const kept = active.inFlight;
    assert.ok(kept > 0, 'the writer keeps its unacknowledged batches');
    assert.equal(acked.length + kept, submitted.length, 'every batch is acknowledged or kept');
    assert.deepEqual(await seqsAtAgent(), lastAcked, 'the agent applied nothing it did not acknowledge');
    await until(
      'the standby applied what the agent acknowledged',
      () => standby.table('rib').seq === lastAcked.rib && standby.table('adj').seq === lastAcked.adj,
    );
    const ackedState: Record<string, TableDigest> = {};
    for (const t of ['rib', 'adj']) ackedState[t] = { table: t, ...standby.digest(t) };
    assert.equal(agent.proc.exitCode, null, 'the agent is still running');

    // kill -9 while the disk is full: the agent starts on the same state directory with exactly
    // what it acknowledged; the writer re-registers and is refused again, still without failing.
    await agent.kill9();
    c.close();
    agent = await startAgent({ stateDir });
    c = rawClient('hitless.v1.Checkpoint', agent.socket);
    assert.deepEqual(await seqsAtAgent(), lastAcked);
    await until('the writer is back as ACTIVE and refused again', async () => {
      const p = (await status()).peers.find((x) => x.instanceId === 'bgp@vm1');
      return p?.role === 'ACTIVE' && refusedWrites() >= 1;
    });
    // A standby that starts now loads the recovered tables: equal to the acknowledged state.
    const fresh = new CheckpointClient({ ...common, address: agent.socket, instanceId: 'bgp@vm3', vmId: 'vm3', role: 'STANDBY' });
    clients.push(fresh);
    fresh.on('error', (e: Error) => errors.push(e));
    await fresh.start();
    await until('the fresh standby loaded the recovered tables', () => fresh.table('rib').seq === lastAcked.rib && fresh.table('adj').seq === lastAcked.adj);
    for (const t of ['rib', 'adj']) assert.deepEqual({ table: t, ...fresh.digest(t) }, ackedState[t]);
    await until('the first standby follows the restarted agent', async () => (await status()).peers.find((p) => p.instanceId === 'bgp@vm2')?.ready);
    assert.deepEqual({ rib: standby.table('rib').seq, adj: standby.table('adj').seq }, lastAcked, 'no subscriber got a refused batch');
    assert.equal(active.inFlight, kept);
    assert.equal(errors.length, 0, errors.map((e) => e.message).join('; '));

    // Room again: the kept batches are stored and acknowledged in the order they were written,
    // by themselves, and every copy is equal.
    fs.rmSync(filler);
    await Promise.all(pending);
    assert.deepEqual(acked, submitted, 'acknowledgements arrive in the order the batches were written');
    assert.equal(active.inFlight, 0);
    assert.equal(fullEvents.length, 1, 'one warning for the whole episode, agent restart included');
    assert.equal(resumedEvents, 1);
    await Promise.all(Array.from({ length: 5 }, () => submit())); // and later writes just work
    const audit2 = await unaryCall<AuditResponse>(c, 'Audit', { process: 'bgp' });
    assert.ok(audit2.consistent, audit2.detail);
    assert.deepEqual(audit2.peers.map((p) => p.instanceId).sort(), ['bgp@vm1', 'bgp@vm2', 'bgp@vm3']);
    assert.deepEqual(Object.fromEntries(audit2.agent.map((d) => [d.table, d.seq])), lastAcked);
    assert.equal(errors.length, 0, errors.map((e) => e.message).join('; '));
    assert.doesNotMatch(agent.stderr(), /unexpected error in RPC handler/);
  });
});

describe('checkpoint: compaction when the state disk is full', function () {
  this.timeout(60_000);
  let disk: { dir: string; remove: () => void } | null = null;
  let db: Db | null = null;

  before(function () {
    requireRoot(this);
    disk = mountTmpfs('compactfull', '8m');
  });

  after(async () => {
    if (db) await closeDatabase(db);
    disk?.remove();
  });

  it('fails with RESOURCE_EXHAUSTED and leaves the log and the current snapshot as they were', async () => {
    const stateDir = path.join(disk!.dir, 'state');
    db = openDatabase(stateDir);
    const store = new SqliteCheckpointStore(db);
    const svc = new CheckpointService(store, {} as BulkServer, silentLogger);
    const r = new TableReplica('bgp', 'rib');
    store.upsertTable('bgp', 'rib', 1);
    for (let seq = 1; seq <= 40; seq++) {
      const b = new RecordBuilder();
      for (let j = 0; j < 16; j++) b.put(`10.${seq}.${j}.0/24`, 1, Buffer.alloc(4000, seq));
      const { records, count } = b.take();
      await store.appendBatch('bgp', 'rib', seq, records, count);
      r.applyBatch(seq, records, [1]);
    }
    // Every committed page into the database file and an empty WAL: what compaction writes next
    // needs new space.
    db.pragma('wal_checkpoint(TRUNCATE)');
    fillDisk(path.join(disk!.dir, 'filler'));

    await assert.rejects(svc.compact('bgp', r), (e: unknown) => {
      assert.ok(e instanceof HitlessError, String(e));
      assert.equal(grpc.status[e.code], 'RESOURCE_EXHAUSTED');
      assert.match(e.message, FULL(stateDir));
      return true;
    });
    assert.deepEqual(
      store.listTables().map((t) => [t.snapSeq, t.snapGen]),
      [[0, 0]],
      'no snapshot became current',
    );
    assert.deepEqual(
      store.readBatches('bgp', 'rib', 0, 100).map((b) => b.seq),
      Array.from({ length: 40 }, (_, i) => i + 1),
      'the log holds every batch',
    );
    assert.equal(store.logFloor('bgp', 'rib'), 0);
    assert.deepEqual([...store.snapshotChunks('bgp', 'rib')], []);

    // With room again the next compaction works and the table rebuilt from it is the same.
    fs.rmSync(path.join(disk!.dir, 'filler'));
    await svc.compact('bgp', r);
    assert.equal(store.listTables()[0].snapSeq, 40);
    assert.deepEqual(store.readBatches('bgp', 'rib', 0, 100), []);
    const rebuilt = new TableReplica('bgp', 'rib');
    for (const chunk of store.snapshotChunks('bgp', 'rib')) rebuilt.table.append(chunk);
    assert.equal(rebuilt.records, r.records);
    assert.equal(rebuilt.bytes, r.bytes);
  });
});

describe('checkpoint: WAL checkpoints when the state disk is nearly full', function () {
  this.timeout(60_000);
  let disk: { dir: string; remove: () => void } | null = null;
  const open: Database.Database[] = [];

  before(function () {
    requireRoot(this);
    disk = mountTmpfs('walroom', '16m');
  });

  after(() => {
    for (const d of open) d.close();
    disk?.remove();
  });

  it('does not start a checkpoint it has no room to finish, so the room freed stays for the WAL appends', () => {
    const file = path.join(disk!.dir, 'hitless.db');
    const filler = path.join(disk!.dir, 'filler');
    // The writer: the agent's connection, without checkpoints of its own.
    const w = new Database(file);
    open.push(w);
    w.pragma('journal_mode = WAL');
    w.pragma('wal_autocheckpoint = 0');
    w.exec('CREATE TABLE t (b BLOB)');
    w.pragma('wal_checkpoint(TRUNCATE)');
    const insert = w.prepare('INSERT INTO t (b) VALUES (?)');
    // Two MiB of new pages in the WAL: copying them into the database needs that much room.
    for (let i = 0; i < 32; i++) insert.run(Buffer.alloc(64 * 1024, i));
    assert.ok(fillDisk(filler) > 0);
    fs.truncateSync(filler, fs.statSync(filler).size - 1024 * 1024);
    const freed = freeBytes(disk!.dir);

    // The checkpointer's own connection, as in the worker thread.
    const c = new Database(file);
    open.push(c);
    const r = checkpointIfRoom(c, file);
    assert.equal(r.ran, false);
    assert.ok(!r.ran && r.growBytes >= 2 * 1024 * 1024 && r.freeBytes === freed, JSON.stringify(r));
    assert.equal(freeBytes(disk!.dir), freed, 'the skipped checkpoint wrote nothing');
    // The freed megabyte takes a half-megabyte batch.
    insert.run(Buffer.alloc(512 * 1024, 0xee));

    // With room, the checkpoint runs and copies the whole WAL.
    fs.rmSync(filler);
    assert.deepEqual(checkpointIfRoom(c, file), { ran: true, complete: true });
    const [wal] = w.pragma('wal_checkpoint(PASSIVE)') as { busy: number; log: number; checkpointed: number }[];
    assert.equal(wal.checkpointed, wal.log);
    assert.equal((w.prepare('SELECT COUNT(*) AS n FROM t').get() as { n: number }).n, 33);
  });
});
