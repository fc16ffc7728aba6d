#!/usr/bin/env node
/**
 * npm run chaos: the fault campaign. Real upgrades on real QEMU, a fault injected at a seeded
 * random moment inside each phase, and the invariants of chaos/round.ts checked after each.
 * Not part of `npm test`: it takes tens of minutes, and its faults strike at random moments.
 *
 * Cells are FAULT@PHASE (chaos/faults.ts). Each round of a cell uses seed = --seed + round index,
 * so a failing round's line names the seed that replays it:
 *   npm run chaos -- --only agent-kill@runversion --seed 1234 --rounds 1
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { generateKeyPair } from '../agent/images/signing';
import { buildGuestImages, signedVariant } from '../harness/guest-images';
import { stopAllAgents } from '../harness/agent-process';
import { FAULTS, PHASES, cellName } from './faults';
import { RoundResult, runRound } from './round';

const HELP = `Usage: npm run chaos -- [options]

Drives real upgrades (QEMU, TCG where KVM does not work) and injects a fault at a seeded random
moment inside each phase; prints one JSON line per round, then a table of cells x passes.
A fault whose target is already gone at the drawn moment (the phase stopped that VM itself)
is "missed": the round still checks everything, and the table counts it as (Nm).
Exit status 0 when every round passed, 1 when one failed, 2 on bad options.

Options:
  --rounds N        rounds per cell (default 1)
  --seed N          seed of the first round; round r of every cell uses seed N + r (default: random)
  --only CELLS      comma-separated cells FAULT@PHASE; FAULT@* or *@PHASE select a row or column
  --arch ARCH       x86_64 (default) or aarch64 guests
  --settle-s S      bound for the upgrade to settle after a fault (default 150)
  --budget-min M    start no new round after M minutes (default 80)
  --json            JSON lines only (no table)
  --list            print the cells and exit
  -h, --help        this text

Faults:
${FAULTS.map((f) => `  ${f.name.padEnd(16)}${f.what}`).join('\n')}
Phases: ${PHASES.join(', ')}
`;

function fail(msg: string): never {
  process.stderr.write(`chaos: ${msg}\n(see npm run chaos -- --help)\n`);
  process.exit(2);
}

function parse() {
  let v;
  try {
    v = parseArgs({
      options: {
        rounds: { type: 'string', default: '1' },
        seed: { type: 'string' },
        only: { type: 'string' },
        arch: { type: 'string', default: 'x86_64' },
        'settle-s': { type: 'string', default: '150' },
        'budget-min': { type: 'string', default: '80' },
        json: { type: 'boolean', default: false },
        list: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }).values;
  } catch (e) {
    fail((e as Error).message);
  }
  const num = (name: string, s: string, min: number) => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < min) fail(`--${name} must be an integer >= ${min}, got '${s}'`);
    return n;
  };
  if (v.arch !== 'x86_64' && v.arch !== 'aarch64') fail(`--arch must be x86_64 or aarch64, got '${v.arch}'`);
  const all = FAULTS.flatMap((f) => PHASES.map((p) => ({ fault: f, phase: p, name: cellName(f.name, p) })));
  let cells = all;
  if (v.only) {
    const wanted = v.only
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
    for (const w of wanted) {
      const [f, p] = w.split('@');
      if (!p || !all.some((c) => (f === '*' || c.fault.name === f) && (p === '*' || c.phase === p))) {
        fail(`unknown cell '${w}'; cells are FAULT@PHASE with FAULT in ${FAULTS.map((x) => x.name).join(', ')} and PHASE in ${PHASES.join(', ')} (or *)`);
      }
    }
    cells = all.filter((c) =>
      wanted.some((w) => {
        const [f, p] = w.split('@');
        return (f === '*' || c.fault.name === f) && (p === '*' || c.phase === p);
      }),
    );
  }
  return {
    cells,
    rounds: num('rounds', v.rounds!, 1),
    seed: v.seed === undefined ? Math.floor(Math.random() * 1e9) : num('seed', v.seed, 0),
    arch: v.arch as 'x86_64' | 'aarch64',
    settleMs: num('settle-s', v['settle-s']!, 10) * 1000,
    budgetMs: num('budget-min', v['budget-min']!, 1) * 60_000,
    json: v.json!,
    list: v.list!,
    help: v.help!,
  };
}

async function main(): Promise<void> {
  const o = parse();
  if (o.help) return void process.stdout.write(HELP);
  if (o.list) return void process.stdout.write(o.cells.map((c) => c.name).join('\n') + '\n');
  const say = (s: string) => process.stderr.write(`chaos: ${s}\n`);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-chaos-images-'));
  const results: RoundResult[] = [];
  const t0 = Date.now();
  try {
    const ids = [`${o.arch}-1.0.0`, `${o.arch}-2.0.0`];
    say(`building or taking cached guest images ${ids.join(', ')}`);
    const built = buildGuestImages(ids);
    const pair = generateKeyPair();
    const trustDir = path.join(work, 'trust');
    fs.mkdirSync(trustDir);
    fs.writeFileSync(path.join(trustDir, 'vendor.pub'), pair.publicKeyPem);
    // hitless.faults=1 opens the guests' fault port (process kills, see platform/common/init.sh).
    const withFaultPort = { edit: (m: Record<string, unknown>) => void ((m.kernel as { cmdline: string }).cmdline += ' hitless.faults=1') };
    const images = {
      v1: await signedVariant(built[ids[0]], path.join(work, 'v1'), pair.privateKeyPem, withFaultPort),
      v2: await signedVariant(built[ids[1]], path.join(work, 'v2'), pair.privateKeyPem, withFaultPort),
      fromVersion: '1.0.0',
      toVersion: '2.0.0',
    };
    say(`${o.cells.length} cells x ${o.rounds} rounds, seeds ${o.seed}..${o.seed + o.rounds - 1}, ${o.arch}, settle bound ${o.settleMs / 1000} s`);
    outer: for (let r = 0; r < o.rounds; r++) {
      for (const c of o.cells) {
        if (Date.now() - t0 > o.budgetMs) {
          say(`time budget of ${o.budgetMs / 60_000} min used up; no further rounds`);
          break outer;
        }
        const res = await runRound({ fault: c.fault, phase: c.phase, seed: o.seed + r, images, trustDir, records: 20_000, settleMs: o.settleMs, log: say });
        results.push(res);
        process.stdout.write(JSON.stringify(res) + '\n');
      }
    }
  } finally {
    await stopAllAgents();
    fs.rmSync(work, { recursive: true, force: true });
  }
  const failed = results.filter((r) => !r.pass);
  if (!o.json)
    process.stdout.write(
      table(
        o.cells.map((c) => c.name),
        results,
      ),
    );
  process.stdout.write(
    JSON.stringify({
      summary: true,
      rounds: results.length,
      passed: results.length - failed.length,
      missed: results.filter((r) => r.missed).length,
      failed: failed.map((r) => ({ cell: r.cell, seed: r.seed })),
      minutes: Math.round((Date.now() - t0) / 6000) / 10,
    }) + '\n',
  );
  process.exitCode = failed.length ? 1 : 0;
}

/**
 * Faults down, phases across, "passed/rounds" in each cell, with "(Nm)" when N of those rounds'
 * faults missed (their target was already gone at the drawn moment).
 */
function table(cells: string[], results: RoundResult[]): string {
  const faults = [...new Set(cells.map((c) => c.split('@')[0]))];
  const phases = PHASES.filter((p) => cells.some((c) => c.endsWith(`@${p}`)));
  const w = Math.max(...phases.map((p) => p.length), 5) + 2;
  let out = `\n${''.padEnd(14)}${phases.map((p) => p.padStart(w)).join('')}\n`;
  for (const f of faults) {
    out += f.padEnd(14);
    for (const p of phases) {
      const rs = results.filter((r) => r.cell === cellName(f, p));
      const missed = rs.filter((r) => r.missed).length;
      out += (cells.includes(cellName(f, p)) ? `${rs.filter((r) => r.pass).length}/${rs.length}${missed ? ` (${missed}m)` : ''}` : '-').padStart(w);
    }
    out += '\n';
  }
  return out;
}

main().catch(async (e) => {
  process.stderr.write(`chaos: ${(e as Error).stack ?? e}\n`);
  await stopAllAgents();
  process.exit(1);
});
