// A sandbox image module: copy next to your supermachine.config.ts and list it there.
// `ref` is any reference supermachine accepts (builtin:busybox, oci:<dir>[:<tag>]).
import { defineImage } from "supermachine/config";

export default defineImage({
  ref: "builtin:busybox",
  memoryMib: 256,
  vcpus: 1,
  env: { LANG: "C.UTF-8" },
});
