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

/** The checkpoint contract: it imports nothing, and routing processes need nothing else. */
const CHECKPOINT_PROTO = 'hitless/v1/checkpoint.proto';

export const PROTO_FILES = [
  CHECKPOINT_PROTO,
  'hitless/v1/vm.proto',
  'hitless/v1/upgrade.proto',
  // gNOI, wire-compatible subsets of github.com/openconfig/gnoi (see agent/gnoi/).
  'github.com/openconfig/gnoi/os/os.proto',
  'github.com/openconfig/gnoi/system/system.proto',
];

/** Loaded contracts: their definitions, and the package tree grpc-js made of them. */
export type LoadedProtos = { def: protoLoader.PackageDefinition; pkg: grpc.GrpcObject };

let cached: LoadedProtos | null = null;

export function loadProtos(): LoadedProtos {
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

let checkpointOnly: LoadedProtos | null = null;

/**
 * The checkpoint contract alone: all a routing process's SDK speaks. Loading it took ~25 ms at a
 * process's start, every proto ~65 ms, and a standby's first subscribe waits for it. Returns the
 * whole set when that is loaded already.
 */
export function loadCheckpointProto(): LoadedProtos {
  if (cached) return cached;
  if (!checkpointOnly) {
    const def = protoLoader.loadSync([CHECKPOINT_PROTO], { ...LOADER_OPTIONS, includeDirs: [protoDir()] });
    checkpointOnly = { def, pkg: grpc.loadPackageDefinition(def) };
  }
  return checkpointOnly;
}

export function serviceDef(pkg: grpc.GrpcObject, fqName: string): grpc.ServiceDefinition {
  let node: unknown = pkg;
  for (const part of fqName.split('.')) node = (node as Record<string, unknown>)[part];
  const ctor = node as grpc.ServiceClientConstructor | undefined;
  if (!ctor?.service) throw new Error(`service ${fqName} is not in the loaded protos`);
  return ctor.service;
}

/** A service's client class, from `loaded` (every contract unless told otherwise). */
export function clientCtor(fqName: string, loaded: LoadedProtos = loadProtos()): grpc.ServiceClientConstructor {
  const { pkg } = loaded;
  let node: unknown = pkg;
  for (const part of fqName.split('.')) node = (node as Record<string, unknown>)[part];
  return node as grpc.ServiceClientConstructor;
}

type MessageType = protoLoader.MessageTypeDefinition<unknown, unknown>;

interface FieldDescriptor {
  name: string;
  label: string;
  type: string;
  typeName: string;
}

/**
 * Has protobufjs generate the code of every request and response type now, with that of every
 * message nested in them. It does so lazily, at a type's first use, and with the CPUs busy that
 * took 5-20 ms of the agent's event loop each time, in the middle of the first upgrade
 * (UpgradeStatus, SessionResponse, ...). A sample of each type with every nested message present
 * goes through its method's serializer and back through its deserializer. Called once, as the
 * agent's server is built; clients (the SDK in a guest) do not pay for types they never use.
 */
export function warmCodecs(def: protoLoader.PackageDefinition): void {
  const messages = Object.keys(def).filter((k) => (def[k] as MessageType).format);
  // A method's types by name: in the service's package first (its path is /package.Service/Method).
  const fqOf = (method: { path: string }, type: MessageType): string | undefined => {
    const name = (type.type as { name: string }).name;
    const pkg = method.path.slice(1, method.path.lastIndexOf('.', method.path.lastIndexOf('/')));
    return def[`${pkg}.${name}`] ? `${pkg}.${name}` : messages.find((k) => k.endsWith(`.${name}`));
  };
  // A field's type name is relative: nested in the message, or in its package.
  const resolve = (scope: string, typeName: string): string | undefined => {
    for (let s = scope; s; s = s.slice(0, Math.max(0, s.lastIndexOf('.')))) if (def[`${s}.${typeName}`]) return `${s}.${typeName}`;
    return def[typeName] ? typeName : undefined;
  };
  const sample = (fq: string, depth: number): Record<string, unknown> => {
    const out: Record<string, unknown> = {};
    const m = def[fq] as MessageType | undefined;
    if (!m || depth > 6) return out;
    for (const f of (m.type as { field: FieldDescriptor[] }).field) {
      if (f.type !== 'TYPE_MESSAGE') continue;
      const nested = resolve(fq, f.typeName);
      if (!nested) continue; // a map's entry type: maps of messages are not used here
      const s = sample(nested, depth + 1);
      out[f.name] = f.label === 'LABEL_REPEATED' ? [s] : s;
    }
    return out;
  };
  for (const v of Object.values(def)) {
    if ((v as MessageType).format) continue;
    for (const method of Object.values(v as protoLoader.ServiceDefinition)) {
      for (const [type, ser, de] of [
        [method.requestType, method.requestSerialize, method.requestDeserialize],
        [method.responseType, method.responseSerialize, method.responseDeserialize],
      ] as const) {
        const fq = fqOf(method, type as MessageType);
        if (!fq) continue;
        try {
          de(ser(sample(fq, 0)));
        } catch {
          // The code is generated before any field is looked at: warm either way.
        }
      }
    }
  }
}
