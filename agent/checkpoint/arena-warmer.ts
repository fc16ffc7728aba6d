/**
 * ArenaWarmer: a thread that makes arenas (see ArenaPool) and writes one byte per page of each
 * before handing it over, so that the thread that fills it does not take the page faults.
 *
 * Why: fresh memory is mapped by the kernel on first write, one 4 KiB page at a time (transparent
 * huge pages are off by default for anonymous memory on Debian: "madvise", and Node cannot ask
 * for them). On this hardware that costs about 2.4 us a page: copying 120 MB into fresh arenas
 * took 60-90 ms, into arenas already mapped 8-10 ms. A standby's bulk load and an agent's table
 * load copy that much on their event loops. Here the faults are taken on a thread of their own, on another core
 * when there is one, while the event loop fills the arenas made before.
 *
 * The thread only ever writes arenas it made itself and drops them once posted: what it hands
 * over is zeroed memory nobody else writes. Its code is inline (eval) rather than a file of its
 * own, so that bundles of the SDK (one file per daemon) carry it.
 */
import { Worker } from 'node:worker_threads';

const WORKER_CODE = `
const { parentPort } = require('node:worker_threads');
parentPort.on('message', ({ bytes, count }) => {
  for (let i = 0; i < count; i++) {
    const sab = new SharedArrayBuffer(bytes);
    const view = new Uint8Array(sab);
    for (let off = 0; off < bytes; off += 4096) view[off] = 0;
    parentPort.postMessage(sab);
  }
});
`;

export class ArenaWarmer {
  private worker: Worker | null = null;
  private failed = false;

  /** `onArena` receives each arena made, in the order asked for. */
  constructor(
    private readonly arenaBytes: number,
    private readonly onArena: (buf: Buffer) => void,
    private readonly onFailure: () => void,
  ) {}

  /**
   * Asks for `count` more arenas. False when the thread cannot run (it could not start, or it
   * failed): callers then make their arenas themselves, as without a warmer.
   */
  request(count: number): boolean {
    if (this.failed) return false;
    if (!this.worker) {
      try {
        this.worker = new Worker(WORKER_CODE, { eval: true, resourceLimits: { maxOldGenerationSizeMb: 8, maxYoungGenerationSizeMb: 2 } });
      } catch {
        this.failed = true;
        return false;
      }
      this.worker.on('message', (sab: SharedArrayBuffer) => this.onArena(Buffer.from(sab)));
      const gone = () => {
        if (this.failed) return;
        this.failed = true;
        this.worker = null;
        this.onFailure();
      };
      this.worker.on('error', gone);
      this.worker.on('exit', gone);
      // Never what keeps a process running; a thread that goes away ends warming, nothing else.
      // After the listeners: a 'message' listener added later refs the thread's port again, and a
      // process that had warmed then never exited on its own.
      this.worker.unref();
    }
    this.worker.postMessage({ bytes: this.arenaBytes, count });
    return true;
  }
}
