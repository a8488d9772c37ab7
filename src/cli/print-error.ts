/**
 * How the CLI prints a command's failure: with --json, `{ error: { code, message, hint } }` on
 * stdout; otherwise `supermachine: <message>` (and its hint) on stderr. Imports nothing but the
 * error classes, so that runtime-check.ts can use it before the rest of the CLI is loaded.
 */
import { SupermachineError } from "../errors.js";

/** Whether `args` ask for --json; what follows "--" belongs to the guest and does not count. */
export function wantsJson(args: readonly string[]): boolean {
  const dashdash = args.indexOf("--");
  return (dashdash < 0 ? args : args.slice(0, dashdash)).includes("--json");
}

/** Prints `err` where it belongs (see above). */
export function printError(err: unknown, json: boolean): void {
  if (json) {
    const e = err as Partial<SupermachineError>;
    process.stdout.write(JSON.stringify({ error: { code: e.code ?? "INTERNAL", message: e.message ?? String(err), hint: e.hint } }) + "\n");
  } else {
    process.stderr.write(`supermachine: ${err instanceof SupermachineError ? err.describe() : ((err as Error).stack ?? String(err))}\n`);
  }
}
