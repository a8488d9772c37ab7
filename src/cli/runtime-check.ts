/**
 * Imported first by the CLI (main.ts): a JavaScript runtime that cannot run supermachine
 * (src/js-runtime.ts) ends the command at once with the error printed as every other one is,
 * before any other module of the package is evaluated.
 */
import { checkJsRuntime } from "../js-runtime.js";

const problem = checkJsRuntime();
if (problem) {
  if (process.argv.includes("--json")) {
    process.stdout.write(JSON.stringify({ error: { code: problem.code, message: problem.message, hint: problem.hint } }) + "\n");
  } else {
    process.stderr.write(`supermachine: ${problem.describe()}\n`);
  }
  process.exit(1);
}
