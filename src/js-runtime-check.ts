/**
 * Imported first by the package's entry points (src/index.ts, src/cli/main.ts): refuses, with
 * a RuntimeError, a JavaScript runtime that cannot run supermachine (src/js-runtime.ts), before
 * any other module of the package is evaluated.
 */
import { checkJsRuntime } from "./js-runtime.js";

const problem = checkJsRuntime();
if (problem) throw problem;
