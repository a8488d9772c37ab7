// The agent image's warmup: lays out a small tool library and byte-compiles it, so every agent
// VM starts with it imported once already. Editing this file changes the agent image's key (and
// only its key: python does not import it).
import type { WarmupVm } from "supermachine";

const TOOLS = `import json

def answer(question):
    return json.dumps({"question": question, "answer": 42})
`;

export async function prepare(vm: WarmupVm): Promise<void> {
  await vm.writeFile("/opt/agent/tools.py", TOOLS);
  const r = await vm.exec({ argv: ["python3", "-c", "import sys; sys.path.insert(0, '/opt/agent'); import tools; print(tools.answer('warm?'))"] });
  if (r.exitCode !== 0) throw new Error(`the agent tools do not import: ${r.stderr.toString()}`);
}
