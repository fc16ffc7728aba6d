#!/usr/bin/env node
/**
 * Example BGP-like daemon: its RIB (prefix -> encoded path attributes) is checkpointed to the
 * agent as table "rib" of process "bgp". Active: loads a realistic full table and churns it
 * (attribute changes, withdrawals and re-announcements); standby: follows. See DAEMON_USAGE.
 */
import { runDaemon } from '../common/daemon-runner';
import { createRng, generateRib, mutateRoute } from './rib-generator';

let rng = createRng(1);

void runDaemon({
  process: 'bgp',
  table: 'rib',
  generate: (count, seed) => {
    rng = createRng(seed + 1000);
    return generateRib(count, { seed });
  },
  // About 2% of changes are withdrawals; the rest are new attributes for the prefix.
  mutate: (key, value, rand) => (rand() < 0.02 ? null : mutateRoute({ key, value }, rng).value),
});
