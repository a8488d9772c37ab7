// Runs every example in examples/ the way a user does (`node examples/<file>` from the repo root,
// with this process's environment) and checks that it exits 0, prints what it should, and leaves
// no QEMU process and no temp directory behind (test/helpers/examples.ts, which the
// compatibility tier shares to run them under Bun and Deno). Every example needs an entry in
// EXPECTED there: a new one without it fails.
import { describe, expect, it } from "vitest";
import { checkExample, examples, EXPECTED, RUN_TIMEOUT_MS } from "../helpers/examples.js";

describe("examples", () => {
  it("finds the examples, and every one has an expected-output entry", () => {
    expect(examples).toContain("01-hello.mjs");
    expect(examples.filter((f) => !(f in EXPECTED)), "examples without an EXPECTED entry").toEqual([]);
    expect(Object.keys(EXPECTED).filter((f) => !examples.includes(f)), "EXPECTED entries without an example").toEqual([]);
  });

  for (const file of examples) {
    it(
      `${file} runs, prints what it should and cleans up`,
      async () => {
        await checkExample(file);
      },
      RUN_TIMEOUT_MS + 20_000,
    );
  }
});
