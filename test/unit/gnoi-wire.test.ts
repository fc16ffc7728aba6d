/**
 * Wire compatibility of our gNOI protos (proto/github.com/openconfig/gnoi/) with the published
 * ones, checked mechanically: our files are parsed with protobufjs (the parser @grpc/proto-loader
 * uses, so this is what the agent serves) and every package, message, field (name, number, type,
 * label, oneof), enum (values, reserved numbers), extension and RPC (types, streaming) is compared
 * with the published facts in fixtures/gnoi-published.ts (which names the upstream revisions).
 *
 * Why it matters: a gNOI client built from the published protos talks to the agent by field
 * number and type only; a renumbered field or a changed scalar still compiles on both sides and
 * then silently decodes garbage (or drops the value). Names matter too: they make the JSON
 * mapping and the gRPC method paths (/gnoi.os.OS/Install).
 *
 * Rules: everything we declare in a gnoi.* package must be in the fixture, identical; everything
 * in the fixture must be declared by us; published RPCs we do not declare must be listed in
 * NOT_SERVED below (grpc-js answers them UNIMPLEMENTED).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
// protobufjs comes with @grpc/proto-loader (same version, hoisted); it is what parses our protos
// at run time, so it is the right parser to ask what we put on the wire.
import * as protobuf from 'protobufjs';
import { protoDir } from '../../agent/grpc/proto';
import { ENUMS, EXTENSIONS, FieldFact, GNOI_VERSIONS, MESSAGES, RpcFact, SERVICES, UPSTREAM } from './fixtures/gnoi-published';

const GNOI_FILES = ['github.com/openconfig/gnoi/os/os.proto', 'github.com/openconfig/gnoi/system/system.proto', 'github.com/openconfig/gnoi/types/types.proto'];

/** Published RPCs the agent deliberately does not declare (and so answers UNIMPLEMENTED). */
const NOT_SERVED: Record<string, string[]> = {
  'gnoi.os.OS': [],
  'gnoi.system.System': ['Ping', 'Traceroute', 'Time', 'SetPackage', 'CancelReboot', 'KillProcess'],
};

const noDot = (n: string) => n.replace(/^\./, '');

function load(dir: string): protobuf.Root {
  const pbDir = path.dirname(require.resolve('protobufjs/package.json'));
  const root = new protobuf.Root();
  // Same lookup as the agent (agent/grpc/proto.ts): imports resolve against proto/, and
  // google/protobuf/descriptor.proto comes with protobufjs.
  root.resolvePath = (_origin, target) => {
    for (const d of [dir, pbDir]) {
      const f = path.join(d, target);
      if (fs.existsSync(f)) return f;
    }
    return target;
  };
  root.loadSync(GNOI_FILES, { keepCase: true });
  root.resolveAll(); // throws on a type name that does not resolve
  return root;
}

function fieldFact(f: protobuf.Field): FieldFact {
  let type: string;
  let label: FieldFact[3];
  if (f instanceof protobuf.MapField) {
    type = `map<${f.keyType},${f.resolvedType ? noDot(f.resolvedType.fullName) : f.type}>`;
    label = 'map';
  } else {
    type = f.resolvedType ? noDot(f.resolvedType.fullName) : f.type;
    label = f.repeated ? 'repeated' : 'singular';
  }
  const fact: FieldFact = [f.name, f.id, type, label];
  if (f.partOf) fact.push(f.partOf.name);
  return fact;
}

/** Every difference between our protos (parsed from `dir`) and the published facts, as text. */
function compare(dir: string): string[] {
  const root = load(dir);
  const diffs: string[] = [];
  const types = new Map<string, protobuf.Type>();
  const enums = new Map<string, protobuf.Enum>();
  const services = new Map<string, protobuf.Service>();
  const extensions = new Map<string, protobuf.Field>();
  const walk = (ns: protobuf.NamespaceBase) => {
    for (const n of ns.nestedArray) {
      const name = noDot(n.fullName);
      if (n instanceof protobuf.Type) types.set(name, n);
      else if (n instanceof protobuf.Enum) enums.set(name, n);
      else if (n instanceof protobuf.Service) services.set(name, n);
      else if (n instanceof protobuf.Field) extensions.set(name, n);
      if (n instanceof protobuf.Namespace) walk(n); // Type and Service are namespaces too
    }
  };
  walk(root.lookup('gnoi') as protobuf.Namespace);

  /** Definitions declared on both sides; one missing on either side is a difference. */
  function* paired<O, P>(kind: string, ours: Map<string, O>, published: Record<string, P>): Generator<[string, O, P]> {
    for (const name of new Set([...ours.keys(), ...Object.keys(published)])) {
      const o = ours.get(name);
      const p = published[name];
      if (o && p) yield [name, o, p];
      else diffs.push(`${kind} ${name}: ${o ? 'declared by us, not in the published protos' : 'published, not declared by us'}`);
    }
  }

  for (const [name, ours, published] of paired('message', types, MESSAGES)) {
    const got = new Map(ours.fieldsArray.map((f) => [f.name, fieldFact(f)]));
    for (const want of published) {
      const have = got.get(want[0]);
      if (!have) diffs.push(`${name}.${want[0]}: missing (published as ${JSON.stringify(want)})`);
      else if (JSON.stringify(have) !== JSON.stringify(want)) diffs.push(`${name}.${want[0]}: ours ${JSON.stringify(have)}, published ${JSON.stringify(want)}`);
      got.delete(want[0]);
    }
    for (const extra of got.values()) diffs.push(`${name}.${extra[0]}: declared by us, not published (${JSON.stringify(extra)})`);
    // Field options change the encoding (packed) or the meaning (deprecated); upstream sets none.
    for (const f of ours.fieldsArray)
      if (f.options && Object.keys(f.options).length) diffs.push(`${name}.${f.name}: options ${JSON.stringify(f.options)}; published has none`);
  }

  for (const [name, ours, published] of paired('enum', enums, ENUMS)) {
    if (JSON.stringify(Object.entries(ours.values).sort()) !== JSON.stringify(Object.entries(published.values).sort())) {
      diffs.push(`enum ${name}: ours ${JSON.stringify(ours.values)}, published ${JSON.stringify(published.values)}`);
    }
    if (JSON.stringify(ours.reserved ?? []) !== JSON.stringify(published.reserved ?? [])) {
      diffs.push(`enum ${name}: reserved ours ${JSON.stringify(ours.reserved ?? [])}, published ${JSON.stringify(published.reserved ?? [])}`);
    }
  }

  for (const [name, ours, published] of paired('service', services, SERVICES)) {
    const declared = new Set(ours.methodsArray.map((m) => m.name));
    for (const m of ours.methodsArray) {
      const want = published[m.name];
      const have: RpcFact = {
        request: noDot(m.resolvedRequestType!.fullName),
        response: noDot(m.resolvedResponseType!.fullName),
        requestStream: !!m.requestStream,
        responseStream: !!m.responseStream,
      };
      if (!want) diffs.push(`rpc ${name}/${m.name}: declared by us, not published`);
      else if (JSON.stringify(have) !== JSON.stringify(want))
        diffs.push(`rpc ${name}/${m.name}: ours ${JSON.stringify(have)}, published ${JSON.stringify(want)}`);
    }
    const missing = Object.keys(published)
      .filter((m) => !declared.has(m))
      .sort();
    if (JSON.stringify(missing) !== JSON.stringify([...(NOT_SERVED[name] ?? [])].sort())) {
      diffs.push(
        `service ${name}: published RPCs we do not declare are ${JSON.stringify(missing)}, expected exactly ${JSON.stringify(NOT_SERVED[name] ?? [])}`,
      );
    }
  }

  for (const name of new Set([...extensions.keys(), ...Object.keys(EXTENSIONS)])) {
    const ours = extensions.get(name);
    const want = EXTENSIONS[name];
    const have = ours ? [noDot(ours.extend ?? ''), ours.id, ours.type] : null;
    if (JSON.stringify(have) !== JSON.stringify(want ?? null))
      diffs.push(`extension ${name}: ours ${JSON.stringify(have)}, published ${JSON.stringify(want ?? null)}`);
  }

  for (const [pkg, version] of Object.entries(GNOI_VERSIONS)) {
    const opts = (root.lookup(pkg) as protobuf.Namespace | null)?.options ?? {};
    if (opts['(types.gnoi_version)'] !== version)
      diffs.push(`${pkg}: (types.gnoi_version) ours ${JSON.stringify(opts['(types.gnoi_version)'])}, published ${JSON.stringify(version)}`);
  }
  return diffs;
}

describe(`gNOI protos are wire-compatible with ${UPSTREAM.repo}`, () => {
  it('every message, field, enum, extension and RPC we declare matches the published facts', () => {
    assert.deepEqual(compare(protoDir()), []);
  });

  it('the check notices a renumbered field, a changed type, a moved enum value and a new streaming flag', () => {
    // A scratch copy of our protos with one wire change each; compare() must report every one.
    // (Guards against a comparison that silently passes, e.g. after a protobufjs API change.)
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'hitless-gnoi-wire-'));
    try {
      fs.cpSync(path.join(protoDir(), 'github.com'), path.join(tmp, 'github.com'), { recursive: true });
      const edit = (file: string, from: string, to: string) => {
        const f = path.join(tmp, 'github.com/openconfig/gnoi', file);
        const text = fs.readFileSync(f, 'utf8');
        assert.ok(text.includes(from), `${file} contains '${from}'`);
        fs.writeFileSync(f, text.replace(from, to));
      };
      edit('os/os.proto', 'uint64 package_size = 3;', 'uint64 package_size = 4;');
      edit('system/system.proto', 'int64 uptime = 3;', 'uint64 uptime = 3;');
      edit('system/system.proto', 'HALT = 3;', 'HALT = 8;');
      edit('os/os.proto', 'rpc Activate(ActivateRequest) returns (ActivateResponse);', 'rpc Activate(ActivateRequest) returns (stream ActivateResponse);');
      const diffs = compare(tmp);
      assert.equal(diffs.length, 4, diffs.join('\n'));
      assert.match(diffs.join('\n'), /gnoi\.os\.TransferRequest\.package_size: ours \["package_size",4,"uint64"/);
      assert.match(diffs.join('\n'), /gnoi\.system\.SwitchControlProcessorResponse\.uptime: ours \["uptime",3,"uint64"/);
      assert.match(diffs.join('\n'), /enum gnoi\.system\.RebootMethod/);
      assert.match(diffs.join('\n'), /rpc gnoi\.os\.OS\/Activate: ours .*"responseStream":true/);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});
