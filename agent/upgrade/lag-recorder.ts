/**
 * Samples the lag of an upgrade's standby instances while it runs, for the upgrade report.
 *
 * Before the switchover the standbys are the new version's instances, after it the old
 * version's (demoted, still following). Every `intervalMs` each standby's lag (batches the agent
 * holds that it has not acknowledged) is read from the checkpoint status; a sample is kept when
 * the lag or readiness changed, or `keepaliveMs` passed since the last kept one, so a quiet
 * upgrade that waits an hour in SWITCHED stores a few hundred rows, not thousands. Kept samples
 * are written every `flushMs` in one transaction, and at most `maxSamples` per upgrade.
 *
 * Recording is evidence, not control: a full state disk drops samples (said once in the log)
 * and never stops or slows the upgrade.
 */
import { Logger } from '../common/logger';
import { ProcessStatus } from '../checkpoint/messages';
import { LagSample, UpgradeRecord, UpgradeStore } from './upgrade-store';

export interface LagRecorderOptions {
  intervalMs: number;
  keepaliveMs: number;
  flushMs: number;
  maxSamples: number;
}

export const DEFAULT_LAG_RECORDER_OPTIONS: LagRecorderOptions = { intervalMs: 500, keepaliveMs: 5_000, flushMs: 2_000, maxSamples: 20_000 };

export class LagRecorder {
  private id = '';
  private processes: UpgradeRecord['processes'] = {};
  private timer: NodeJS.Timeout | null = null;
  private pending: LagSample[] = [];
  private last = new Map<string, LagSample>();
  private kept = 0;
  private lastFlush = 0;
  private warned = false;

  constructor(
    private readonly store: Pick<UpgradeStore, 'addLagSamples' | 'lagSampleCount'>,
    private readonly status: (process: string) => ProcessStatus[],
    private readonly log: Logger,
    private readonly opts: LagRecorderOptions = DEFAULT_LAG_RECORDER_OPTIONS,
  ) {}

  /** Records `rec` from now on (if it is not already) and takes a sample now. */
  start(rec: UpgradeRecord, now = Date.now()): void {
    if (!this.timer || this.id !== rec.id) {
      this.stop();
      this.id = rec.id;
      this.processes = rec.processes;
      this.kept = this.store.lagSampleCount(rec.id); // an agent restart goes on counting
      this.lastFlush = now;
      this.timer = setInterval(() => this.tick(), this.opts.intervalMs);
      this.timer.unref();
    }
    this.tick(now);
  }

  /** Takes a last sample, writes what is pending and stops. */
  stop(now = Date.now()): void {
    if (!this.timer) return;
    this.tick(now);
    clearInterval(this.timer);
    this.timer = null;
    this.flush(now);
    this.last.clear();
  }

  /** One sampling step at `now` (epoch ms); the timer calls it every intervalMs. Nothing when stopped. */
  tick(now = Date.now()): void {
    if (!this.timer) return;
    for (const [process, inst] of Object.entries(this.processes)) {
      // Unknown to the checkpoint service (it throws NOT_FOUND) until the process re-registers
      // after an agent restart, when it has no stored table: nothing to sample yet. A throw here
      // would escape from a timer into the agent.
      let peers: ProcessStatus['peers'] = [];
      try {
        peers = this.status(process)[0]?.peers ?? [];
      } catch {
        continue;
      }
      for (const instance of [inst.from, inst.to]) {
        const peer = peers.find((x) => x.instanceId === instance);
        if (!peer || peer.role === 'ACTIVE') continue;
        const key = `${process}/${instance}`;
        const prev = this.last.get(key);
        if (prev && prev.lag === peer.lag && prev.ready === peer.ready && now - prev.at < this.opts.keepaliveMs) continue;
        if (this.kept + this.pending.length >= this.opts.maxSamples) return;
        const s: LagSample = { at: now, process, instance, lag: peer.lag, ready: peer.ready };
        this.last.set(key, s);
        this.pending.push(s);
      }
    }
    if (now - this.lastFlush >= this.opts.flushMs) this.flush(now);
  }

  private flush(now = Date.now()): void {
    this.lastFlush = now;
    const batch = this.pending;
    this.pending = [];
    try {
      this.store.addLagSamples(this.id, batch);
      this.kept += batch.length;
    } catch (e) {
      // Runs from a timer: an error must not escape into the agent (nor repeat in the log).
      if (!this.warned) this.log.warn({ upgrade: this.id, err: (e as Error).message, dropped: batch.length }, 'lag samples not stored; dropping them');
      this.warned = true;
    }
  }
}
