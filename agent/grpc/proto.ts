/**
 * Loads the .proto contracts in proto/ once, with the options every part of the project relies
 * on (see agent/checkpoint/messages.ts for the resulting shapes).
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import fs from 'node:fs';
import path from 'node:path';

export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

/** proto/ of the repository, or HITLESS_PROTO_DIR (set in guest images, where the layout differs). */
export function protoDir(): string {
  if (process.env.HITLESS_PROTO_DIR) return process.env.HITLESS_PROTO_DIR;
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, 'proto');
    if (fs.existsSync(path.join(candidate, 'hitless'))) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error('cannot find the proto/ directory; set HITLESS_PROTO_DIR');
}

export const PROTO_FILES = [
  'hitless/v1/checkpoint.proto',
  'hitless/v1/vm.proto',
  'hitless/v1/upgrade.proto',
  // gNOI, wire-compatible subsets of github.com/openconfig/gnoi (see agent/gnoi/).
  'github.com/openconfig/gnoi/os/os.proto',
  'github.com/openconfig/gnoi/system/system.proto',
];

let cached: { def: protoLoader.PackageDefinition; pkg: grpc.GrpcObject } | null = null;

export function loadProtos(): { def: protoLoader.PackageDefinition; pkg: grpc.GrpcObject } {
  if (cached) return cached;
  const dir = protoDir();
  const files = PROTO_FILES.filter((f) => fs.existsSync(path.join(dir, f)));
  // The health proto rides along so server reflection describes grpc.health.v1 too.
  // (Absent in guest bundles, which only need the client side.)
  let healthDir: string | null = null;
  try {
    healthDir = path.join(path.dirname(require.resolve('grpc-health-check/package.json')), 'proto');
  } catch {
    healthDir = null;
  }
  const all = healthDir ? [...files, 'health/v1/health.proto'] : files;
  const def = protoLoader.loadSync(all, { ...LOADER_OPTIONS, includeDirs: healthDir ? [dir, healthDir] : [dir] });
  cached = { def, pkg: grpc.loadPackageDefinition(def) };
  return cached;
}

export function serviceDef(pkg: grpc.GrpcObject, fqName: string): grpc.ServiceDefinition {
  let node: unknown = pkg;
  for (const part of fqName.split('.')) node = (node as Record<string, unknown>)[part];
  const ctor = node as grpc.ServiceClientConstructor | undefined;
  if (!ctor?.service) throw new Error(`service ${fqName} is not in the loaded protos`);
  return ctor.service;
}

export function clientCtor(fqName: string): grpc.ServiceClientConstructor {
  const { pkg } = loadProtos();
  let node: unknown = pkg;
  for (const part of fqName.split('.')) node = (node as Record<string, unknown>)[part];
  return node as grpc.ServiceClientConstructor;
}
