#!/usr/bin/env node
/**
 * The `supermachine` command: parses the command line (program.ts), runs the command and exits
 * with its status. With runtime-check.ts, the only place in the package that calls process.exit.
 */
import "./runtime-check.js"; // first: a runtime that cannot run supermachine stops here
import { CommanderError } from "commander";
import { UsageError } from "./common.js";
import { printError, wantsJson } from "./print-error.js";
import { createProgram } from "./program.js";

const args = process.argv.slice(2);
const json = wantsJson(args);

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
  printError(err, json);
  return 1;
}
