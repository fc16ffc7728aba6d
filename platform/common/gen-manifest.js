#!/usr/bin/env node
// Writes manifest.json for a staged bundle to stdout. The file hashes are
// computed here, after the images are final, so the agent can verify a
// bundle before booting it.
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

const a = {};
for (let i = 2; i < process.argv.length; i += 2) a[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];

const sha256 = (f) => crypto.createHash('sha256').update(fs.readFileSync(f)).digest('hex');
const files = [
  ['kernel', 'vmlinuz'],
  ['initrd', 'initrd.img'],
  ['rootfs', 'rootfs.ext4'],
].map(([role, p]) => {
  const f = path.join(a.stage, p);
  return { role, path: p, sha256: sha256(f), size: fs.statSync(f).size };
});

const manifest = {
  name: 'hitless-cp',
  version: a.version,
  arch: a.arch,
  kernel: {
    release: a['kernel-release'],
    package: a['kernel-package'],
    packageVersion: a['kernel-package-version'],
    // Base cmdline; the agent appends "hitless.vm=NAME hitless.agent=IP:PORT".
    cmdline: a.cmdline,
  },
  console: a.console,
  memoryMiB: Number(a.memory),
  cpus: Number(a.cpus),
  files,
  processes: JSON.parse(fs.readFileSync(a.processes, 'utf8')),
  node: { version: a['node-version'], source: a['node-source'], path: '/opt/hitless/node' },
  build: {
    key: a.key,
    // Human-readable list of what went into the key (packages+versions+sha256).
    inputs: fs.readFileSync(a.inputs, 'utf8').trim().split('\n'),
    builtAt: new Date().toISOString(),
  },
};
process.stdout.write(JSON.stringify(manifest, null, 2) + '\n');
