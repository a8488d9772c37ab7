import { defineImage } from "supermachine/config";
export default defineImage({
  ref: "python:3-bookworm",
  memoryMib: 512,
  extraFiles: [{ hostPath: "./requirements.lock", guestPath: "/srv/requirements.lock" }],
  warmup: async (vm) => { await vm.exec({ argv: ["python3", "-c", "import json"] }); },
});
