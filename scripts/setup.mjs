// `npm run setup` (and so `npm run demo`, `npm test`, `npm run bench`): the bootstrap of setup in
// this repository. Plain Node with no dependencies, because it runs before node_modules and dist/
// exist. It does only what must happen before TypeScript can run:
//   1. `npm ci` when node_modules does not match package-lock.json;
//   2. the TypeScript build into dist/ when the sources changed (src/, bench/, and web/, the page
//      of `supermachine serve`, which scripts/build-web.mjs bundles into dist/web/);
// then hands over to the compiled setup (src/setup/: Debian packages, the guest kernel, agent and
// busybox image, the install manifest, QEMU's user), which `npx supermachine setup` runs too.
// A second run with nothing changed does no work.
//
// Flags: --quiet, --skip-apt, --artifacts-only (the guest artifacts only, as from an installed
// package), --check (report what is missing; install, build and create nothing; exit 1 when
// something is), --json (one JSON object on stdout; progress stays on stderr).
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const args = new Set(process.argv.slice(2));
const flags = {
  check: args.has("--check"),
  json: args.has("--json"),
  quiet: args.has("--quiet"),
  skipApt: args.has("--skip-apt"),
  artifactsOnly: args.has("--artifacts-only"),
};
const isRepo = existsSync(join(root, "src")) && existsSync(join(root, "tsconfig.json")) && existsSync(join(root, "package-lock.json"));
const say = (msg) => process.stderr.write(`[setup] ${msg}\n`);
const secs = (t0) => `${((Date.now() - t0) / 1000).toFixed(1)} s`;

function fail(code, message, hint) {
  say(`error: ${message}`);
  if (hint) say(`hint: ${hint}`);
  if (flags.json) process.stdout.write(JSON.stringify({ error: { code, message, ...(hint ? { hint } : {}) } }) + "\n");
  process.exit(1);
}

// What the tools print goes to stderr: stdout belongs to --json and to the command setup runs
// before (for example `npm run bench -- --json`, whose stdout is one JSON object).
function run(cmd, argv) {
  const r = spawnSync(cmd, argv, { stdio: ["ignore", 2, 2], cwd: root });
  if (r.error) fail("SETUP_COMMAND_FAILED", `${cmd} could not start: ${r.error.message}`);
  if (r.status !== 0) fail("SETUP_COMMAND_FAILED", `${cmd} ${argv.join(" ")} exited with ${r.status ?? r.signal}`);
}

function sha256(...parts) {
  const h = createHash("sha256");
  for (const p of parts) h.update(p).update("\0");
  return h.digest("hex");
}

/** Hash of a file tree's paths and contents: when it changes, dist/ is stale. */
function treeHash(dir) {
  const h = createHash("sha256");
  const walk = (d) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else h.update(relative(dir, p)).update("\0").update(readFileSync(p)).update("\0");
    }
  };
  walk(dir);
  return h.digest("hex");
}

function nodeModulesState() {
  const stamp = join(root, "node_modules", ".supermachine-lock-hash");
  const want = sha256(readFileSync(join(root, "package-lock.json")));
  return { stamp, want, fresh: existsSync(stamp) && readFileSync(stamp, "utf8") === want };
}

function distState() {
  const key = sha256(treeHash(join(root, "src")), treeHash(join(root, "bench")), (existsSync(join(root, "web")) ? treeHash(join(root, "web")) : ""), readFileSync(join(root, "tsconfig.json")), readFileSync(join(root, "package-lock.json")));
  const stamp = join(root, "dist", ".build-hash");
  return { stamp, key, fresh: existsSync(stamp) && readFileSync(stamp, "utf8") === key };
}

const setupModule = join(root, "dist", "src", "setup", "index.js");

if (isRepo && !flags.artifactsOnly) {
  const nm = nodeModulesState();
  const dist = distState();
  if (flags.check) {
    if (!nm.fresh || !dist.fresh || !existsSync(setupModule)) {
      // Nothing compiled to ask: report what this bootstrap knows.
      const items = [
        { name: "node_modules", ok: nm.fresh, detail: nm.fresh ? "matches package-lock.json" : "missing or stale", fix: "npm run setup (runs npm ci)" },
        { name: "dist", ok: dist.fresh, detail: dist.fresh ? "compiled from the current sources" : "missing or stale", fix: "npm run setup (compiles TypeScript)" },
      ];
      const missing = items.filter((i) => !i.ok).map((i) => i.name);
      if (flags.json) process.stdout.write(JSON.stringify({ ok: false, mode: "repository", root, items, missing, setupCommand: "npm run setup" }, null, 2) + "\n");
      else process.stdout.write(items.map((i) => `${i.ok ? "ok     " : "MISSING"}  ${i.name.padEnd(12)}  ${i.detail}${i.ok ? "" : `\n             fix: ${i.fix}`}`).join("\n") + "\nthe rest is checked once dist/ is compiled: npm run setup\n");
      process.exit(1);
    }
    flags.repoState = { nodeModules: true, dist: true };
  } else {
    if (!nm.fresh) {
      const t0 = Date.now();
      say("npm ci (node_modules is missing or stale)");
      run("npm", ["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
      writeFileSync(nm.stamp, nm.want);
      say(`npm ci done in ${secs(t0)}`);
    }
    if (!dist.fresh) {
      const t0 = Date.now();
      say("compiling TypeScript into dist/");
      for (const d of ["src", "bench", "web"]) rmSync(join(root, "dist", d), { recursive: true, force: true });
      run(process.execPath, [join(root, "node_modules", "typescript", "bin", "tsc"), "-p", "tsconfig.json"]);
      // The web page of `supermachine serve` (dist/web/).
      run(process.execPath, [join(root, "scripts", "build-web.mjs")]);
      writeFileSync(dist.stamp, distState().key);
      say(`TypeScript compiled in ${secs(t0)}`);
    }
    // A manifest an older setup wrote into dist/ is no longer read.
    rmSync(join(root, "dist", "native.json"), { force: true });
  }
}
if (!existsSync(setupModule)) {
  fail("SETUP_DIST_MISSING", `${join(root, "dist")} is missing or incomplete`, isRepo ? "run npm run setup (it compiles it)" : "reinstall the supermachine package");
}
const { runSetup } = await import(pathToFileURL(setupModule).href);
process.exitCode = await runSetup(root, { ...flags, artifactsOnly: flags.artifactsOnly || !isRepo });
