/**
 * How long a connection of the agent (its own, the writer thread's) waits for another one's write
 * lock, ms. Within the agent writes are short (a batch group, a declaration); a lock held this
 * long is another program's: someone running sqlite3 on the state file, a backup tool holding a
 * transaction open. Its own module so that the threads import it without the rest.
 */
export const BUSY_TIMEOUT_MS = 5000;
