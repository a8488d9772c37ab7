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
  cache: {
    // Imports accept only snapshots signed by this key: replace it with yours
    // (`supermachine cache keygen ci-cache.key` prints it; the private key is the CI secret
    // SUPERMACHINE_CACHE_SIGNING_KEY of jobs on the default branch, which export).
    trust: ["ed25519:RAm706vdr+1Gg6M6DfTA87ZatpfvhprEErIlFhtgrhI="],
  },
});
