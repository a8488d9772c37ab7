import { defineConfig, defineImage } from "supermachine/config";

// Images this repository declares. The built-in busybox image is built offline by
// `npm run setup`, so it needs no registry.
export default defineConfig({
  images: {
    busybox: defineImage({ ref: "builtin:busybox", memoryMib: 256 }),
  },
});
