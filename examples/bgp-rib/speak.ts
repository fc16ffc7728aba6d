#!/usr/bin/env node
/**
 * The example router's BGP speaker on its own (examples/bgp-rib/bgp/): peers with real BGP
 * implementations (BIRD in the tests), announces its configured prefixes and reports, one JSON
 * object per line on stdout:
 *
 *   {"event":"established","peer":A,"holdTime":H,"families":[...],"as4":true}
 *   {"event":"end-of-rib","peer":A,"afi":1}
 *   {"event":"rib","best":N}            Loc-RIB size, at most every 200 ms while it changes
 *   {"event":"down","peer":A,"reason":...,"notification":{...}}
 *
 * stdin: `summary` (per-peer state, routes received and announced, resets), `routes` (the
 * Loc-RIB: prefix, next hop, AS path), `quit`.
 */
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import { BgpSpeaker } from './bgp/speaker';

const USAGE = `usage: speak --as N --router-id A --peer ADDR:AS [--peer ...] [--local-address A]
             [--announce P,P,...] [--next-hop6 A] [--hold-time S] [--graceful-restart S]
`;

const { values } = parseArgs({
  options: {
    as: { type: 'string' },
    'router-id': { type: 'string' },
    peer: { type: 'string', multiple: true },
    'local-address': { type: 'string' },
    announce: { type: 'string', default: '' },
    'next-hop6': { type: 'string' },
    'hold-time': { type: 'string', default: '90' },
    'graceful-restart': { type: 'string', default: '120' },
    help: { type: 'boolean', short: 'h' },
  },
});
if (values.help || !values.as || !values['router-id'] || !values.peer?.length) {
  process.stdout.write(USAGE);
  process.exit(values.help ? 0 : 2);
}
const out = (o: Record<string, unknown>) => process.stdout.write(JSON.stringify(o) + '\n');
const speaker = new BgpSpeaker({
  as: Number(values.as),
  routerId: values['router-id']!,
  holdTime: Number(values['hold-time']),
  gracefulRestartTime: Number(values['graceful-restart']),
  peers: values.peer!.map((p) => {
    const i = p.lastIndexOf(':');
    return { address: p.slice(0, i), as: Number(p.slice(i + 1)), localAddress: values['local-address'] };
  }),
  announce: values.announce!.split(',').filter(Boolean),
  nextHop6: values['next-hop6'],
});
let ribTimer: NodeJS.Timeout | null = null;
speaker.on('established', (peer: string, n: { holdTime: number; families: unknown[]; as4: boolean }) =>
  out({ event: 'established', peer, holdTime: n.holdTime, families: n.families, as4: n.as4 }),
);
speaker.on('end-of-rib', (peer: string, f: { afi: number }) => out({ event: 'end-of-rib', peer, afi: f.afi }));
speaker.on('down', (peer: string, d: Record<string, unknown>) => out({ event: 'down', peer, ...d }));
speaker.on('best', () => {
  ribTimer ??= setTimeout(() => {
    ribTimer = null;
    out({ event: 'rib', best: speaker.locRib.size });
  }, 200);
});
speaker.start();
readline.createInterface({ input: process.stdin }).on('line', (l) => {
  const cmd = l.trim();
  if (cmd === 'summary') out({ event: 'summary', peers: speaker.summary(), best: speaker.locRib.size });
  else if (cmd === 'routes')
    out({ event: 'routes', routes: [...speaker.locRib].map(([p, r]) => ({ prefix: p, nextHop: r.attrs.nextHop, asPath: r.attrs.asPath })) });
  else if (cmd === 'quit') {
    speaker.stop();
    setTimeout(() => process.exit(0), 200);
  }
});
