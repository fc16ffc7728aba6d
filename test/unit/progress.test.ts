/**
 * Progress display of issu and the demo (agent/cli/progress.ts): sparse, never repeated lines on
 * a pipe; NDJSON with --json; bars with percent, rate and time left on a real terminal (node-pty).
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import * as pty from 'node-pty';
import { ProgressEvent, progressView } from '../../agent/cli/progress';

const MiB = 1024 * 1024;

/** The events of a loadversion: image hashed per MiB, a snapshot, a catch-up with lag falling. */
function loadEvents(): { at: number; e: ProgressEvent }[] {
  const out: { at: number; e: ProgressEvent }[] = [];
  let at = 0;
  const ev = (e: Partial<ProgressEvent>, dt = 100) =>
    out.push({ at: (at += dt), e: { type: 'PROGRESS', phase: 'LOADING', message: '', done: 0, total: 0, ...e } });
  ev({ type: 'PHASE', message: 'loading 2.0.0 into standby VM cp-2' });
  for (let mb = 0; mb <= 121; mb++) ev({ step: 'verify image', unit: 'bytes', message: 'sha256 of /images/cp-2', done: mb * MiB, total: 121 * MiB });
  for (let i = 0; i < 30; i++) ev({ message: 'bgp: waiting for the process to register' }, 200); // repeated: shown once
  for (let r = 0; r <= 20_000; r += 500) ev({ step: 'snapshot bgp', unit: 'records', message: 'bgp: bulk snapshot', done: r, total: 20_000 }, 200);
  for (let lag = 250; lag >= 0; lag -= 10) ev({ step: 'catch up bgp', unit: 'batches', message: 'bgp: applying changes', done: 250 - lag, total: 250 }, 200);
  ev({ message: 'bgp: READY' });
  ev({ type: 'PHASE', phase: 'LOADED', message: 'every process READY' });
  return out;
}

function collect(): { out: PassThrough; text: () => string } {
  const out = new PassThrough();
  let text = '';
  out.on('data', (d: Buffer) => (text += d.toString()));
  return { out, text: () => text };
}

describe('progress display', () => {
  it('on a pipe: a line when a step starts and ends, at most one every 5 s in between, never the same line twice', () => {
    const { out, text } = collect();
    let now = 0;
    const view = progressView({ json: false, tty: false, out, now: () => now, prefix: 'issu: ' });
    const events = loadEvents();
    for (const { at, e } of events) {
      now = at;
      view.event(e);
    }
    view.close();
    const lines = text().trim().split('\n');
    assert.equal(new Set(lines).size, lines.length, 'no line twice');
    assert.ok(lines.every((l) => l.startsWith('issu: ')));
    const of = (step: string) => lines.filter((l) => l.startsWith(`issu: ${step}:`));
    // verify: 12.1 s of hashing -> start, two in-between lines (5 s apart), done.
    assert.deepEqual(
      of('verify image').map((l) => l.split(':')[2].trim().split(/[ ,]/)[0]),
      ['started', '41%', '82%', 'done'],
    );
    assert.match(of('verify image')[1], /\(50\.0 MiB of 121\.0 MiB\), 10\.0 MiB\/s, about 8 s left$/);
    assert.match(of('verify image').at(-1)!, /done, 121\.0 MiB in 12\.1 s \(10\.0 MiB\/s\)$/);
    assert.equal(lines.filter((l) => l.includes('waiting for the process to register')).length, 1);
    assert.match(of('snapshot bgp')[0], /started, 20,000 records/);
    assert.match(of('snapshot bgp').at(-1)!, /done, 20,000 records in 8\.0 s \(2,500 records\/s\)/);
    assert.match(of('catch up bgp').at(-1)!, /done, 250 batches/);
    assert.ok(lines.length <= 20, `${lines.length} lines for ${events.length} events`);
    assert.match(lines.at(-1)!, /phase LOADED: every process READY/);
  });

  it('with --json: every event, one JSON object per line', () => {
    const { out, text } = collect();
    const view = progressView({ json: true, tty: false, out });
    const events = loadEvents();
    for (const { e } of events) view.event(e);
    assert.deepEqual(
      text()
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l)),
      events.map((x) => x.e),
    );
  });

  it('on a terminal (a real pty): one bar per step with percent, amount, rate and time left, phases above', async function () {
    this.timeout(30_000);
    // A child process whose stderr is the pty renders the same events (1 ms apart).
    const script = `
      const { progressView } = require(${JSON.stringify(path.resolve(__dirname, '../../agent/cli/progress.js'))});
      const view = progressView({ json: false, tty: process.stderr.isTTY, out: process.stderr });
      const events = ${JSON.stringify(loadEvents().map((x) => x.e))};
      let i = 0;
      const next = () => { if (i < events.length) { view.event(events[i++]); setTimeout(next, 1); } else { view.close(); } };
      next();`;
    const term = pty.spawn(process.execPath, ['-e', script], { cols: 120, rows: 30, env: process.env as Record<string, string> });
    let screen = '';
    term.onData((d) => (screen += d));
    const code = await new Promise<number>((resolve) => term.onExit((e) => resolve(e.exitCode)));
    assert.equal(code, 0, screen);
    const plain = screen.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, ''); // eslint-disable-line no-control-regex
    assert.match(plain, /phase LOADING: loading 2\.0\.0 into standby VM cp-2/);
    assert.match(plain, /verify image\s+\[[█░]+\] 100% \| 121\.0 MiB of 121\.0 MiB \| [\d.]+ MiB\/s \| done in [\d.]+ s/);
    assert.match(plain, /snapshot bgp\s+\[[█░]+\] 100% \| 20,000 records of 20,000 records/);
    assert.match(plain, /catch up bgp\s+\[[█░]+\] 100% \| 250 batches of 250 batches/);
    assert.match(plain, /verify image\s+\[[█░]+\]\s+\d{1,2}% \| [\d.]+ MiB of 121\.0 MiB \| [\d.]+ MiB\/s \| \d+ s left/, 'a bar in progress, with time left');
    assert.equal((plain.match(/bgp: waiting for the process to register/g) ?? []).length, 1);
  });
});
