// The project examples/08-e2b-sdk.mjs serves: one pool of the built-in busybox image, which the
// E2B SDK names as its template.
import { defineConfig, defineImage } from "supermachine/config";

export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox" }) },
  pools: { base: { image: "box", min: 1, max: 4 } },
});
