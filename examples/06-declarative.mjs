// 06-declarative.mjs: sandboxes declared as TypeScript modules (examples/declarative/), baked as a
// graph (agent is built on python's snapshot) and handed out as named pools.
//
//   node examples/06-declarative.mjs
//   cd examples/declarative && npx supermachine build   # or ls, why agent, graph, run agent -- python3 -V
//
// The project names its image "python:3-bookworm", as a user would; here it is the offline python
// test image, tagged with that name first (what `supermachine tag` does).
import { loadPools } from "supermachine";
import { tagPythonImage } from "./_images.mjs";

await tagPythonImage();
const t0 = Date.now();
const pools = await loadPools({ cwd: new URL("./declarative/", import.meta.url).pathname });
console.log(`pools ready in ${Date.now() - t0} ms: ${Object.keys(pools).join(", ")}`);
try {
  const vm = await pools.agent.acquire();
  try {
    const version = await vm.exec({ argv: ["python3", "-V"] });
    console.log(`agent runs ${version.stdout.toString().trim()}`);
    const staged = await vm.readFile("/srv/requirements.lock");
    console.log(`python's extraFiles are there: ${staged.toString().split("\n").find((l) => l && !l.startsWith("#"))}`);
    const tools = await vm.exec({ argv: ["python3", "-c", "import sys; sys.path.insert(0, '/opt/agent'); import tools; print(tools.answer('from the agent pool'))"] });
    console.log(`agent's warmup left its tools: ${tools.stdout.toString().trim()}`);
  } finally {
    await vm.release();
  }
} finally {
  await pools.close();
}
