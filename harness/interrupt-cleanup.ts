/**
 * What a test run, the demo or a benchmark started is ended when the run itself is stopped by a
 * signal (SIGINT from a terminal, SIGTERM from `timeout` or a CI runner). Their own cleanup lives
 * in `after` hooks and `finally` blocks, which a signal skips: an agent, its QEMU guests (they
 * outlive the agent by design) and the test network's namespaces were left running.
 *
 * The harness registers each thing it starts here and unregisters it when it ends normally; on
 * the first SIGINT or SIGTERM every registered cleanup runs (at most CLEANUP_MS for all of them),
 * then the process exits with 128 + the signal's number, as if the signal had ended it.
 */

type Cleanup = () => unknown;

/** The longest the cleanups may take together before the process exits anyway, ms. */
const CLEANUP_MS = 10_000;

const cleanups = new Set<Cleanup>();
let installed = false;
let interrupted = false;

function install(): void {
  if (installed) return;
  installed = true;
  for (const [signal, number] of [
    ['SIGINT', 2],
    ['SIGTERM', 15],
  ] as const) {
    process.on(signal, () => {
      if (interrupted) return; // a second signal while cleaning up: the first one finishes
      interrupted = true;
      process.stderr.write(`\n${signal}: ending what this run started (${cleanups.size} to clean up)\n`);
      const all = [...cleanups].reverse().map((c) =>
        Promise.resolve()
          .then(c)
          .catch(() => undefined),
      );
      const timer = setTimeout(() => process.exit(128 + number), CLEANUP_MS);
      void Promise.all(all).then(() => {
        clearTimeout(timer);
        process.exit(128 + number);
      });
    });
  }
}

/** Runs `cleanup` if the process is stopped by a signal; call the result once it ended normally. */
export function onInterrupt(cleanup: Cleanup): () => void {
  install();
  cleanups.add(cleanup);
  return () => cleanups.delete(cleanup);
}
