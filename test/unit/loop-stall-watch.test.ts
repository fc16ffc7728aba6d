/**
 * LoopStallWatch: the agent's longest event-loop stall over a span (the upgrade phases' figure).
 */
import assert from 'node:assert/strict';
import { LoopStallWatch } from '../../agent/common/loop-stall-watch';

const turns = (n: number) => new Promise<void>((resolve) => setTimeout(resolve, n));
const block = (ms: number) => {
  const until = performance.now() + ms;
  while (performance.now() < until);
};

describe('LoopStallWatch', () => {
  const watch = new LoopStallWatch();
  afterEach(() => watch.stop());

  it('counts a stall that begins in the very turn its span begins, in that span only', async () => {
    watch.start();
    await turns(20);
    watch.take();
    // The span starts and the loop is held in the same turn (a phase change, then its work).
    block(40);
    await turns(20);
    const first = watch.take();
    assert.ok(first >= 38, `the 40 ms stall counted (at most one 2 ms interval short): ${first}`);
    await turns(20);
    const second = watch.take();
    assert.ok(second < 38, `the next span does not inherit it: ${second}`);
  });

  it('reports nothing once stopped, and starts afresh', async () => {
    watch.start();
    block(30);
    await turns(10);
    watch.stop();
    assert.ok(watch.take() >= 28);
    block(30);
    await turns(10);
    assert.equal(watch.take(), 0, 'a stopped watch sees nothing');
  });
});
