// `await using` on a pool and a VM: leaving the block releases the VM, and the pool's own block
// shuts it down. Plain JavaScript: only runtimes that parse `await using` run it (Bun, Deno, and
// Node from 24); on the others the test expects the SyntaxError.
import { assert, busyboxPool, report } from "./_lib.mjs";

let pid;
let outer;
{
  await using pool = await busyboxPool();
  outer = pool;
  {
    await using vm = await pool.acquire();
    pid = vm.pid;
    assert.equal((await vm.exec({ argv: ["echo", "in the block"] })).stdout.toString(), "in the block\n");
    assert.equal(pool.stats().inUse, 1);
  }
  assert.equal(pool.stats().inUse, 0, "the VM was not released at the end of its block");
}
assert.equal(outer.stats().alive, 0, "the pool was not shut down at the end of its block");
report({ scenario: "await-using", pid });
