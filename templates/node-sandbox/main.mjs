// Evaluates a JavaScript expression in a sandbox from the project's pool: `node main.mjs "1 + 1"`.
// loadPools() builds what the pools need first (nothing, once `supermachine build` ran).
import { loadPools } from "supermachine";

const code = process.argv[2] ?? "[1, 2, 3].map((n) => n * n)";
const pools = await loadPools();
try {
  const vm = await pools.node.acquire();
  try {
    const r = await vm.exec({ argv: ["node", "/srv/runner.mjs", code], timeoutMs: 10_000 });
    process.stdout.write(r.stdout);
    process.stderr.write(r.stderr);
    process.exitCode = r.exitCode;
  } finally {
    await vm.release();
  }
} finally {
  await pools.close();
}
