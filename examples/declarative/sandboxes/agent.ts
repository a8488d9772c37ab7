// sandboxes/agent.ts: built on python's baked snapshot
import { defineImage } from "supermachine/config";
import python from "./python";
import { prepare } from "../lib/prepare";          // a helper module: part of agent's key
export default defineImage({ from: python, warmup: prepare });
