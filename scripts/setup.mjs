#!/usr/bin/env node
// One idempotent setup step, run by `npm run demo`, `npm test` and `npm run bench`:
//   1. Debian packages the engine and the native builds need (apt-get, only what is missing)
//   2. `npm ci` when node_modules does not match package-lock.json
//   3. TypeScript build into dist/ when the sources changed
//   4. guest kernel, guest agent and the built-in busybox image, each built into the cache
//      directory ($SUPERMACHINE_HOME, default ~/.cache/supermachine) under a hash of its
//      inputs, so a second checkout or a CI run on the same machine reuses them
//   5. the install manifest, in the cache directory (<home>/installs/<inputs>.json, named by a
//      hash of this package's guest sources): where the runtime finds the kernel and the agent.
//      Never written into the package, which may be installed by root and read-only to its users.
//   6. confinement: as root, the unprivileged system user QEMU runs as (`supermachine`, no login
//      shell, no home) is created when missing, and the cache directory is made private (0700,
//      nothing readable by other users; the kernel and agent readable by QEMU's group)
// A second run with nothing changed does no work. Plain Node: it runs before node_modules.
//
// Two modes. In this repository (src/ and tsconfig.json present) all of the above. From an
// installed package (`npx supermachine setup` runs this script with --artifacts-only; a package
// has no src/ and ships dist/) only the guest artifacts: steps 1 (the packages the artifacts and
// the runtime need), 4, 5 and 6; never npm or tsc.
//
// Flags: --quiet (print only when something is done), --skip-apt, --artifacts-only,
// --check (report what is missing, install and build nothing, create nothing; exit 0 when all is
// there, 1 otherwise), --json (one JSON object on stdout; progress stays on stderr).

import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { availableParallelism, homedir, tmpdir } from "node:os";
import { basename, dirname, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { aptDecision, installLine } from "./apt-plan.mjs";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const args = new Set(process.argv.slice(2));
const json = args.has("--json");
const check = args.has("--check");
const quiet = args.has("--quiet") || (json && !check);
/** This repository (sources to compile, tests to run) or an installed package (dist shipped). */
const isRepo = existsSync(join(root, "src")) && existsSync(join(root, "tsconfig.json")) && existsSync(join(root, "package-lock.json"));
const artifactsOnly = args.has("--artifacts-only") || !isRepo;
/** How to run setup, for hints: the CLI in a dependent project, the npm script here. */
const SETUP_CMD = isRepo && !args.has("--artifacts-only") ? "npm run setup" : "npx supermachine setup";
const home =
  process.env.SUPERMACHINE_HOME || join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "supermachine");
const started = Date.now();
/** PATH with rustup's default location appended, for hosts where cargo is not on PATH. */
const buildEnv = { ...process.env, PATH: `${process.env.PATH ?? "/usr/bin:/bin"}:${join(homedir(), ".cargo", "bin")}` };

const say = (msg) => process.stderr.write(`[setup] ${msg}\n`);
const note = (msg) => quiet || say(msg);
const secs = (t0) => `${((Date.now() - t0) / 1000).toFixed(1)} s`;

function fail(msg, hint, code = "SETUP_FAILED") {
  say(`error: ${msg}`);
  if (hint) say(`hint: ${hint}`);
  if (json) process.stdout.write(JSON.stringify({ error: { code, message: msg, ...(hint ? { hint } : {}) } }) + "\n");
  process.exit(1);
}

/** "8.5 min", "40 s". */
const duration = (s) => (s >= 90 ? `${(s / 60).toFixed(1)} min` : `${Math.max(1, Math.round(s))} s`);
const CORES = Math.max(1, availableParallelism());
/** Rough costs measured on this project's 2-core reference machine, scaled by cores. */
const ESTIMATE_S = {
  packages: 60,
  kernel: Math.round((17 * 60) / Math.min(CORES, 16)),
  agent: 30,
  busybox: 5,
};

// What the tools print goes to stderr: stdout belongs to the command setup runs before (for
// example `npm run bench -- --json`, whose stdout is one JSON object).
function run(cmd, argv, opts = {}) {
  const r = spawnSync(cmd, argv, { stdio: ["ignore", 2, 2], cwd: root, ...opts });
  if (r.error) fail(`${cmd} could not start: ${r.error.message}`);
  if (r.status !== 0) fail(`${cmd} ${argv.join(" ")} exited with ${r.status ?? r.signal}`);
}

function sha256(...parts) {
  const h = createHash("sha256");
  for (const p of parts) h.update(typeof p === "string" ? p : p).update("\0");
  return h.digest("hex");
}

/** Hash of a file tree's paths and contents (sorted, so the order of readdir does not matter). */
function hashTree(dir, skip = () => false) {
  const h = createHash("sha256");
  const walk = (d) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      // .gitignore files are left out: npm pack drops them, and an installed package must compute
      // the same keys as the checkout it was packed from.
      if (name === ".gitignore" || skip(p)) continue;
      const st = statSync(p);
      if (st.isDirectory()) walk(p);
      else h.update(relative(dir, p)).update("\0").update(readFileSync(p)).update("\0");
    }
  };
  walk(dir);
  return h.digest("hex");
}

// ---- 1. Debian packages ----------------------------------------------------------------------

/** What the runtime needs on every host. */
const RUNTIME_PACKAGES = {
  "qemu-system-x86": "the hypervisor",
  "squashfs-tools": "sqfstar, to turn images into squashfs root filesystems",
  "util-linux": "setpriv, which ties every QEMU process to its owner and drops its privileges",
  passwd: "useradd, for the unprivileged user QEMU runs as",
  zstd: "zstd-compressed image layers",
};
/** What building each guest artifact needs (only when it is not in the cache yet). */
const BUILD_PACKAGES = {
  busybox: { "busybox-static": "the built-in busybox image" },
  kernel: {
    "linux-source-6.1": "guest kernel sources",
    bc: "kernel build",
    bison: "kernel build",
    flex: "kernel build",
    "libelf-dev": "kernel build",
    make: "kernel build",
    gcc: "kernel build",
    "xz-utils": "unpacking the kernel sources",
  },
  agent: {
    cpio: "packing the agent initramfs",
    file: "checking the agent binary is static",
    "librust-libc-dev": "the agent's only crate",
  },
};
const PACKAGES = {
  ...RUNTIME_PACKAGES,
  ...BUILD_PACKAGES.busybox,
  ...BUILD_PACKAGES.kernel,
  ...BUILD_PACKAGES.agent,
  "docker-registry": "tests: a real OCI distribution registry on loopback",
  skopeo: "tests: pushing fixture images, writing docker archives",
  mmdebstrap: "tests: building the Debian python fixture image",
  openssl: "tests: a self-signed CA for the TLS registry",
  "apache2-utils": "tests: htpasswd for the registry with basic auth",
};

function missingPackages(names) {
  if (names.length === 0) return [];
  const r = spawnSync("dpkg-query", ["-W", "-f=${Package} ${db:Status-Abbrev}\n", ...names], { encoding: "utf8" });
  if (r.error) fail("dpkg-query is not available: supermachine's setup expects a Debian-based Linux host", undefined, "SETUP_HOST_UNSUPPORTED");
  const installed = new Set(
    r.stdout
      .split("\n")
      .filter((l) => /\sii\s*$/.test(l))
      .map((l) => l.split(" ")[0]),
  );
  return names.filter((n) => !installed.has(n));
}

const hasCargo = () => spawnSync("cargo", ["--version"], { env: buildEnv }).status === 0;

/**
 * The packages to have: in this repository all of them (the tests use them); from a package,
 * the runtime's and those that build the artifacts the cache lacks (`need`: kernel, agent,
 * busybox). "cargo" stands for the Rust toolchain.
 */
function neededPackages(need) {
  if (!artifactsOnly) return { names: Object.keys(PACKAGES), cargo: true };
  const names = Object.keys(RUNTIME_PACKAGES);
  for (const k of need) names.push(...Object.keys(BUILD_PACKAGES[k]));
  return { names, cargo: need.includes("agent") };
}

function listMissingPackages(need) {
  const { names, cargo } = neededPackages(need);
  const missing = missingPackages(names);
  if (cargo && !hasCargo()) missing.push("cargo");
  return missing;
}

function ensurePackages(need) {
  if (args.has("--skip-apt")) return;
  const missing = listMissingPackages(need);
  const plan = aptDecision({
    missing,
    uid: process.getuid?.(),
    sudo: () => spawnSync("sudo", ["-n", "true"], { stdio: "ignore", timeout: 10_000 }).status === 0,
  });
  if (plan.action === "none") return;
  if (plan.action === "ask") {
    // Not root and no password-less sudo: nothing is installed, built or created; one line to run.
    if (!json) process.stdout.write(`${plan.line}\n`);
    fail(
      `Debian packages are missing (${missing.join(", ")}) and this user (uid ${process.getuid?.()}) cannot install them: it is not root and has no password-less sudo`,
      `run: ${plan.line}; then run ${SETUP_CMD} again (or pass --skip-apt to go on without them)`,
      "SETUP_APT_NEEDS_ROOT",
    );
  }
  const t0 = Date.now();
  say(`installing Debian packages: ${plan.packages.join(", ")}`);
  const apt = (...a) => {
    const [cmd, ...rest] = [...plan.prefix, "apt-get", ...a];
    const r = spawnSync(cmd, rest, {
      stdio: ["ignore", "ignore", "inherit"],
      env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
    });
    return r.status === 0;
  };
  const line = installLine(missing);
  if (!apt("update", "-q")) {
    fail("apt-get update failed", `install them yourself: ${line}`, "SETUP_APT_FAILED");
  }
  if (!apt("install", "-y", "-q", "--no-install-recommends", ...plan.packages)) {
    fail(`apt-get install ${plan.packages.join(" ")} failed`, `run it yourself to see why: ${line}`, "SETUP_APT_FAILED");
  }
  say(`packages installed in ${secs(t0)}`);
}

// ---- 2. node_modules ---------------------------------------------------------------------------

function nodeModulesState() {
  const stamp = join(root, "node_modules", ".supermachine-lock-hash");
  const want = sha256(readFileSync(join(root, "package-lock.json")));
  return { stamp, want, fresh: existsSync(stamp) && readFileSync(stamp, "utf8") === want };
}

function ensureNodeModules() {
  const { stamp, want, fresh } = nodeModulesState();
  if (fresh) return;
  const t0 = Date.now();
  say("npm ci (node_modules is missing or stale)");
  run("npm", ["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
  writeFileSync(stamp, want);
  say(`npm ci done in ${secs(t0)}`);
}

// ---- 3. TypeScript ---------------------------------------------------------------------------

function distState() {
  const key = sha256(
    hashTree(join(root, "src")),
    existsSync(join(root, "bench")) ? hashTree(join(root, "bench")) : "",
    readFileSync(join(root, "tsconfig.json")),
    readFileSync(join(root, "package-lock.json")),
  );
  const stamp = join(root, "dist", ".build-hash");
  return { stamp, key, fresh: existsSync(stamp) && readFileSync(stamp, "utf8") === key };
}

function ensureDist() {
  const { stamp, key, fresh } = distState();
  if (fresh) return;
  const t0 = Date.now();
  say("compiling TypeScript into dist/");
  rmSync(join(root, "dist", "src"), { recursive: true, force: true });
  rmSync(join(root, "dist", "bench"), { recursive: true, force: true });
  run(process.execPath, [join(root, "node_modules", "typescript", "bin", "tsc"), "-p", "tsconfig.json"]);
  writeFileSync(stamp, key);
  say(`TypeScript compiled in ${secs(t0)}`);
}

// ---- 4. native artifacts ------------------------------------------------------------------------

function dpkgVersion(pkg) {
  const r = spawnSync("dpkg-query", ["-W", "-f=${Version}", pkg], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.trim() : "unknown";
}

/**
 * Steps 1 and 2 of the artifacts' lookup order (src/engine/prebuilt.ts, shared with the engine
 * and doctor): an explicit path (SUPERMACHINE_KERNEL / SUPERMACHINE_INITRAMFS), then the prebuilt
 * platform package when its guest.json matches this version's inputs. Step 3 is the cache plans
 * below. Needs dist (always there in package mode; in the repository, once it is compiled).
 */
let found;
async function lookup() {
  if (found) return found;
  const mod = join(root, "dist", "src", "engine", "prebuilt.js");
  if (!existsSync(mod)) return { kernel: null, agent: null, prebuilt: null };
  const { guestLookup } = await import(pathToFileURL(mod).href);
  return (found = guestLookup(root, process.env));
}

/** A plan for an artifact found by the lookup: nothing to build. */
function foundPlan(name, hit, extra = {}) {
  return { name, source: hit.source, key: hit.key, dir: dirname(hit.path), path: hit.path, files: [basename(hit.path)], present: existsSync(hit.path), ...extra };
}

/**
 * Where each artifact lives, and whether it is there: found by the lookup, else in the cache
 * under a key of its inputs. Computing a plan reads and creates nothing in the cache directory
 * beyond stat calls.
 */
async function kernelPlan() {
  const hit = (await lookup()).kernel;
  if (hit) return foundPlan("kernel", hit);
  const tree = hashTree(join(root, "native", "kernel"));
  const linuxSource = dpkgVersion("linux-source-6.1");
  const key = sha256(tree, linuxSource).slice(0, 16);
  const dir = join(home, "kernel", key);
  return { name: "kernel", source: "cache", key, dir, path: join(dir, "vmlinux"), files: ["vmlinux"], present: existsSync(join(dir, "vmlinux")), inputs: { tree, linuxSource } };
}

async function agentPlan() {
  const hit = (await lookup()).agent;
  if (hit) {
    const pa = found.prebuilt?.agent;
    return foundPlan("agent", hit, hit.source === "prebuilt" ? { binary: pa.binary, version: pa.version } : {});
  }
  const a = join(root, "native", "agent");
  const rustc = spawnSync("rustc", ["--version"], { encoding: "utf8", env: buildEnv }).stdout?.trim() ?? "";
  const tree = hashTree(a, (p) => p.endsWith("/target"));
  const key = sha256(tree, rustc).slice(0, 16);
  const dir = join(home, "agent", key);
  const files = ["initramfs.cpio", "supermachine-agent"];
  return { name: "agent", source: "cache", key, dir, path: join(dir, "initramfs.cpio"), binary: join(dir, "supermachine-agent"), files, present: files.every((f) => existsSync(join(dir, f))), inputs: { tree, rustc } };
}

function busyboxPlan() {
  const key = sha256(readFileSync(join(root, "scripts", "build-busybox-image.mjs")), dpkgVersion("busybox-static"));
  const dir = join(home, "builtin", "busybox");
  const stamp = join(home, "builtin", ".busybox.key");
  const present = existsSync(join(dir, "index.json")) && existsSync(stamp) && readFileSync(stamp, "utf8") === key;
  return { name: "busybox", key, dir, stamp, present };
}

/** Prints "<what>: still building, 2.5 min so far (about 8.5 min in all)" every 30 s. */
function ticker(what, expectS) {
  const t0 = Date.now();
  const timer = setInterval(() => {
    const so = (Date.now() - t0) / 1000;
    say(`${what}: still building, ${duration(so)} so far (${so < expectS ? `about ${duration(expectS - so)} left` : `expected about ${duration(expectS)}`})`);
  }, 30_000);
  return () => clearInterval(timer);
}

/**
 * Build into `<home>/<kind>/<key>` unless it is already complete. The build writes into a
 * temporary sibling directory that is renamed into place only on success, so an interrupted
 * build never leaves a directory that a later run trusts. A lock directory keeps two setups
 * on one machine from building the same thing at once.
 */
async function ensureArtifact(plan, build, step) {
  const { name: kind, key, dir, files } = plan;
  if (files.every((f) => existsSync(join(dir, f)))) return dir;
  mkdirSync(join(home, kind), { recursive: true });
  // The store's own lock (dist is compiled by now): it records its owner, so a setup killed
  // mid-build is taken over at once, and a live one is waited for and named.
  const { acquireLock } = await import(pathToFileURL(join(root, "dist", "src", "store", "lock.js")).href);
  let told = false;
  const lock = await acquireLock(join(home, kind, `.${key}.lock`), {
    what: `the ${kind} build ${key}`,
    timeoutMs: 30 * 60_000,
    onWait: (w) => {
      if (told) return;
      told = true;
      say(`${kind}: waiting for another setup building it${w.holder ? ` (pid ${w.holder.pid} since ${w.holder.since})` : ""}`);
    },
  });
  const release = () => lock.release();
  try {
    if (files.every((f) => existsSync(join(dir, f)))) return dir;
    for (const name of readdirSync(join(home, kind))) {
      if (name.startsWith(`${key}.tmp-`)) rmSync(join(home, kind, name), { recursive: true, force: true });
    }
    const tmp = `${dir}.tmp-${process.pid}`;
    mkdirSync(tmp, { recursive: true });
    const t0 = Date.now();
    say(`${step}${kind}: building (about ${duration(ESTIMATE_S[kind])} on ${CORES} core${CORES === 1 ? "" : "s"})`);
    const stop = ticker(kind, ESTIMATE_S[kind]);
    try {
      await build(tmp);
    } catch (err) {
      rmSync(tmp, { recursive: true, force: true });
      throw err;
    } finally {
      stop();
    }
    for (const f of files) if (!existsSync(join(tmp, f))) fail(`${kind} build did not produce ${f}`, undefined, "SETUP_BUILD_FAILED");
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    say(`${kind}: built in ${secs(t0)} -> ${dir}`);
    return dir;
  } finally {
    await release();
  }
}

/** Runs a build script without blocking the event loop (the progress ticker runs meanwhile). */
function buildWith(script, extraEnv = () => ({})) {
  return (out) =>
    new Promise((resolve) => {
      const child = spawn("bash", [join(root, script), out], { stdio: ["ignore", "ignore", "inherit"], cwd: root, env: { ...buildEnv, ...extraEnv() } });
      child.on("error", (err) => fail(`${script} could not start: ${err.message}`, undefined, "SETUP_BUILD_FAILED"));
      child.on("exit", (code, signal) => {
        if (code !== 0) fail(`${script} failed (exit ${code ?? signal})`, `see the output above; logs are in ${out}`, "SETUP_BUILD_FAILED");
        resolve();
      });
    });
}

async function ensureKernel(plan, step) {
  if (plan.source !== "cache") {
    if (!plan.present) fail(`SUPERMACHINE_KERNEL names ${plan.path}, which does not exist`, "unset it to use the prebuilt package or the cache", "SETUP_KERNEL_MISSING");
    // An explicit path stays out of the manifest: the engine reads the variable itself.
    return plan.source === "env" ? {} : { kernel: plan.path, kernelKey: plan.key };
  }
  const dir = await ensureArtifact(plan, buildWith("native/kernel/build.sh"), step);
  return { kernel: join(dir, "vmlinux"), kernelKey: plan.key };
}

/** The protocol version the agent's sources define, and what a built binary reports. */
function agentProtocol(dir) {
  const proto = /pub const VERSION: u16 = (\d+);/.exec(readFileSync(join(root, "native", "agent", "src", "proto.rs"), "utf8"))?.[1];
  const reported = spawnSync(join(dir, "supermachine-agent"), ["--version"], { encoding: "utf8" }).stdout ?? "";
  return { proto, reported: reported.trim(), ok: !proto || reported.includes(`(protocol ${proto})`) };
}

function agentVersion() {
  const cargo = readFileSync(join(root, "native", "agent", "Cargo.toml"), "utf8");
  return /^version\s*=\s*"([^"]+)"/m.exec(cargo)?.[1] ?? "unknown";
}

async function ensureAgent(plan, step) {
  if (plan.source === "env") {
    if (!plan.present) fail(`SUPERMACHINE_INITRAMFS names ${plan.path}, which does not exist`, "unset it to use the prebuilt package or the cache", "SETUP_AGENT_MISSING");
    return {};
  }
  if (plan.source === "prebuilt") {
    const p = agentProtocol(plan.dir);
    if (!p.ok) fail(`the prebuilt agent ${plan.binary} reports "${p.reported}", but this version's sources define protocol ${p.proto}`, `reinstall the supermachine packages, or set SUPERMACHINE_NO_PREBUILT=1 and run ${SETUP_CMD} to build it`, "SETUP_AGENT_MISMATCH");
    return { initramfs: plan.path, agentBinary: plan.binary, agentKey: plan.key, agentVersion: plan.version };
  }
  // A cargo target directory of its own for each build: one shared between checkouts can hand
  // a binary of another checkout's sources to this key (cargo judged it fresh by mtimes).
  let target;
  const build = buildWith("native/agent/build.sh", () => ({ CARGO_TARGET_DIR: (target = mkdtempSync(join(tmpdir(), "supermachine-agent-target-"))) }));
  let dir;
  try {
    dir = await ensureArtifact(plan, build, step);
  } finally {
    if (target) rmSync(target, { recursive: true, force: true });
  }
  // The binary must be the one these sources make: it reports the protocol version they define.
  const p = agentProtocol(dir);
  if (!p.ok) {
    rmSync(dir, { recursive: true, force: true });
    fail(`the agent built for key ${plan.key} reports "${p.reported}", but its sources define protocol ${p.proto}`, `run ${SETUP_CMD} again (the cached build was removed)`, "SETUP_AGENT_MISMATCH");
  }
  return { initramfs: join(dir, "initramfs.cpio"), agentBinary: join(dir, "supermachine-agent"), agentKey: plan.key, agentVersion: agentVersion() };
}

function ensureBusybox(plan, step) {
  if (plan.present) return;
  const t0 = Date.now();
  say(`${step}builtin busybox image: building the OCI layout`);
  mkdirSync(dirname(plan.dir), { recursive: true });
  run(process.execPath, [join(root, "scripts", "build-busybox-image.mjs"), plan.dir]);
  writeFileSync(plan.stamp + ".tmp", plan.key);
  renameSync(plan.stamp + ".tmp", plan.stamp);
  say(`builtin busybox image built in ${secs(t0)}`);
}

/**
 * The install manifest's path, from the compiled runtime (one definition: installManifestPath in
 * src/engine/artifacts.ts). null when dist/ is not compiled yet (only `--check` in the repository
 * asks before that).
 */
async function manifestPath() {
  const mod = join(root, "dist", "src", "engine", "artifacts.js");
  if (!existsSync(mod)) return null;
  return (await import(pathToFileURL(mod).href)).installManifestPath(root, process.env);
}
const manifestText = (m) => JSON.stringify(m, null, 2) + "\n";

/** What the install manifest records for these plans (an explicit path is left out). */
function manifestFor(k, a) {
  return {
    ...(k.source === "env" ? {} : { kernel: k.path, kernelKey: k.key }),
    ...(a.source === "env" ? {} : { initramfs: a.path, agentBinary: a.binary, agentKey: a.key, agentVersion: a.version ?? agentVersion() }),
  };
}

/** Writes the manifest atomically (a temp file of this process, then rename) into the cache. */
async function writeManifest(m) {
  const path = await manifestPath();
  if (!path) fail(`${join(root, "dist")} is missing: cannot record the guest artifacts`, `run ${SETUP_CMD} again`, "SETUP_DIST_MISSING");
  const text = manifestText(m);
  // A manifest written into dist/ by an older setup is no longer read: drop it (in a checkout).
  if (!artifactsOnly) rmSync(join(root, "dist", "native.json"), { force: true });
  if (existsSync(path) && readFileSync(path, "utf8") === text) return;
  const tmp = `${path}.${process.pid}.tmp`;
  try {
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    writeFileSync(tmp, text, { mode: 0o600 });
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    fail(`cannot write ${path}: ${err.message}`, `check that ${home} is writable by this user, or set SUPERMACHINE_HOME to a directory that is`, "SETUP_MANIFEST_WRITE");
  }
}

// ---- 6. confinement ------------------------------------------------------------------------------

/**
 * As root, QEMU runs as an unprivileged system user of its own (src/engine/confine.ts): create
 * it when missing (idempotent). Then make the cache private (src/private.ts) and give the kernel
 * and the agent to QEMU's group, read-only.
 */
async function ensureConfinement(artifacts) {
  const priv = await import(join(root, "dist", "src", "private.js"));
  let user;
  if (process.getuid?.() === 0 && !priv.unsandboxed()) {
    const name = priv.qemuUserName();
    user = priv.lookupUser(name);
    if (!user) {
      run("useradd", ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment", "supermachine QEMU", name]);
      const r = spawnSync("getent", ["passwd", name], { encoding: "utf8" });
      const f = r.stdout.trim().split(":");
      if (r.status !== 0 || f.length < 4) fail(`useradd ${name} did not create the user`, undefined, "SETUP_QEMU_USER");
      user = { name, uid: Number(f[2]), gid: Number(f[3]) };
      say(`created the system user ${name} (uid ${user.uid}) that QEMU runs as`);
    }
  }
  const n = priv.tightenTree(home, user?.gid);
  if (n) note(`made ${n} entries of ${home} private`);
  if (user) {
    for (const f of artifacts) {
      const st = statSync(f);
      if (st.gid !== user.gid || (st.mode & 0o777) !== 0o640) {
        chownSync(f, -1, user.gid);
        chmodSync(f, 0o640);
      }
    }
  }
}

// ---- check --------------------------------------------------------------------------------------

/** The system user QEMU runs as, when this process is root (null: not needed). */
async function qemuUserState() {
  const priv = await import(join(root, "dist", "src", "private.js"));
  if (process.getuid?.() !== 0 || priv.unsandboxed()) return null;
  const name = priv.qemuUserName();
  return { name, user: priv.lookupUser(name) };
}

/**
 * `--check`: what is there and what is missing, without installing, building or creating
 * anything. Exit 0 when everything is there, 1 otherwise.
 */
async function checkAll() {
  const items = [];
  const add = (name, ok, detail, fix) => items.push({ name, ok, detail, ...(ok ? {} : { fix }) });
  const plans = [await kernelPlan(), await agentPlan(), busyboxPlan()];
  const need = plans.filter((p) => !p.present).map((p) => p.name);
  const pkgs = listMissingPackages(need);
  add(
    "packages",
    pkgs.length === 0,
    pkgs.length === 0 ? "installed" : `missing: ${pkgs.join(", ")}`,
    installLine(pkgs),
  );
  if (!artifactsOnly) {
    const nm = nodeModulesState();
    add("node_modules", nm.fresh, nm.fresh ? "matches package-lock.json" : "missing or stale", "npm run setup (runs npm ci)");
    const d = distState();
    add("dist", d.fresh, d.fresh ? "compiled from the current sources" : "missing or stale", "npm run setup (compiles TypeScript)");
  }
  const origin = (p) =>
    p.source === "env" ? `from ${p.name === "kernel" ? "SUPERMACHINE_KERNEL" : "SUPERMACHINE_INITRAMFS"}: ` : p.source === "prebuilt" ? `from ${found.prebuilt.package}@${found.prebuilt.version}: ` : "";
  for (const p of plans) {
    let ok = p.present;
    let detail = ok ? origin(p) + (p.name === "busybox" ? p.dir : p.path) : (p.source ?? "cache") === "cache" ? `not in the cache (${p.dir})` : `${origin(p)}${p.path} does not exist`;
    if (ok && p.name === "agent" && p.source !== "env") {
      const proto = agentProtocol(p.dir);
      if (!proto.ok) {
        ok = false;
        detail = `${p.dir} reports "${proto.reported}", its sources define protocol ${proto.proto}`;
      } else detail += ` (v${p.version ?? agentVersion()})`;
    }
    const fix = p.source === "cache" || p.name === "busybox" ? `${SETUP_CMD} (builds it: about ${duration(ESTIMATE_S[p.name])})` : p.source === "env" ? "point the variable at an existing file, or unset it" : "reinstall the supermachine packages";
    add(p.name, ok, detail, fix);
    const item = items[items.length - 1];
    if (p.name !== "busybox") {
      item.source = p.source;
      item.key = p.key;
      item.path = p.path;
      if (p.inputs) item.inputs = p.inputs;
      if (p.name === "agent") {
        item.binary = p.binary;
        item.version = p.version ?? agentVersion();
      }
    }
    if (p.name === "kernel" && p.source !== "prebuilt" && found?.prebuilt?.kernel?.reason) item.prebuilt = found.prebuilt.kernel.reason;
    if (p.name === "agent" && p.source !== "prebuilt" && found?.prebuilt?.agent?.reason) item.prebuilt = found.prebuilt.agent.reason;
  }
  const [k, a] = plans;
  if (k.present && a.present) {
    const want = manifestText(manifestFor(k, a));
    const path = await manifestPath();
    const ok = path !== null && existsSync(path) && readFileSync(path, "utf8") === want;
    const detail = ok ? path : path === null ? "written once dist/ is compiled" : `${path} ${existsSync(path) ? "points elsewhere" : "is missing"}`;
    add("manifest", ok, detail, `${SETUP_CMD} (writes it)`);
  } else {
    add("manifest", false, "written once the kernel and the agent are built", `${SETUP_CMD}`);
  }
  const qu = await qemuUserState();
  if (qu) add("qemu-user", qu.user !== null, qu.user ? `${qu.name} (uid ${qu.user.uid})` : `${qu.name} does not exist`, `${SETUP_CMD} (creates it), or: useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ${qu.name}`);
  else add("qemu-user", true, "not needed (QEMU runs as this user)");
  const missing = items.filter((i) => !i.ok).map((i) => i.name);
  let estimate = 0;
  if (pkgs.length) estimate += ESTIMATE_S.packages;
  for (const p of plans) if (!p.present) estimate += ESTIMATE_S[p.name];
  const report = { ok: missing.length === 0, mode: artifactsOnly ? "package" : "repository", home, root, items, missing, estimateSeconds: estimate, setupCommand: SETUP_CMD };
  if (json) {
    process.stdout.write(JSON.stringify(report, null, 2) + "\n");
  } else {
    const width = Math.max(...items.map((i) => i.name.length));
    const lines = items.map((i) => `${i.ok ? "ok     " : "MISSING"}  ${i.name.padEnd(width)}  ${i.detail}${i.ok ? "" : `\n${" ".repeat(width + 11)}fix: ${i.fix}`}`);
    lines.push(
      report.ok
        ? `all present (cache: ${home})`
        : `missing: ${missing.join(", ")}; ${SETUP_CMD} installs ${missing.length === 1 ? "it" : "them"}${estimate ? ` (about ${duration(estimate)})` : ""}`,
    );
    process.stdout.write(lines.join("\n") + "\n");
  }
  return report.ok ? 0 : 1;
}

// ---- main ----------------------------------------------------------------------------------------

if (process.platform !== "linux" || process.arch !== "x64") {
  fail(`supermachine runs on Linux x86_64; this is ${process.platform}/${process.arch}`, undefined, "SETUP_HOST_UNSUPPORTED");
}
if (artifactsOnly && !existsSync(join(root, "dist", "src", "store", "lock.js"))) {
  fail(`${join(root, "dist")} is missing or incomplete`, isRepo ? "run npm run setup (it compiles it)" : "reinstall the supermachine package", "SETUP_DIST_MISSING");
}
if (check) process.exit(await checkAll());

if (!artifactsOnly) {
  ensurePackages([]);
  ensureNodeModules();
  ensureDist();
} else {
  const need = [await kernelPlan(), await agentPlan(), busyboxPlan()].filter((p) => !p.present && p.source !== "env").map((p) => p.name);
  ensurePackages(need);
}
// Planned after the packages: the kernel's and the busybox image's keys include package versions.
const plans = { kernel: await kernelPlan(), agent: await agentPlan(), busybox: busyboxPlan() };
for (const p of [plans.kernel, plans.agent]) if (p.source === "prebuilt") note(`${p.name}: prebuilt, from ${found.prebuilt.package}@${found.prebuilt.version} (${p.path})`);
const todo = Object.values(plans).filter((p) => !p.present && (p.source ?? "cache") === "cache");
if (todo.length) {
  const total = todo.reduce((s, p) => s + ESTIMATE_S[p.name], 0);
  say(`to build: ${todo.map((p) => `${p.name} (about ${duration(ESTIMATE_S[p.name])})`).join(", ")}; about ${duration(total)} in all on ${CORES} core${CORES === 1 ? "" : "s"}`);
}
const step = (name) => (todo.length > 1 ? `[${todo.findIndex((p) => p.name === name) + 1}/${todo.length}] ` : "");
const kernel = await ensureKernel(plans.kernel, step("kernel"));
const agent = await ensureAgent(plans.agent, step("agent"));
ensureBusybox(plans.busybox, step("busybox"));
await writeManifest(manifestFor(plans.kernel, { ...plans.agent, version: agent.agentVersion ?? plans.agent.version }));
// Only the cache's files are given to QEMU's group here: the engine grants the others as it opens them.
await ensureConfinement([plans.kernel, plans.agent].filter((p) => p.source === "cache").map((p) => p.path));
note(`ready in ${secs(started)} (cache: ${home})`);
if (json) process.stdout.write(JSON.stringify({ ok: true, mode: artifactsOnly ? "package" : "repository", home, built: todo.map((p) => p.name), sources: { kernel: plans.kernel.source, agent: plans.agent.source }, ms: Date.now() - started }) + "\n");
