// What the compatibility scenarios share. Each scenario is plain JavaScript that runs unchanged
// under Node, Bun and Deno (test/compat/compat.test.ts starts it under each), checks what it
// does with node:assert, and ends by printing one line `COMPAT {json}` with what it measured.
import assert from "node:assert/strict";
import { Image } from "supermachine";

export { assert };

/** "Bun 1.4.5": the runtime this scenario runs on. */
export const runtime = globalThis.Deno
  ? `Deno ${globalThis.Deno.version.deno}`
  : process.versions.bun
    ? `Bun ${process.versions.bun}`
    : `Node ${process.versions.node}`;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A pool of the built-in busybox image (baked once per home, whichever runtime comes first). */
export async function busyboxPool(options = { min: 1, max: 1 }) {
  const image = await Image.build({ ref: "builtin:busybox", name: "compat-busybox" });
  return image.pool(options);
}

/** Prints the scenario's result line, which the test parses. */
export function report(facts) {
  console.log(`COMPAT ${JSON.stringify({ runtime, ...facts })}`);
}
