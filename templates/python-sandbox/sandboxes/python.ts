// The python sandbox: Debian's python 3 with a small helper module staged and byte-compiled
// before the snapshot, so every VM starts with it on disk, compiled, and in the page cache.
import { defineImage } from "supermachine/config";
import { warmPython } from "../lib/warm";

export default defineImage({
  ref: "python:3-bookworm",
  memoryMib: 512,
  env: { PYTHONPATH: "/opt/sandbox" },
  // Host paths are relative to this file. Editing a staged file rebakes the image.
  extraFiles: [{ hostPath: "../files/sandbox_tools.py", guestPath: "/opt/sandbox/sandbox_tools.py", mode: 0o644 }],
  // The function cannot be hashed, but its code and the helpers it imports are part of the key
  // (bundled): editing lib/warm.ts rebakes. Bump warmupTag to rebake for another reason.
  warmupTag: "v1",
  warmup: warmPython,
});
