// The public types, as a user's editor applies them: the fixture projects (the README's example
// among them) type-check against supermachine/config, and misuse is an error (@ts-expect-error
// lines in test/fixtures/config/types/checks.ts fail the check when they stop being errors).
import { describe, expect, it } from "vitest";
import ts from "typescript";
import { fixture } from "../helpers/config.js";

describe("supermachine/config types", () => {
  it("accept the fixture projects and refuse misuse", () => {
    const configPath = `${fixture("types")}/tsconfig.json`;
    const read = ts.readConfigFile(configPath, ts.sys.readFile);
    expect(read.error).toBeUndefined();
    const parsed = ts.parseJsonConfigFileContent(read.config, ts.sys, fixture("types"));
    const program = ts.createProgram({ rootNames: parsed.fileNames, options: parsed.options });
    const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => {
      const where = d.file ? `${d.file.fileName}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}: ` : "";
      return where + ts.flattenDiagnosticMessageText(d.messageText, "\n");
    });
    expect(diagnostics).toEqual([]);
  });
});
