/**
 * issu show upgrade [ID] [--html FILE]: what one upgrade did (hitless.v1.Upgrade/ShowUpgrade).
 * Text on a terminal, the report as one JSON object with --json, and with --html a
 * self-contained page written to FILE (see report/upgrade-report-html.ts).
 */
import * as grpc from '@grpc/grpc-js';
import fs from 'node:fs';
import path from 'node:path';
import { clientCtor } from '../grpc/proto';
import { UpgradeReport, reportText } from '../report/upgrade-report';
import { upgradeReportHtml } from '../report/upgrade-report-html';
import { Stub, call } from './rpc';

export const REPORT_HELP = `  show upgrade [ID] [--html FILE]        what upgrade ID (default: the current or latest) did:
                                         phase timeline, standby lag over time, write freeze per
                                         process, records verified and lost by the closing audit.
                                         --html writes it as one self-contained page to FILE`;

/**
 * Writes the page next to its final name and renames it into place, so a reader (a browser, a
 * ticket attachment) never sees half a page.
 */
export function writeReportHtml(file: string, report: UpgradeReport): string {
  const target = path.resolve(file);
  const dir = path.dirname(target);
  if (!fs.existsSync(dir)) throw new Error(`cannot write the report to ${target}: directory ${dir} does not exist`);
  const tmp = `${target}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, upgradeReportHtml(report));
  fs.renameSync(tmp, target);
  return target;
}

export async function showUpgrade(
  address: string,
  args: string[],
  opts: { json: boolean; html?: string; timeoutMs: number },
  out: (obj: unknown, text: () => void) => void,
  usage: (m: string) => Error,
): Promise<number> {
  if (args.length > 1) throw usage(`show upgrade takes at most one upgrade id, got '${args.join(' ')}'`);
  if (opts.html === '') throw usage('--html needs a file name, e.g. --html upgrade.html');
  const stub = new (clientCtor('hitless.v1.Upgrade'))(address, grpc.credentials.createInsecure()) as unknown as Stub;
  try {
    const report = await call<UpgradeReport>(stub, 'ShowUpgrade', { id: args[0] ?? '' }, opts.timeoutMs);
    const written = opts.html ? writeReportHtml(opts.html, report) : '';
    out(report, () => {
      process.stdout.write(reportText(report));
      if (written) console.log(`report page written to ${written}`);
    });
    if (written && opts.json) process.stderr.write(`issu: report page written to ${written}\n`);
    return 0;
  } finally {
    stub.close();
  }
}
