/**
 * How `issu` and the demo show an upgrade's progress (the agent's Upgrade.Events stream):
 *
 * - On a terminal: one bar per step (bytes verified, snapshot records applied, lag falling to
 *   zero) with percent, rate and time left, updated in place; phases and warnings print above
 *   the bars. Bars are drawn by cli-progress (maintained, no dependencies, handles terminal
 *   width, redraw throttling and cursor hiding; a hand-written renderer would redo all that).
 * - On a pipe (a log, CI): a line when a step starts and when it ends, and at most one every
 *   `everyMs` in between, only when it says something new; never the same line twice.
 * - With --json: every event as one JSON object per line (NDJSON).
 */
import { MultiBar, Presets, SingleBar } from 'cli-progress';

/** One event of the Upgrade.Events stream (proto UpgradeEvent). */
export interface ProgressEvent {
  type: string;
  upgradeId?: string;
  phase: string;
  message: string;
  done: number;
  total: number;
  atMs?: number;
  /** What the counts measure, e.g. "verify image", "sync bgp"; empty for plain messages. */
  step?: string;
  /** Unit of done/total: bytes, records, batches, processes. */
  unit?: string;
}

export interface ProgressView {
  event(e: ProgressEvent): void;
  /** Ends the display (bars stay on screen as they are). */
  close(): void;
}

export interface ProgressOptions {
  json: boolean;
  /** Draw bars (a terminal); false writes lines. */
  tty: boolean;
  out: NodeJS.WritableStream;
  /** Milliseconds between two in-between lines of one step on a pipe (default 5000). */
  everyMs?: number;
  now?: () => number;
  /** Prefix of every line on a pipe, e.g. "issu: ". */
  prefix?: string;
}

export function progressView(opts: ProgressOptions): ProgressView {
  if (opts.json) return { event: (e) => opts.out.write(JSON.stringify(e) + '\n'), close: () => undefined };
  return opts.tty ? new BarView(opts) : new LineView(opts);
}

const MiB = 1024 * 1024;

/** "121.9 MiB" for bytes, "20,000 records" otherwise. */
export function amount(n: number, unit = ''): string {
  if (unit === 'bytes') return `${(n / MiB).toFixed(1)} MiB`;
  return `${n.toLocaleString('en-US')}${unit ? ` ${unit}` : ''}`;
}

function rate(n: number, seconds: number, unit = ''): string {
  if (seconds <= 0 || n <= 0) return '';
  const r = n / seconds;
  return unit === 'bytes' ? `${(r / MiB).toFixed(1)} MiB/s` : `${Math.round(r).toLocaleString('en-US')} ${unit || 'items'}/s`;
}

/** Whole seconds left at the rate so far, or null before there is a rate. */
function secondsLeft(done: number, total: number, secs: number): number | null {
  return done > 0 && secs > 0 ? Math.ceil(((total - done) * secs) / done) : null;
}

function eventLine(e: ProgressEvent): string {
  if (e.type === 'PHASE') return `phase ${e.phase}: ${e.message}`;
  if (e.type === 'WARNING' || e.type === 'ERROR') return `${e.type.toLowerCase()}: ${e.message}`;
  return e.step ? `${e.step}: ${e.message}` : e.message;
}

/** A step that counts (done of total). */
const counts = (e: ProgressEvent) => e.type === 'PROGRESS' && !!e.step && e.total > 0;

interface StepState {
  started: number;
  lastAt: number;
  lastLine: string;
  ended: boolean;
}

class LineView implements ProgressView {
  private readonly steps = new Map<string, StepState>();
  private readonly printed = new Set<string>();
  private readonly everyMs: number;
  private readonly now: () => number;

  constructor(private readonly opts: ProgressOptions) {
    this.everyMs = opts.everyMs ?? 5000;
    this.now = opts.now ?? Date.now;
  }

  private print(line: string): void {
    if (this.printed.has(line)) return; // never the same line twice
    this.printed.add(line);
    this.opts.out.write(`${this.opts.prefix ?? ''}${line}\n`);
  }

  event(e: ProgressEvent): void {
    if (!counts(e)) {
      this.print(eventLine(e));
      return;
    }
    const step = e.step!;
    const t = this.now();
    let s = this.steps.get(step);
    if (!s || (s.ended && e.done < e.total)) {
      s = { started: t, lastAt: t, lastLine: '', ended: false };
      this.steps.set(step, s);
      this.print(`${step}: started, ${amount(e.total, e.unit)}${e.message ? ` (${e.message})` : ''}`);
      if (e.done < e.total) return;
    }
    if (s.ended) return;
    const secs = (t - s.started) / 1000;
    if (e.done >= e.total) {
      s.ended = true;
      const r = rate(e.total, secs, e.unit);
      this.print(`${step}: done, ${amount(e.total, e.unit)} in ${secs.toFixed(1)} s${r ? ` (${r})` : ''}`);
      return;
    }
    if (t - s.lastAt < this.everyMs) return;
    const pct = Math.floor((100 * e.done) / e.total);
    const r = rate(e.done, secs, e.unit);
    const left = secondsLeft(e.done, e.total, secs);
    const line = `${step}: ${pct}% (${amount(e.done, e.unit)} of ${amount(e.total, e.unit)})${r ? `, ${r}` : ''}${left !== null ? `, about ${left} s left` : ''}`;
    if (line === s.lastLine) return;
    s.lastLine = line;
    s.lastAt = t;
    this.print(line);
  }

  close(): void {}
}

class BarView implements ProgressView {
  private readonly bars: MultiBar;
  private readonly steps = new Map<string, { bar: SingleBar; started: number; unit: string; ended: boolean }>();
  private readonly printed = new Set<string>();
  private readonly now: () => number;

  constructor(private readonly opts: ProgressOptions) {
    this.now = opts.now ?? Date.now;
    this.bars = new MultiBar(
      {
        stream: opts.out as NodeJS.WriteStream,
        format: '{step} [{bar}] {percentage}% | {amount} | {rate} | {left}',
        barsize: 24,
        hideCursor: true,
        clearOnComplete: false,
        stopOnComplete: false,
        autopadding: true,
        forceRedraw: false,
      },
      Presets.shades_classic,
    );
  }

  event(e: ProgressEvent): void {
    if (!counts(e)) {
      const line = eventLine(e);
      if (this.printed.has(line)) return; // never the same line twice
      this.printed.add(line);
      this.bars.log(`${line}\n`);
      return;
    }
    const step = e.step!;
    const t = this.now();
    let s = this.steps.get(step);
    if (!s || (s.ended && e.done < e.total)) {
      const bar = this.bars.create(e.total, 0, { step: step.padEnd(16), amount: '', rate: '', left: '' });
      s = { bar, started: t, unit: e.unit ?? '', ended: false };
      this.steps.set(step, s);
    }
    if (s.ended) return;
    const secs = (t - s.started) / 1000;
    const left = secondsLeft(e.done, e.total, secs);
    s.bar.setTotal(e.total);
    s.bar.update(Math.min(e.done, e.total), {
      amount: `${amount(e.done, s.unit)} of ${amount(e.total, s.unit)}`,
      rate: rate(e.done, secs, s.unit),
      left: e.done >= e.total ? `done in ${secs.toFixed(1)} s` : left !== null ? `${left} s left` : '',
    });
    if (e.done >= e.total) {
      s.ended = true;
      s.bar.stop();
    }
  }

  close(): void {
    this.bars.stop();
  }
}
