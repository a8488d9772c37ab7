// The agent's tools, written into the image by its warmup and imported once so that every task
// starts with them compiled. A helper module: part of the agent image's key.
import type { WarmupVm } from "supermachine";

export const TOOLS_PY = `"""Tools a task can call: python3 -c 'import tools; ...'"""
import json
import os
import tomllib

with open("/etc/agent/agent.toml", "rb") as f:
    CONFIG = tomllib.load(f)


def workspace():
    return os.environ.get("AGENT_WORKSPACE", "/workspace")


def save(name, text):
    path = os.path.join(workspace(), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def report(**fields):
    print(json.dumps({"agent": CONFIG["agent"]["name"], **fields}))
`;

export async function installAgentTools(vm: WarmupVm): Promise<void> {
  await vm.writeFile("/opt/agent/tools.py", TOOLS_PY);
  const r = await vm.exec({ argv: ["python3", "-c", "import tools; tools.report(ready=True)"] });
  if (r.exitCode !== 0) throw new Error(`the agent tools do not import: ${r.stderr.toString()}`);
}
