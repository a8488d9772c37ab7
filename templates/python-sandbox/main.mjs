// Runs a snippet of python in a sandbox from the project's pool: `node main.mjs`.
// loadPools() builds what the pools need first (nothing, once `supermachine build` ran).
import { loadPools } from "supermachine";

const code = process.argv[2] ?? "import sandbox_tools; sandbox_tools.result(sum(range(10)))";
const pools = await loadPools();
try {
  const vm = await pools.python.acquire();
  try {
    const r = await vm.exec({ argv: ["python3", "-c", code], timeoutMs: 10_000 });
    process.stdout.write(r.stdout);
    process.stderr.write(r.stderr);
    process.exitCode = r.exitCode;
  } finally {
    await vm.release();
  }
} finally {
  await pools.close();
}
