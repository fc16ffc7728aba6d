/**
 * Small synthetic image bundles for tests that never boot them: the three role files with random
 * contents (real sha256s and sizes) and a manifest in the build scripts' format.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Manifest, ManifestProcess } from '../../agent/images/manifest';

export interface TestBundleOptions {
  version?: string;
  arch?: string;
  /** Size of rootfs.ext4 in bytes (default a little over 1 MiB). */
  rootfsBytes?: number;
  processes?: ManifestProcess[] | unknown[];
  /** Last changes to the manifest object before it is written (invalid manifests). */
  mutate?: (m: Record<string, unknown>) => void;
}

export function writeTestBundle(dir: string, over: TestBundleOptions = {}): Manifest {
  fs.mkdirSync(dir, { recursive: true });
  const files = (
    [
      ['kernel', 'vmlinuz', 3000],
      ['initrd', 'initrd.img', 2000],
      ['rootfs', 'rootfs.ext4', over.rootfsBytes ?? 1048576 + 17],
    ] as const
  ).map(([role, p, size]) => {
    const data = crypto.randomBytes(size);
    fs.writeFileSync(path.join(dir, p), data);
    return { role, path: p, sha256: crypto.createHash('sha256').update(data).digest('hex'), size };
  });
  const m: Record<string, unknown> = {
    name: 'hitless-cp',
    version: over.version ?? '1.0.0',
    arch: over.arch ?? 'x86_64',
    kernel: {
      release: '6.1.0-47-cloud-amd64',
      package: 'linux-image-6.1.0-47-cloud-amd64',
      packageVersion: '6.1.170-3',
      cmdline: 'console=ttyS0 panic=-1 quiet',
    },
    console: 'ttyS0',
    memoryMiB: 256,
    cpus: 1,
    files,
    processes: over.processes ?? [{ name: 'bgp', command: ['/opt/hitless/node', '/opt/hitless/daemons/bgp.js'], schemaWrites: 1, schemaReads: [1] }],
    node: { version: 'v20.20.2', source: 'host', path: '/opt/hitless/node' },
  };
  over.mutate?.(m);
  fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(m, null, 2) + '\n');
  return m as unknown as Manifest;
}
