// pattern-2-agent-runtime.mjs: a fresh, warmed-up sandbox for every agent task.
// `warmup` runs once, when the image is baked: it installs a helper module and runs python once
// so the module is byte-compiled and python's files are in the guest's page cache. The snapshot
// is taken after it, so every VM starts warm. `warmupTag` is the warmup's cache key: bump it when
// the warmup changes. Each task then gets its own VM with its code staged in, and the VM is
// thrown away afterwards (`restoreOnRelease: true`).
//
//   node examples/pattern-2-agent-runtime.mjs
// (uses the offline python image: see _images.mjs)
import { Image, connect } from "supermachine";
import { pythonImageRef } from "./_images.mjs";

const TOOLS = `
def summarize(xs):
    return f"n={len(xs)} min={min(xs)} max={max(xs)} mean={sum(xs) / len(xs):.2f}"
`;

async function localPool() {
  let warmedUp = false;
  const t0 = Date.now();
  const image = await Image.build({
    ref: await pythonImageRef(),
    name: "example-agent-runtime", // a rebake replaces this snapshot instead of adding one
    memoryMib: 512,
    env: { PYTHONPATH: "/opt/agent" },
    warmupTag: "tools-v1",
    warmup: async (vm) => {
      await vm.writeFile("/opt/agent/tools.py", TOOLS);
      const r = await vm.exec({ argv: ["python3", "-c", "import tools"], timeoutMs: 60_000 });
      if (r.exitCode !== 0) throw new Error(`warmup failed: ${r.stderr}`);
      warmedUp = true;
    },
  });
  console.log(`image ready in ${Date.now() - t0} ms: ${warmedUp ? "baked, warmup ran" : "snapshot cached, warmup skipped"}`);

  return image.pool({
    min: 2, // idle VMs kept ready
    max: 4, // burst capacity
    restoreOnRelease: true, // every task starts from the warm snapshot
    acquireTimeoutMs: 30_000,
  });
}

// With SUPERMACHINE_URL set, the "pattern2" pool of a `supermachine serve` there, whose project
// declares this image with the same warmup (docs/serve.md); the tasks below are unchanged.
const pool = process.env.SUPERMACHINE_URL ? (await connect(process.env.SUPERMACHINE_URL)).pattern2 : await localPool();
if (process.env.SUPERMACHINE_URL) console.log("image ready: the server's pattern2 pool, baked with its warmup");

async function handleAgentTask(taskCode) {
  // On Bun, Deno, Node 24+ or in TypeScript: `await using vm = await pool.acquire();` and no try/finally.
  const vm = await pool.acquire();
  try {
    return await vm.exec({
      argv: ["python3", "/tmp/task.py"],
      stageFiles: { "/tmp/task.py": Buffer.from(taskCode) },
      timeoutMs: 30_000,
    });
  } finally {
    await vm.release();
  }
}

const task = (data) => `
import os, tools
print(tools.summarize(${JSON.stringify(data)}))
print("byte-compiled at warmup:", os.path.exists(tools.__cached__))
print("scratch from an earlier task:", os.path.exists("/tmp/scratch"))
open("/tmp/scratch", "w").write("left behind")
`;

try {
  const outputs = await Promise.all([[3, 1, 4, 1, 5], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3]].map((data) => handleAgentTask(task(data))));
  outputs.forEach((out, i) => {
    console.log(`task ${i + 1}: exit ${out.exitCode}`);
    for (const line of out.stdout.toString().trim().split("\n")) console.log(`  ${line}`);
    if (out.exitCode !== 0) console.log(out.stderr.toString());
  });
} finally {
  await pool.shutdown();
}
