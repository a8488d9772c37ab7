// A fork bomb in an exec with a timeout: it hits the process limit, is killed at its deadline
// (the host's timer, under this runtime's event loop), and the VM answers at once afterwards.
import { assert, busyboxPool, report } from "./_lib.mjs";

const TIMEOUT_MS = 3_000;
const pool = await busyboxPool();
const vm = await pool.acquire();
try {
  const t0 = performance.now();
  const r = await vm.exec({ argv: ["sh", "-c", "f() { f | f & }; f; exec sleep 3600"], timeoutMs: TIMEOUT_MS, limits: { processes: 64 } });
  const overshootMs = performance.now() - t0 - TIMEOUT_MS;
  assert.equal(r.timedOut, true);
  assert.equal(r.signal, "SIGKILL");
  assert.equal(r.pidsLimited, true);
  assert.ok(overshootMs > -50, `returned ${overshootMs.toFixed(0)} ms before its deadline`);
  assert.ok(overshootMs < 2_000, `returned ${overshootMs.toFixed(0)} ms after its deadline`);
  const t1 = performance.now();
  const after = await vm.exec({ argv: ["echo", "still here"] });
  assert.equal(after.stdout.toString(), "still here\n");
  report({ scenario: "fork-bomb", overshootMs: Math.round(overshootMs), nextExecMs: Math.round(performance.now() - t1) });
} finally {
  await vm.release();
  await pool.shutdown();
}
