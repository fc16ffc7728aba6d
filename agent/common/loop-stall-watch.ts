/**
 * The agent's longest event-loop stall over a span of time (an upgrade phase), in ms.
 *
 * Every acknowledgement, keepalive and switchover step waits for the agent's event loop, so how
 * long it was held is a figure of every upgrade. A timer fires every INTERVAL_MS; the time between
 * two fires beyond the interval is how long the loop could not run it. The figure can fall short
 * of the real stall by up to one interval, never exceed it.
 *
 * Why not Node's monitorEventLoopDelay: its reset() forgets the timer's previous fire, so a stall
 * that begins in the same turn as a reset is not counted, and spans here begin at phase changes,
 * in the very turns where the work of the new phase starts.
 */

/** ms between two fires of the watch timer: the resolution of the figure. */
const INTERVAL_MS = 2;

export class LoopStallWatch {
  private timer: NodeJS.Timeout | null = null;
  private last = 0n;
  private max = 0;

  /** Watches from now on (nothing if it already does). */
  start(): void {
    if (this.timer) return;
    this.last = process.hrtime.bigint();
    this.max = 0;
    this.timer = setInterval(() => {
      const now = process.hrtime.bigint();
      const stall = Number(now - this.last) / 1e6 - INTERVAL_MS;
      this.last = now;
      if (stall > this.max) this.max = stall;
    }, INTERVAL_MS);
    this.timer.unref();
  }

  /** The longest stall since start() or the last take(), ms (0.1 ms steps), and starts a new span. */
  take(): number {
    const m = Math.max(0, Math.round(this.max * 10) / 10);
    this.max = 0;
    return m;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
