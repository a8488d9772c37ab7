// The options tables of docs/api.md are generated from the option table (src/schema/options.ts):
// they must be what `npm run docs:options` writes now.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { withOptionsTables } from "../../src/schema/options-doc.js";

describe("docs/api.md options tables", () => {
  it("are the option table's, as generated (run npm run docs:options after changing an option)", () => {
    const text = readFileSync(join(import.meta.dirname, "..", "..", "docs", "api.md"), "utf8");
    expect(text).toBe(withOptionsTables(text));
  });
});
