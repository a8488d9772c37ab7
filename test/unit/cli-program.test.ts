// The CLI loads only the command group a command line names (program.ts COMMAND_GROUPS): the
// table must name exactly what each group registers, or a command would not be found.
import { describe, expect, it } from "vitest";
import { COMMAND_GROUPS, createProgram } from "../../src/cli/program.js";

const names = (p: { commands: readonly { name(): string }[] }) => p.commands.map((c) => c.name()).filter((n) => n !== "help");

describe("the CLI's command groups", () => {
  it("name exactly the commands each group registers, each in one group", async () => {
    const all = await createProgram();
    const seen: string[] = [];
    for (const group of COMMAND_GROUPS) {
      const only = await createProgram([group.names[0]!]);
      expect(names(only).sort()).toEqual([...group.names].sort());
      seen.push(...group.names);
    }
    expect(seen.sort()).toEqual(names(all).sort());
    expect(new Set(seen).size).toBe(seen.length);
  });

  it("loads every group when the first argument is not a command (help, options first)", async () => {
    for (const args of [[], ["--help"], ["--json", "info"], ["no-such-command"]]) {
      expect(names(await createProgram(args)).length).toBe(COMMAND_GROUPS.flatMap((g) => g.names).length);
    }
    expect(names(await createProgram(["--version"]))).toEqual([]);
  });
});
