// The node sandbox: Node.js on Debian, with a small runner module written and loaded once before
// the snapshot, so every VM starts with node's files in the page cache.
import { defineImage } from "supermachine/config";
import { warmNode } from "../lib/warm";

export default defineImage({
  ref: "node:20-bookworm-slim",
  // Node wants more than the default 256 MiB; the guest's writable layer is half of it.
  memoryMib: 512,
  env: { NODE_ENV: "production" },
  // Its code and lib/warm.ts are part of the key: editing them rebakes. warmupTag rebakes for other reasons.
  warmupTag: "v1",
  warmup: warmNode,
});
