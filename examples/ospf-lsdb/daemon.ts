#!/usr/bin/env node
/**
 * Example OSPF-like daemon: its link-state database is checkpointed as table "lsdb" of process
 * "ospf". Key: "<type>:<link-state id>:<advertising router>"; value: an LSA-like record with age,
 * sequence number, checksum and links. Churn refreshes LSAs (sequence + 1, new metrics) and
 * flushes a few (MaxAge), as a real area does.
 */
import { mulberry, runDaemon } from '../common/daemon-runner';

const TYPES = ['router', 'network', 'summary', 'asbr-summary', 'external'];

function ip(n: number): string {
  return `10.${(n >> 16) & 255}.${(n >> 8) & 255}.${n & 255}`;
}

/** value := age:u16 seq:u32 checksum:u16 nlinks:u16 (link id:u32 metric:u16)* */
function lsa(seq: number, links: number, rand: () => number): Buffer {
  const b = Buffer.alloc(10 + links * 6);
  b.writeUInt16BE(Math.floor(rand() * 1800), 0);
  b.writeUInt32BE(seq >>> 0, 2);
  b.writeUInt16BE(Math.floor(rand() * 65535), 6);
  b.writeUInt16BE(links, 8);
  for (let i = 0; i < links; i++) {
    b.writeUInt32BE(Math.floor(rand() * 2 ** 32), 10 + i * 6);
    b.writeUInt16BE(1 + Math.floor(rand() * 1000), 14 + i * 6);
  }
  return b;
}

void runDaemon({
  process: 'ospf',
  table: 'lsdb',
  *generate(count, seed) {
    const rand = mulberry(seed);
    for (let i = 0; i < count; i++) {
      const type = TYPES[i % TYPES.length];
      yield { key: `${type}:${ip(i)}:${ip(i % 4096)}`, value: lsa(0x80000001, 1 + (i % 8), rand) };
    }
  },
  mutate(_key, value, rand) {
    if (rand() < 0.01) return null; // flushed (MaxAge)
    const links = value.readUInt16BE(8);
    return lsa(value.readUInt32BE(2) + 1, links, rand);
  },
});
