/**
 * Imported first by the CLI (main.ts): a JavaScript runtime that cannot run supermachine
 * (src/js-runtime.ts) ends the command at once with the error printed as every other one is,
 * before any other module of the package is evaluated.
 */
import { checkJsRuntime } from "../js-runtime.js";
import { printError, wantsJson } from "./print-error.js";

const problem = checkJsRuntime();
if (problem) {
  printError(problem, wantsJson(process.argv.slice(2)));
  process.exit(1);
}
