// The project's config: which modules declare images, and the pools the application uses.
// `supermachine build` (or loadPools) finds it from this directory or any directory below.
import { defineConfig } from "supermachine/config";

export default defineConfig({
  images: ["./sandboxes/*.ts"],
  pools: {
    // loadPools() hands this out as pools.python: one VM restored ahead of time, up to 4 at once.
    python: { image: "python", min: 1, max: 4 },
  },
  // Snapshots next to the project (listed in .gitignore), so `supermachine gc` here only sees its own.
  snapshotsDir: "./.snapshots",
});
