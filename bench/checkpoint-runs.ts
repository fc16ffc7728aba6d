/**
 * npm run bench:checkpoint:runs — the checkpoint benchmark RUNS times (default 5), one after the
 * other, then one JSON line per measurement with the median of every numeric field over the runs
 * (`runs` says how many had the line) and, for the figures quoted most, every run's value.
 * Each run's own lines go to stderr as they come, so a long series shows progress. The same
 * environment (RECORDS, BENCH_PHASES, ...) is passed to every run.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';

const RUNS = Number(process.env.RUNS ?? 5);
/** Fields whose per-run values are printed beside the median. */
const SPREAD = [
  'seconds',
  'records_per_s',
  'p99_ms',
  'peer_p99_ms',
  'peer_seconds',
  'ratio',
  'ratio_p99',
  'rss_mb',
  'freeze_ms_median',
  'achieved_records_per_s',
  'peer_achieved_records_per_s',
];

function runOnce(i: number): Promise<Record<string, unknown>[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(__dirname, 'checkpoint.bench.js')], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      process.stderr.write(d.toString().replace(/^(?=.)/gm, `run ${i + 1}/${RUNS}: `));
    });
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`run ${i + 1} failed (exit ${code}); see its output above`));
      resolve(
        out
          .split('\n')
          .filter((l) => l.startsWith('{'))
          .map((l) => JSON.parse(l) as Record<string, unknown>),
      );
    });
  });
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

/** A line's identity across runs: its bench name and, for sync-ack, its offered rate. */
const keyOf = (l: Record<string, unknown>) => `${String(l.bench)}${l.offered_records_per_s ? `@${String(l.offered_records_per_s)}` : ''}`;

async function main(): Promise<void> {
  const byKey = new Map<string, Record<string, unknown>[]>();
  for (let i = 0; i < RUNS; i++) {
    for (const l of await runOnce(i)) {
      const k = keyOf(l);
      if (!byKey.has(k)) byKey.set(k, []);
      byKey.get(k)!.push(l);
    }
  }
  for (const lines of byKey.values()) {
    const out: Record<string, unknown> = { bench: lines[0].bench, runs: lines.length };
    for (const [f, v] of Object.entries(lines[0])) {
      if (typeof v === 'boolean') {
        // A flag (kept_up): true only when it held in every run, with each run's value.
        out[f] = lines.every((l) => l[f] === true);
        out[`${f}_runs`] = lines.map((l) => l[f]);
        continue;
      }
      if (typeof v !== 'number') continue;
      const xs = lines.map((l) => l[f]).filter((x): x is number => typeof x === 'number');
      out[f] = Math.round(median(xs) * 1000) / 1000;
      if (SPREAD.includes(f)) out[`${f}_runs`] = xs;
    }
    process.stdout.write(JSON.stringify(out) + '\n');
  }
}

main().catch((e) => {
  process.stderr.write(`bench runs failed: ${(e as Error).message}\n`);
  process.exit(1);
});
