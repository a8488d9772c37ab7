// docs/runtimes.md shows what the compatibility tier runs: its table is test/compat/features.ts
// row for row, the versions it names are the ones package.json pins, and its minimums are the
// ones the runtime check enforces (src/js-runtime.ts).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { RUNTIME_MINIMUMS } from "../../src/js-runtime.js";
import { FEATURES } from "../compat/features.js";

const ROOT = join(import.meta.dirname, "..", "..");
const page = readFileSync(join(ROOT, "docs", "runtimes.md"), "utf8");
const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { devDependencies: Record<string, string> };

/** The rows of the table between the compat-table markers, as cells. */
function tableRows(text: string): string[][] {
  const start = text.indexOf("<!-- compat-table:start -->");
  const end = text.indexOf("<!-- compat-table:end -->");
  expect(start, "the compat-table markers in docs/runtimes.md").toBeGreaterThanOrEqual(0);
  expect(end).toBeGreaterThan(start);
  return text
    .slice(start, end)
    .split("\n")
    .filter((l) => l.startsWith("| `"))
    .map((l) => l.slice(1, -1).split(" | ").map((c) => c.trim()));
}

describe("docs/runtimes.md", () => {
  it("has the compatibility tier's table, row for row", () => {
    const want = FEATURES.map((f) => [`\`${f.id}\``, f.what, f.status.node, f.status.bun, f.status.deno]);
    expect(tableRows(page)).toEqual(want);
  });

  it("names the Bun and Deno versions the devDependencies pin, exactly", () => {
    for (const name of ["bun", "deno"] as const) {
      const pinned = pkg.devDependencies[name];
      expect(pinned, `devDependencies.${name}`).toMatch(/^\d+\.\d+\.\d+$/);
      const label = name === "bun" ? "Bun" : "Deno";
      expect(page).toContain(`${label} ${pinned} (the \`${name}\` devDependency)`);
    }
  });

  it("states the minimums the runtime check enforces", () => {
    const row = (label: string) => page.split("\n").find((l) => l.startsWith(`| ${label} |`)) ?? "";
    expect(row("Node.js")).toContain(`| ${RUNTIME_MINIMUMS.node.version} |`);
    expect(row("Bun")).toContain(`| ${RUNTIME_MINIMUMS.bun.version} |`);
    expect(row("Deno")).toContain(`| ${RUNTIME_MINIMUMS.deno.version} |`);
    expect(page).toContain(`before ${RUNTIME_MINIMUMS.bun.version}`);
    expect(page).toContain(`before ${RUNTIME_MINIMUMS.deno.version}`);
  });
});
