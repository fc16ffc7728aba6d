/**
 * Mocha root hooks (loaded through .mocharc.json `require`): after the whole run, whatever agent
 * a test left running is stopped and the directories the harness made are removed, also when
 * tests failed before their own cleanup.
 */
import { removeTempDirs, stopAllAgents } from '../../harness/agent-process';

export const mochaHooks = {
  async afterAll(): Promise<void> {
    await stopAllAgents();
    removeTempDirs();
  },
};
