#!/usr/bin/env node
/**
 * The `supermachine` command: parses the command line (program.ts), runs the command and exits
 * with its status. With runtime-check.ts, the only place in the package that calls process.exit.
 */
import "./runtime-check.js"; // first: a runtime that cannot run supermachine stops here
import { CommanderError } from "commander";
import { SupermachineError } from "../errors.js";
import { UsageError } from "./common.js";
import { createProgram } from "./program.js";

const args = process.argv.slice(2);
// What follows "--" belongs to the guest, so a "--json" there does not switch the output.
const dashdash = args.indexOf("--");
const wantsJson = (dashdash < 0 ? args : args.slice(0, dashdash)).includes("--json");

createProgram(args)
  .then((program) => program.parseAsync(args, { from: "user" }))
  .then(
    () => process.exit(Number(process.exitCode ?? 0)),
    (err: unknown) => process.exit(report(err)),
  );

/** Prints `err` where it belongs and returns the exit status: 2 for usage errors, else 1. */
function report(err: unknown): number {
  if (err instanceof CommanderError) {
    // Commander has printed it already (help and --version end up here too, with status 0).
    return err.exitCode === 0 ? 0 : 2;
  }
  if (err instanceof UsageError) {
    process.stderr.write(`supermachine: ${err.message}\n(add --help for usage)\n`);
    return 2;
  }
  if (wantsJson) {
    const e = err as Partial<SupermachineError>;
    process.stdout.write(JSON.stringify({ error: { code: e.code ?? "INTERNAL", message: e.message ?? String(err), hint: e.hint } }) + "\n");
  } else {
    process.stderr.write(`supermachine: ${err instanceof SupermachineError ? err.describe() : ((err as Error).stack ?? String(err))}\n`);
  }
  return 1;
}
