// 02-pool.mjs: a pool of VMs serving several callers at once.
// Shows `min`/`max`, parallel acquires, `pool.stats()`, release in `finally`, and that with
// `restoreOnRelease: true` (the default) every acquire gets a clean VM, whatever the last
// caller left behind.
//
//   node examples/02-pool.mjs
import { Image, connect } from "supermachine";

// Two VMs are restored up front; up to four may exist at once.
// With SUPERMACHINE_URL (and SUPERMACHINE_API_KEY) set, the pool is the "busybox" pool of a
// `supermachine serve` there instead (docs/serve.md, "The remote client"): the rest is unchanged.
const pool = process.env.SUPERMACHINE_URL
  ? (await connect(process.env.SUPERMACHINE_URL)).busybox
  : await (await Image.build({ ref: "builtin:busybox" })).pool({ min: 2, max: 4, restoreOnRelease: true });
const show = (when) => {
  const s = pool.stats();
  console.log(`${when}: alive ${s.alive}, in use ${s.inUse}, idle ${s.idle}, waiting ${s.waiting} (min ${s.min}, max ${s.max})`);
};

try {
  show("pool ready");

  // Four callers at once: two get the idle VMs, the pool restores two more for the others.
  const vms = await Promise.all([1, 2, 3, 4].map(() => pool.acquire()));
  show("4 acquired");
  try {
    const lines = await Promise.all(
      vms.map(async (vm, i) => {
        // Leave something behind in each VM.
        const { stdout } = await vm.exec({
          argv: ["sh", "-c", `echo "task ${i + 1} was here" > /tmp/leftover; cat /tmp/leftover`],
          timeoutMs: 10_000,
        });
        return `${stdout.toString().trim()} (${vm.pid ? `QEMU pid ${vm.pid}` : `sandbox ${vm.id}`})`;
      }),
    );
    for (const line of lines) console.log(`  ${line}`);
  } finally {
    // On Bun, Deno, Node 24+ or in TypeScript, `await using vm = await pool.acquire()` releases for you.
    await Promise.all(vms.map((vm) => vm.release()));
  }
  // Released VMs are thrown away; clean restores take their place in the background.
  show("just released");

  const vm = await pool.acquire();
  try {
    const { stdout } = await vm.exec({ argv: ["sh", "-c", "cat /tmp/leftover 2>/dev/null || echo 'no /tmp/leftover: a clean VM'"] });
    console.log(`next acquire: ${stdout.toString().trim()}`);
  } finally {
    await vm.release();
  }
} finally {
  await pool.shutdown();
}
