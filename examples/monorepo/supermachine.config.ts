// The monorepo's one config: every workspace package's images/*.ts is an image module. Image
// names are the module file names, unique across the packages.
import { defineConfig } from "supermachine/config";

export default defineConfig({
  images: ["./packages/*/images/*.ts"],
  pools: {
    checkout: { image: "checkout-api", min: 1, max: 4 },
    search: { image: "search-index", min: 1, max: 2 },
  },
  snapshotsDir: "./.snapshots",
});
