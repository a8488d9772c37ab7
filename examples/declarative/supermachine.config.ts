// supermachine.config.ts (found upward from the working directory)
import { defineConfig } from "supermachine/config";
export default defineConfig({
  images: ["./sandboxes/*.ts"],                      // globs of modules, or a record of definitions
  pools: { agent: { image: "agent", min: 2, max: 16 } },
});
