// The parent image: the language runtime and what every agent image shares. Children bake on
// its snapshot, so they inherit its memory, vCPUs, root filesystem and whatever its warmup left.
import { defineImage } from "supermachine/config";

export default defineImage({
  ref: "python:3-bookworm",
  memoryMib: 512,
  env: { PYTHONPATH: "/opt/agent", AGENT_WORKSPACE: "/workspace" },
  warmupTag: "v1",
  warmup: async (vm) => {
    const r = await vm.exec({ argv: ["sh", "-c", "mkdir -p /workspace /opt/agent && python3 -c 'import json, re, subprocess'"] });
    if (r.exitCode !== 0) throw new Error(`runtime warmup failed: ${r.stderr.toString()}`);
  },
});
