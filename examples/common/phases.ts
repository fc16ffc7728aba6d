/**
 * Progress and timing for the demos: `phase(name, fn)` says what starts and how long it took on
 * stderr (stdout stays free for the report) and records { name, seconds } for the report.
 */
export function phaseRecorder(tag: string) {
  const phases: { name: string; seconds: number }[] = [];
  const say = (s: string) => process.stderr.write(`${tag}: ${s}\n`);
  async function phase<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const t0 = process.hrtime.bigint();
    say(`${name} ...`);
    const r = await fn();
    const seconds = Math.round(Number(process.hrtime.bigint() - t0) / 1e6) / 1000;
    phases.push({ name, seconds });
    say(`${name}: ${seconds.toFixed(2)} s`);
    return r;
  }
  return { phases, say, phase };
}
