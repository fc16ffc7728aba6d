/**
 * Headless Chromium (Debian's `chromium`) for the tests of pages the project writes: the DOM
 * Chromium builds from a file, and the figures marked with data-figure in it.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

export const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p)) ?? '';

/** Chromium's flags for a headless run as root in a test (no sandbox, no GPU, a private profile). */
function flags(profile: string): string[] {
  return ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', `--user-data-dir=${profile}`, '--allow-file-access-from-files'];
}

/** The DOM Chromium built from `file`, serialized (after any script ran). */
export async function renderedDom(file: string, profile: string): Promise<string> {
  const r = await run(CHROMIUM, [...flags(profile), '--dump-dom', `file://${file}`], { maxBuffer: 64 * 1024 * 1024, timeout: 120_000 });
  return r.stdout;
}

/** A PNG screenshot of `file` at `width` x `height` CSS pixels; resolves with its size in bytes. */
export async function screenshot(file: string, png: string, profile: string, width = 1000, height = 1600): Promise<number> {
  await run(CHROMIUM, [...flags(profile), `--screenshot=${png}`, `--window-size=${width},${height}`, `file://${file}`], { timeout: 120_000 });
  return fs.statSync(png).size;
}

const unescape = (s: string) =>
  s.replace(/&(amp|lt|gt|quot|#39|nbsp);/g, (_, e: string) => ({ amp: '&', lt: '<', gt: '>', quot: '"', '#39': "'", nbsp: ' ' })[e]!);

/** data-figure name -> text of every element that carries one (text without markup). */
export function figures(dom: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const m of dom.matchAll(/<(\w+)[^>]*\sdata-figure="([^"]+)"[^>]*>(.*?)<\/\1>/gs)) out.set(unescape(m[2]), unescape(m[3].replace(/<[^>]*>/g, '')));
  return out;
}
