// The project's config: which modules declare images, and the pools the application uses.
// `supermachine build` (or loadPools) finds it from this directory or any directory below.
import { defineConfig } from "supermachine/config";

export default defineConfig({
  images: ["./sandboxes/*.ts"],
  pools: {
    // One fresh, warmed VM per task: a released VM is thrown away and a clean restore takes its place.
    agent: { image: "agent", min: 2, max: 8, restoreOnRelease: true },
  },
  // Snapshots next to the project (listed in .gitignore), so `supermachine gc` here only sees its own.
  snapshotsDir: "./.snapshots",
});
