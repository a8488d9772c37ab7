// A sandbox image module: copy next to your supermachine.config.ts and list it there.
// `ref` is any reference supermachine accepts (builtin:busybox, oci:<dir>[:<tag>], a registry
// reference). extraFiles and warmup are baked into the snapshot every VM starts from.
import { defineImage } from "supermachine/config";

export default defineImage({
  ref: "builtin:busybox",
  memoryMib: 256,
  vcpus: 1,
  env: { LANG: "C.UTF-8" },
  // Host files copied into the guest before the snapshot; editing one rebakes.
  // extraFiles: [{ hostPath: "./config/app.toml", guestPath: "/etc/app.toml" }],
  // Runs once against the booted VM before the snapshot; bump warmupTag when it changes.
  warmupTag: "v1",
  warmup: async (vm) => {
    await vm.exec({ argv: ["sh", "-c", "echo warmed > /var/warm"] });
  },
});
