/**
 * Closing the embedded database (real SQLite in a temporary directory): the store's threads hold
 * connections of their own, and a close that returned before they had exited left them creating
 * the WAL and its index in a directory already being removed (rmdir failed with ENOTEMPTY), or
 * failing to open a database that was gone. Awaiting the close must also keep the process alive:
 * the threads never do by themselves, and the agent's shutdown has work after the close.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import { closeDatabase, openDatabase } from '../../agent/store/database';
import { SqliteCheckpointStore } from '../../agent/store/checkpoint-store';

describe('embedded database: closing', () => {
  it('returns once its threads have exited: the state directory can go at once, and nothing touches it afterwards', async () => {
    for (let i = 0; i < 5; i++) {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-close-'));
      const complaints: string[] = [];
      const log = pino({ level: 'warn' }, { write: (line: string) => void complaints.push(line) });
      try {
        // Closed right after opening: the threads may not even have opened their connections yet.
        const db = openDatabase(dir, { log });
        new SqliteCheckpointStore(db);
        await closeDatabase(db);
        fs.rmSync(dir, { recursive: true });
        // Long enough for a thread still starting to open (and so recreate or fail on) the file.
        await sleep(200);
        assert.equal(fs.existsSync(dir), false, 'nothing was created in the directory after the close');
        assert.deepEqual(complaints, [], 'no thread failed after the close');
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  it('keeps the process alive until its threads have exited, so the code after the close runs (a separate process)', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-close-'));
    try {
      // Nothing else holds this process's event loop open: the threads are unref'd.
      const script = `
        const { openDatabase, closeDatabase } = require(${JSON.stringify(require.resolve('../../agent/store/database'))});
        const { SqliteCheckpointStore } = require(${JSON.stringify(require.resolve('../../agent/store/checkpoint-store'))});
        const db = openDatabase(${JSON.stringify(dir)});
        new SqliteCheckpointStore(db);
        closeDatabase(db).then(() => process.stdout.write('after the close'));`;
      const out = execFileSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30_000 });
      assert.equal(out, 'after the close');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('may be asked twice: the second close returns only when the first is done, never earlier', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-close-'));
    try {
      const db = openDatabase(dir);
      new SqliteCheckpointStore(db);
      const order: string[] = [];
      await Promise.all([closeDatabase(db).then(() => order.push('first')), closeDatabase(db).then(() => order.push('second'))]);
      // A second close that did not wait would close the connection while the threads still ran,
      // and return before the first.
      assert.deepEqual(order, ['first', 'second']);
      assert.equal(db.open, false);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
