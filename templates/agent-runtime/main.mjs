// Runs a few "tasks" at once, each in its own fresh agent VM: `node main.mjs`.
// loadPools() builds what the pools need first (nothing, once `supermachine build` ran).
import { loadPools } from "supermachine";

const pools = await loadPools();
try {
  const tasks = ["plan", "search", "write"].map(async (task) => {
    const vm = await pools.agent.acquire();
    try {
      const code = `import tools; p = tools.save("${task}.txt", "done"); tools.report(task="${task}", wrote=p)`;
      const r = await vm.exec({ argv: ["python3", "-c", code], timeoutMs: 10_000 });
      if (r.exitCode !== 0) throw new Error(`task ${task} failed: ${r.stderr.toString()}`);
      return r.stdout.toString().trim();
    } finally {
      await vm.release(); // restoreOnRelease: the next task gets a clean VM
    }
  });
  for (const line of await Promise.all(tasks)) console.log(line);
} finally {
  await pools.close();
}
