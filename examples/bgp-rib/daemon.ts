#!/usr/bin/env node
/**
 * Example BGP-like daemon: its RIB (prefix -> encoded path attributes) is checkpointed to the
 * agent as table "rib" of process "bgp". Active: loads a realistic full table and churns it
 * (attribute changes, withdrawals and re-announcements); standby: follows. See DAEMON_USAGE.
 *
 * Value schemas (the checkpoint `schema` of each PUT):
 *   1  the encoded path-attribute blob (rib-generator's encodePathAttributes).
 *   2  the schema 1 blob followed by a 4-byte big-endian "received-at" word: seconds since the
 *      Unix epoch when this build last received (generated or changed) the route; 0 = unknown
 *      (the route came from a schema 1 writer).
 * `--schema 2` makes this build write schema 2 and register the transforms "1->2" (append a
 * zero word) and "2->1" (strip the word), so it can follow a schema 1 active and, while schema 1
 * standbys exist, write schema 1 for them. Without it (the default) the daemon writes and reads
 * schema 1 only. Values generated or mutated here are always in the native schema; the SDK
 * converts to the schema the agent asks an active to write.
 */
import { runDaemon } from '../common/daemon-runner';
import { createRng, generateRib, mutateRoute } from './rib-generator';

/** Bytes schema 2 appends to a schema 1 value. */
const RECEIVED_AT_BYTES = 4;

/** schema 1 -> 2: append a zero "received-at" word (unknown). */
function ribV1toV2(v1: Buffer): Buffer {
  const out = Buffer.allocUnsafe(v1.length + RECEIVED_AT_BYTES);
  v1.copy(out, 0);
  out.writeUInt32BE(0, v1.length);
  return out;
}

/** schema 2 -> 1: strip the trailing "received-at" word. */
function ribV2toV1(v2: Buffer): Buffer {
  if (v2.length < RECEIVED_AT_BYTES + 1) throw new Error(`schema 2 rib value too short (${v2.length} bytes)`);
  return v2.subarray(0, v2.length - RECEIVED_AT_BYTES);
}

/** A schema 2 value: the schema 1 blob stamped with `at` (seconds since the epoch). */
function stamp(v1: Buffer, at: number): Buffer {
  const out = ribV1toV2(v1);
  out.writeUInt32BE(at >>> 0, v1.length);
  return out;
}

/** `--schema N` / `--schema=N` from argv, before the runner parses it (default 1). */
function schemaArg(argv: string[]): number {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--schema') return Number(argv[i + 1]);
    if (argv[i].startsWith('--schema=')) return Number(argv[i].slice('--schema='.length));
  }
  return 1;
}

const schema = schemaArg(process.argv.slice(2));
if (schema !== 1 && schema !== 2) {
  process.stderr.write(`bgp: --schema must be 1 or 2, got ${schema}\n`);
  process.exit(2);
}
const now = () => Math.floor(Date.now() / 1000);
let rng = createRng(1);

void runDaemon({
  process: 'bgp',
  table: 'rib',
  generate:
    schema === 1
      ? (count, seed) => {
          rng = createRng(seed + 1000);
          return generateRib(count, { seed });
        }
      : function* (count, seed) {
          rng = createRng(seed + 1000);
          const at = now();
          for (const r of generateRib(count, { seed })) yield { key: r.key, value: stamp(r.value, at) };
        },
  // About 2% of changes are withdrawals; the rest are new attributes for the prefix.
  mutate:
    schema === 1
      ? (key, value, rand) => (rand() < 0.02 ? null : mutateRoute({ key, value }, rng).value)
      : (key, value, rand) => (rand() < 0.02 ? null : stamp(mutateRoute({ key, value: ribV2toV1(value) }, rng).value, now())),
  transforms: schema === 2 ? { '1->2': ribV1toV2, '2->1': ribV2toV1 } : undefined,
  describe: schema === 2 ? (v) => `received-at=${v.readUInt32BE(v.length - RECEIVED_AT_BYTES)}` : undefined,
});
