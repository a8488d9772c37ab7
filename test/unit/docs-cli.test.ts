// docs/cli.md and the CLI agree. The convention the test reads: outside code blocks, each command
// has a section headed `### supermachine <command>` (subcommands too: `### supermachine cache
// export`), and the section lists each of its flags on a line starting with "- `" (`--long` forms,
// as in `- \`-c, --config <file>\`: ...`). Global flags are listed under `## Global flags`.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { Command } from "commander";
import { describe, expect, it } from "vitest";
import { createProgram } from "../../src/cli/program.js";

const doc = readFileSync(join(import.meta.dirname, "..", "..", "docs", "cli.md"), "utf8");

/** Command → its flags, from the doc. */
function documented(text: string): { commands: Map<string, Set<string>>; global: Set<string> } {
  const commands = new Map<string, Set<string>>();
  const global = new Set<string>();
  let current: Set<string> | undefined;
  let inCode = false;
  for (const line of text.split("\n")) {
    if (line.startsWith("```")) inCode = !inCode;
    if (inCode) continue;
    const h = /^### supermachine (.+)$/.exec(line);
    if (h) commands.set(h[1]!.trim(), (current = new Set()));
    else if (/^## Global flags/.test(line)) current = global;
    else if (/^#{1,2} /.test(line)) current = undefined;
    else if (current && line.startsWith("- `")) for (const m of line.slice(0, line.indexOf("`", 3) + 1).matchAll(/--[a-z][a-z-]*/g)) current.add(m[0]);
  }
  return { commands, global };
}

/** Command → its flags, from the program (what --help prints). */
function registered(program: Command): Map<string, Set<string>> {
  const out = new Map<string, Set<string>>();
  const walk = (cmd: Command, prefix: string) => {
    for (const c of cmd.commands) {
      const name = prefix ? `${prefix} ${c.name()}` : c.name();
      out.set(name, new Set(c.options.map((o) => o.long).filter((l): l is string => l !== undefined)));
      walk(c, name);
    }
  };
  walk(program, "");
  return out;
}

const sorted = (m: Map<string, Set<string>>) => Object.fromEntries([...m].sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => [k, [...v].sort()]));

describe("docs/cli.md", () => {
  it("documents every command with exactly its flags, and nothing the CLI lacks", async () => {
    const program = await createProgram([]);
    const { commands, global } = documented(doc);
    expect(sorted(commands)).toEqual(sorted(registered(program)));
    expect([...global].sort()).toEqual([...program.options.map((o) => o.long!), "--help"].sort());
  });

  it("would notice a flag missing from the doc, or one the CLI does not have", () => {
    const sample = "### supermachine ls\n\n```\n### supermachine not-a-command\n```\n- `-c, --config <file>`: x\n- `--bogus`: y\n## Other\n- `--ignored`: z\n";
    expect(sorted(documented(sample).commands)).toEqual({ ls: ["--bogus", "--config"] });
  });
});
