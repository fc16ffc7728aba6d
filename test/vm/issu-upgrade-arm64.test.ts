/**
 * The hitless upgrade of issu-upgrade.test.ts on an arm64 control plane: a real hitlessd, real
 * qemu-system-aarch64 (virt, cortex-a57 under TCG), the real aarch64 bundles (v1: kernel
 * 6.1.0-47-arm64, bgp 1.0.0 writing schema 1; v2: kernel 6.1.0-50-arm64, bgp 2.0.0 writing
 * schema 2 with transforms) signed with a key the test generates, and the real issu CLI.
 * Three boots in all: v1 once, v2 for each loadversion. After every step an audit compares the
 * agent's table with every bgp instance's own copy, in both VMs while both run.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { until } from '../../harness/wait';
import { printAgentLogIfFailed } from '../../harness/guest-images';
import { UpgradeHarness, signedUpgradePair } from '../helpers/upgrade-harness';

const measure = (what: string, v: number | string) => process.stderr.write(`      MEASURE ${what}: ${v}\n`);
/**
 * What the bundles' bgp loads (--records in scripts/build-guest-images.sh), as on x86: in the
 * arm64 TCG guest the load took 6-19 s and the standby's bulk snapshot 12 s, against 19-117 s
 * boots and 23-107 s loadversions, most of which is Node starting up in the guest; fewer routes
 * would save little.
 */
const ROUTES = 20_000;

describe('issu on arm64: runversion then abortversion, then runversion and commitversion (real QEMU aarch64 under TCG)', function () {
  this.timeout(600_000);
  let suiteT0 = 0;
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'hia-'));
  const stateDir = path.join(work, 'state');
  let v2 = '';
  let h: UpgradeHarness;

  const running = async () => (await h.vms()).filter((v) => v.state === 'RUNNING');
  /** The VM's console shows the init of `version` on the arm64 kernel `kernel`. */
  const assertBooted = async (vm: string, version: string, kernel: string) => {
    const info = (await h.vms()).find((v) => v.name === vm);
    assert.equal(info?.arch, 'aarch64', `${vm} is an arm64 VM`);
    assert.match(
      fs.readFileSync(info!.consoleLog, 'utf8'),
      new RegExp(`HITLESS-INIT version=${version} arch=aarch64 kernel=${kernel.replace(/\./g, '\\.')}\\b`),
    );
  };

  /** loadversion and runversion with an audit after each; returns the new VM and the rib audited under v2. */
  const loadAndRun = async () => {
    const t0 = Date.now();
    const loaded = await h.cli('loadversion', v2);
    measure('aarch64 loadversion (verify, boot v2 standby, bulk sync to READY)', `${Date.now() - t0} ms`);
    await h.trackAll();
    assert.equal(loaded.current?.phase, 'LOADED');
    const toVm = loaded.current!.toVm;
    await assertBooted(toVm, '2.0.0', '6.1.0-50-arm64');
    await h.assertAudit('after loadversion', ['cp-1', toVm]);
    const sw = await h.cli('runversion');
    assert.equal(sw.current?.phase, 'SWITCHED');
    measure('aarch64 write freeze at runversion (demo table, churning)', `${sw.current!.freezeMs.toFixed(2)} ms`);
    const now = await h.active();
    assert.equal(now?.vmId, toVm);
    assert.equal(now?.softwareVersion, '2.0.0');
    await new Promise((r) => setTimeout(r, 1500)); // v2 churns the table
    const { rib } = await h.assertAudit('after runversion', ['cp-1', toVm]);
    return { toVm, rib };
  };

  before(async function () {
    if (process.env.HITLESS_SKIP_ARM64 === '1') this.skip();
    this.timeout(1_200_000);
    // Here, not in the describe body: mocha runs every describe body before any test.
    suiteT0 = Date.now();
    const pair = await signedUpgradePair('aarch64', work);
    v2 = pair.v2;
    h = new UpgradeHarness({ stateDir, trustDir: pair.trustDir, minRecords: ROUTES * 0.75 });
    await h.startAgent();
    const bootMs = await h.boot('cp-1', pair.v1, ROUTES, 300_000);
    measure(`aarch64 v1 boot to active with ${ROUTES} routes`, `${bootMs} ms`);
    await assertBooted('cp-1', '1.0.0', '6.1.0-47-arm64');
  });

  afterEach(function () {
    printAgentLogIfFailed(this, h?.agent);
  });

  after(async function () {
    this.timeout(120_000);
    await h?.close();
    fs.rmSync(work, { recursive: true, force: true });
    if (h) measure('aarch64 issu test, whole', `${Date.now() - suiteT0} ms`);
  });

  it('abortversion after runversion puts v1 back in charge with its exact table, changes made under v2 included', async () => {
    const { toVm, rib: underV2 } = await loadAndRun();
    const back = await h.cli('abortversion', '--reason', 'test rollback');
    assert.ok(!back.current, 'no upgrade in progress');
    assert.equal(back.history[0].phase, 'ROLLED_BACK');
    const a = await h.active();
    assert.equal(a?.vmId, 'cp-1', 'v1 is active again');
    assert.equal(a?.softwareVersion, '1.0.0');
    const { rib: afterRollback } = await h.assertAudit('after abortversion');
    assert.ok(afterRollback.seq >= underV2.seq, 'the changes made under v2 are in v1');
    await until('v2 VM stopped', async () => (await running()).every((v) => v.name !== toVm), 60_000);
    await until('only bgp@cp-1 left', async () => (await h.bgp()).peers.every((p) => p.vmId === 'cp-1'), 30_000);
    await h.assertAudit('with v1 alone', ['cp-1']);
    // v2 wrote schema 1 for its v1 standby (transform 2->1): v1 reads every record.
    assert.deepEqual((await h.bgp()).tables.find((t) => t.name === 'rib')!.schemas, [1]);
  });

  it('loadversion, runversion and commitversion leave v2 running alone with the same table', async () => {
    const { toVm } = await loadAndRun();
    const t0 = Date.now();
    const done = await h.cli('commitversion');
    measure('aarch64 commitversion (stop v1, raise the write schema)', `${Date.now() - t0} ms`);
    assert.ok(!done.current, 'no upgrade in progress');
    assert.equal(done.history[0].phase, 'COMMITTED');
    assert.deepEqual(
      (await running()).map((v) => v.name),
      [toVm],
      'only the v2 VM runs',
    );
    await until('only bgp@v2 left', async () => (await h.bgp()).peers.every((p) => p.vmId === toVm), 30_000);
    const a = await h.active();
    assert.equal(a?.vmId, toVm);
    assert.equal(a?.softwareVersion, '2.0.0');
    await h.assertAudit('after commitversion', [toVm]);
    // Nothing reads schema 1 any more: v2 writes its own.
    assert.equal(a?.schemaWrites, 2);
    await until('schema-2 records in the table', async () => (await h.bgp()).tables.find((t) => t.name === 'rib')!.schemas.includes(2), 30_000);
    await h.assertAudit('after v2 wrote schema 2', [toVm]);
  });
});
