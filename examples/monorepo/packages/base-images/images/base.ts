// The root of every image: busybox (built in, so the example runs offline) with the company layout.
import { defineImage } from "supermachine/config";

export default defineImage({
  ref: "builtin:busybox",
  env: { ACME: "1" },
  warmupTag: "base-1",
  warmup: async (vm) => {
    await vm.exec({ argv: ["sh", "-c", "mkdir -p /srv /etc/acme && echo base > /etc/acme/images"] });
  },
});
