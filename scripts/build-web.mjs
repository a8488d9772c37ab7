#!/usr/bin/env node
// Builds the web page of `supermachine serve` into dist/web/ (part of `npm run build` and of
// scripts/setup.mjs): web/src/main.tsx bundled by esbuild into app.js (+ app.js.map),
// web/styles.css copied to app.css, web/index.html copied as is. The server maps `/` to
// index.html and `/ui/<file>` to the others.
//
// The files are written into a temporary directory beside the output and renamed into place, so
// a server reading dist/web/ never sees half a build.
//
// Flags: --out <dir> (default dist/web), --verbose (print what was written).
import { build } from "esbuild";
import { copyFileSync, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const { values } = parseArgs({ options: { out: { type: "string" }, verbose: { type: "boolean", default: false } } });
const out = resolve(values.out ?? join(root, "dist", "web"));
const web = join(root, "web");

const tmp = `${out}.tmp-${process.pid}`;
const old = `${out}.old-${process.pid}`;
rmSync(tmp, { recursive: true, force: true });
mkdirSync(tmp, { recursive: true });
try {
  await build({
    entryPoints: [join(web, "src", "main.tsx")],
    outfile: join(tmp, "app.js"),
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2022",
    minify: true,
    sourcemap: "linked",
    legalComments: "none",
    jsx: "automatic",
    jsxImportSource: "preact",
    logLevel: "error",
  });
  copyFileSync(join(web, "index.html"), join(tmp, "index.html"));
  copyFileSync(join(web, "styles.css"), join(tmp, "app.css"));
  mkdirSync(dirname(out), { recursive: true });
  if (existsSync(out)) renameSync(out, old);
  renameSync(tmp, out);
  rmSync(old, { recursive: true, force: true });
} catch (err) {
  rmSync(tmp, { recursive: true, force: true });
  // esbuild has printed its own errors; anything else is said here.
  if (!err?.errors) process.stderr.write(`[build-web] ${err?.message ?? err}\n`);
  process.stderr.write("[build-web] the web page was not built\n");
  process.exit(1);
}
if (values.verbose) for (const f of readdirSync(out)) process.stderr.write(`[build-web] ${join(out, f)} (${statSync(join(out, f)).size} bytes)\n`);
