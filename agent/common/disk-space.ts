/**
 * Free space as the agent itself can use it: the one definition behind disk-full detection,
 * WAL checkpoint admission and gNOI package admission.
 */
import fs from 'node:fs';

/** Bytes this process may still write on the filesystem of `dir` (root may use the reserved blocks). */
export function freeBytes(dir: string): number {
  const s = fs.statfsSync(dir);
  return (process.getuid?.() === 0 ? s.bfree : s.bavail) * s.bsize;
}
