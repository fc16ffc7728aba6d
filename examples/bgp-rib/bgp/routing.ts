/**
 * The example router's BGP, checkpointed: the speaker (speaker.ts) runs in the ACTIVE instance
 * only, and everything it knows is written to the process's tables, so the standby always holds
 * it and the agent programs the data plane from it.
 *
 *   bgp-sessions  peer address -> {state, since, holdTime, keepalive, as4, families, peerId, gr}
 *   bgp-adj-in    "peer|prefix" -> the route's path attributes as the peer sent them
 *   bgp-loc-rib   prefix -> the best route: peer, next hop, AS path
 *   bgp-adj-out   "peer|prefix" -> what we announced to the peer
 *   fib           (FIB table) prefix -> FibEntry: the best route's next hop on the data-plane port
 *                 toward the peer; the static --fib entries live here too
 *
 * Values are JSON (FibEntry for the FIB). A change whose value equals what the table holds is not
 * written: a new active that learns the same routes again changes nothing, and the data plane
 * sees no change.
 *
 * Handover without TCP repair: the old active lets go of its sessions without a NOTIFICATION; the
 * new active reloads Adj-RIB-In from its copy as stale routes (still selected, still in the FIB),
 * connects, and the peer, which keeps our routes through the graceful restart, sends its routes
 * and End-of-RIB; what it did not send again is then withdrawn. The peer sees a session reset,
 * and says so: no nonstop routing is claimed here.
 */
import { CheckpointClient } from '../../../agent/sdk/checkpoint-client';
import { encodeFibEntry } from '../../../agent/dataplane/fib-entry';
import { PathAttributes } from './messages';
import { Negotiated } from './session';
import { BgpSpeaker, Route, SpeakerConfig } from './speaker';

export const BGP_TABLES = ['bgp-sessions', 'bgp-adj-in', 'bgp-loc-rib', 'bgp-adj-out'] as const;
const FLUSH_MS = 20;
/** Restored routes handled per turn of the event loop. */
const RESTORE_SLICE = 1000;

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** `make(arg)` computed once per `key` object (kept while the object lives). */
function memo<T>(make: (arg: T) => Buffer): (key: object, arg: T) => Buffer {
  const cache = new WeakMap<object, Buffer>();
  return (key, arg) => {
    let v = cache.get(key);
    if (!v) cache.set(key, (v = make(arg)));
    return v;
  };
}

export interface BgpRoutingOptions {
  speaker: SpeakerConfig;
  /** Data-plane port toward the peers: the interface of the FIB entries of learned routes. */
  port: string;
  fibTable: string;
}

type Out = (o: Record<string, unknown>) => void;

export class BgpRouting {
  private speaker: BgpSpeaker | null = null;
  /** table -> key -> value (null: delete); written every FLUSH_MS. */
  private pending = new Map<string, Map<string, Buffer | null>>();
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly client: CheckpointClient,
    private readonly opts: BgpRoutingOptions,
    private readonly out: Out,
  ) {}

  /** Follows the instance's role: the speaker runs while ACTIVE. */
  onRole(role: string): void {
    if (role === 'ACTIVE' && !this.speaker) this.startSpeaker();
    else if (role !== 'ACTIVE' && this.speaker) {
      this.speaker.release();
      this.speaker = null;
      this.pending.clear();
      this.out({ event: 'bgp-released' });
    }
  }

  stop(): void {
    this.speaker?.stop();
    this.speaker = null;
  }

  summary(): unknown {
    return this.speaker ? { peers: this.speaker.summary(), best: this.speaker.locRib.size } : { peers: [], best: 0, role: 'standby' };
  }

  /**
   * Starts the speaker once the routes the previous active had learned are restored. That work
   * (tens of thousands of routes) is done in slices that yield to the event loop: in a guest
   * under software emulation, doing it in one go held this process for seconds, long enough
   * for its connection to the agent to be dropped as dead.
   */
  private startSpeaker(): void {
    const sp = new BgpSpeaker(this.opts.speaker);
    this.speaker = sp;
    void this.restoreThenStart(sp).catch((e: Error) => this.out({ event: 'bgp-error', message: e.message }));
  }

  private async restoreThenStart(sp: BgpSpeaker): Promise<void> {
    // What the previous active had learned: stale until the peers send it again.
    const raw: [string, Buffer][] = [];
    this.client.table('bgp-adj-in').forEach((key, _schema, value) => raw.push([key, Buffer.from(value)]));
    const byPeer = new Map<string, [string, PathAttributes][]>();
    for (let i = 0; i < raw.length; i++) {
      if (i % RESTORE_SLICE === RESTORE_SLICE - 1) {
        await nextTurn();
        if (this.speaker !== sp) return; // demoted meanwhile
      }
      const [key, value] = raw[i];
      const at = key.indexOf('|');
      const peer = key.slice(0, at);
      if (!byPeer.has(peer)) byPeer.set(peer, []);
      byPeer.get(peer)!.push([key.slice(at + 1), JSON.parse(value.toString()) as PathAttributes]);
    }
    // Values are memoized per attributes object: the routes of one UPDATE share one.
    const locRibValue = memo((r: Route) => Buffer.from(JSON.stringify({ peer: r.peer, nextHop: r.attrs.nextHop, asPath: r.attrs.asPath })));
    const adjInValue = memo((attrs: PathAttributes) => Buffer.from(JSON.stringify(attrs)));
    const fibValues = new Map<string, Buffer>();
    const fibValue = (nextHop: string) => {
      let v = fibValues.get(nextHop);
      if (!v) fibValues.set(nextHop, (v = encodeFibEntry({ nextHops: [{ gateway: nextHop, interface: this.opts.port, weight: 1 }] })));
      return v;
    };
    sp.on('best', (prefix: string, r: Route | null) => {
      this.put('bgp-loc-rib', prefix, r ? locRibValue(r.attrs, r) : null);
      this.put(this.opts.fibTable, prefix, r ? fibValue(r.attrs.nextHop) : null);
    });
    for (const [peer, routes] of byPeer) {
      for (let i = 0; i < routes.length; i += RESTORE_SLICE) {
        sp.restoreStale(peer, routes.slice(i, i + RESTORE_SLICE));
        await nextTurn();
        if (this.speaker !== sp) return;
      }
    }
    sp.on('adj-in', (peer: string, prefix: string, r: Route | null) => this.put('bgp-adj-in', `${peer}|${prefix}`, r ? adjInValue(r.attrs, r.attrs) : null));
    sp.on('adj-out', (peer: string, prefixes: string[], attrs: PathAttributes) => {
      const v = Buffer.from(JSON.stringify(attrs));
      for (const p of prefixes) this.put('bgp-adj-out', `${peer}|${p}`, v);
    });
    sp.on('established', (peer: string, n: Negotiated) => {
      this.put(
        'bgp-sessions',
        peer,
        Buffer.from(
          JSON.stringify({
            state: 'Established',
            since: Date.now(),
            holdTime: n.holdTime,
            keepalive: n.keepaliveS,
            as4: n.as4,
            families: n.families,
            peerId: n.peerIdentifier,
            gr: n.peerGracefulRestart,
          }),
        ),
      );
      this.out({ event: 'bgp-established', peer, holdTime: n.holdTime, families: n.families.length, restored: byPeer.get(peer)?.length ?? 0 });
    });
    sp.on('end-of-rib', (peer: string, f: { afi: number }) => this.out({ event: 'bgp-end-of-rib', peer, afi: f.afi, best: sp.locRib.size }));
    sp.on('down', (peer: string, d: { reason: string }) => {
      this.put('bgp-sessions', peer, Buffer.from(JSON.stringify({ state: 'Idle', since: Date.now(), reason: d.reason })));
      this.out({ event: 'bgp-down', peer, reason: d.reason });
    });
    sp.start();
  }

  /** Queues a write unless the table already holds exactly this value. */
  private put(table: string, key: string, value: Buffer | null): void {
    const cur = this.client.table(table).records.get(key);
    const same = value === null ? cur === undefined : cur !== undefined && cur.value.equals(value);
    let t = this.pending.get(table);
    if (same) {
      t?.delete(key); // a later change back to what the table holds cancels the queued one
      return;
    }
    if (!t) this.pending.set(table, (t = new Map()));
    t.set(key, value);
    this.timer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  private flush(): void {
    this.timer = null;
    if (this.client.role !== 'ACTIVE') return;
    for (const [table, changes] of this.pending) {
      let b = this.client.batch(table);
      for (const [k, v] of changes) {
        if (v) b.put(k, v);
        else b.delete(k);
        if (b.count >= 1000) {
          void b.commit().catch((e: Error) => this.out({ event: 'write-failed', table, message: e.message }));
          b = this.client.batch(table);
        }
      }
      if (b.count) void b.commit().catch((e: Error) => this.out({ event: 'write-failed', table, message: e.message }));
    }
    this.pending.clear();
  }
}
