// The agent image, built on runtime's snapshot: it adds the agent's tools and imports them once.
// Its warmup lives in lib/agent-tools.ts: editing that file rebakes agent (and only agent).
import { defineImage } from "supermachine/config";
import { installAgentTools } from "../lib/agent-tools";
import runtime from "./runtime";

export default defineImage({
  from: runtime,
  extraFiles: [{ hostPath: "../files/agent.toml", guestPath: "/etc/agent/agent.toml" }],
  warmupTag: "v1",
  warmup: installAgentTools,
});
