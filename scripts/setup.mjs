#!/usr/bin/env node
// One idempotent setup step, run by `npm run demo`, `npm test` and `npm run bench`:
//   1. Debian packages the engine and the native builds need (apt-get, only what is missing)
//   2. `npm ci` when node_modules does not match package-lock.json
//   3. TypeScript build into dist/ when the sources changed
//   4. guest kernel, guest agent and the built-in busybox image, each built into the cache
//      directory ($SUPERMACHINE_HOME, default ~/.cache/supermachine) under a hash of its
//      inputs, so a second checkout or a CI run on the same machine reuses them
//   5. dist/native.json: where the runtime finds the kernel and the agent
//   6. confinement: as root, the unprivileged system user QEMU runs as (`supermachine`, no login
//      shell, no home) is created when missing, and the cache directory is made private (0700,
//      nothing readable by other users; the kernel and agent readable by QEMU's group)
// A second run with nothing changed does no work. Plain Node: it runs before node_modules.
//
// Flags: --quiet (print only when something is done), --skip-apt.

import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const args = new Set(process.argv.slice(2));
const quiet = args.has("--quiet");
const home =
  process.env.SUPERMACHINE_HOME || join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "supermachine");
const started = Date.now();
/** PATH with rustup's default location appended, for hosts where cargo is not on PATH. */
const buildEnv = { ...process.env, PATH: `${process.env.PATH ?? "/usr/bin:/bin"}:${join(homedir(), ".cargo", "bin")}` };

const say = (msg) => process.stderr.write(`[setup] ${msg}\n`);
const note = (msg) => quiet || say(msg);
const secs = (t0) => `${((Date.now() - t0) / 1000).toFixed(1)} s`;

function fail(msg, hint) {
  say(`error: ${msg}`);
  if (hint) say(`hint: ${hint}`);
  process.exit(1);
}

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
      if (skip(p)) continue;
      const st = statSync(p);
      if (st.isDirectory()) walk(p);
      else h.update(relative(dir, p)).update("\0").update(readFileSync(p)).update("\0");
    }
  };
  walk(dir);
  return h.digest("hex");
}

// ---- 1. Debian packages ----------------------------------------------------------------------

const PACKAGES = {
  "qemu-system-x86": "the hypervisor",
  "squashfs-tools": "sqfstar, to turn images into squashfs root filesystems",
  "busybox-static": "the built-in busybox image",
  "util-linux": "setpriv, which ties every QEMU process to its owner and drops its privileges",
  passwd: "useradd, for the unprivileged user QEMU runs as",
  "linux-source-6.1": "guest kernel sources",
  bc: "kernel build",
  bison: "kernel build",
  flex: "kernel build",
  "libelf-dev": "kernel build",
  make: "kernel build",
  gcc: "kernel build",
  "xz-utils": "unpacking the kernel sources",
  cpio: "packing the agent initramfs",
  file: "checking the agent binary is static",
  "librust-libc-dev": "the agent's only crate",
  zstd: "zstd-compressed image layers",
  "docker-registry": "tests: a real OCI distribution registry on loopback",
  skopeo: "tests: pushing fixture images, writing docker archives",
  mmdebstrap: "tests: building the Debian python fixture image",
  openssl: "tests: a self-signed CA for the TLS registry",
  "apache2-utils": "tests: htpasswd for the registry with basic auth",
};

function missingPackages() {
  const names = Object.keys(PACKAGES);
  const r = spawnSync("dpkg-query", ["-W", "-f=${Package} ${db:Status-Abbrev}\n", ...names], { encoding: "utf8" });
  if (r.error) fail("dpkg-query is not available: supermachine's setup expects a Debian-based Linux host");
  const installed = new Set(
    r.stdout
      .split("\n")
      .filter((l) => /\sii\s*$/.test(l))
      .map((l) => l.split(" ")[0]),
  );
  return names.filter((n) => !installed.has(n));
}

function ensurePackages() {
  if (args.has("--skip-apt")) return;
  const missing = missingPackages();
  if (spawnSync("cargo", ["--version"], { env: buildEnv }).status !== 0) missing.push("cargo");
  if (missing.length === 0) return;
  const t0 = Date.now();
  say(`installing Debian packages: ${missing.join(", ")}`);
  const sudo = process.getuid?.() === 0 ? [] : ["sudo", "-n"];
  const apt = (...a) => {
    const [cmd, ...rest] = [...sudo, "apt-get", ...a];
    const r = spawnSync(cmd, rest, {
      stdio: ["ignore", "ignore", "inherit"],
      env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
    });
    return r.status === 0;
  };
  if (!apt("update", "-q")) {
    fail("apt-get update failed", `install them yourself: apt-get install ${missing.join(" ")}`);
  }
  if (!apt("install", "-y", "-q", "--no-install-recommends", ...missing)) {
    fail(`apt-get install ${missing.join(" ")} failed`, "run it as root to see why");
  }
  say(`packages installed in ${secs(t0)}`);
}

// ---- 2. node_modules ---------------------------------------------------------------------------

function ensureNodeModules() {
  const lock = join(root, "package-lock.json");
  const stamp = join(root, "node_modules", ".supermachine-lock-hash");
  const want = sha256(readFileSync(lock));
  if (existsSync(stamp) && readFileSync(stamp, "utf8") === want) return;
  const t0 = Date.now();
  say("npm ci (node_modules is missing or stale)");
  run("npm", ["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
  writeFileSync(stamp, want);
  say(`npm ci done in ${secs(t0)}`);
}

// ---- 3. TypeScript ---------------------------------------------------------------------------

function ensureDist() {
  const key = sha256(
    hashTree(join(root, "src")),
    existsSync(join(root, "bench")) ? hashTree(join(root, "bench")) : "",
    readFileSync(join(root, "tsconfig.json")),
    readFileSync(join(root, "package-lock.json")),
  );
  const stamp = join(root, "dist", ".build-hash");
  if (existsSync(stamp) && readFileSync(stamp, "utf8") === key) return;
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
 * Build into `<home>/<kind>/<key>` unless it is already complete. The build writes into a
 * temporary sibling directory that is renamed into place only on success, so an interrupted
 * build never leaves a directory that a later run trusts. A lock directory keeps two setups
 * on one machine from building the same thing at once.
 */
async function ensureArtifact(kind, key, files, build, expect) {
  const dir = join(home, kind, key);
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
    say(`${kind}: building (${expect})`);
    try {
      build(tmp);
    } catch (err) {
      rmSync(tmp, { recursive: true, force: true });
      throw err;
    }
    for (const f of files) if (!existsSync(join(tmp, f))) fail(`${kind} build did not produce ${f}`);
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    say(`${kind}: built in ${secs(t0)} -> ${dir}`);
    return dir;
  } finally {
    await release();
  }
}

function buildWith(script, extraEnv = () => ({})) {
  return (out) => {
    const r = spawnSync("bash", [join(root, script), out], { stdio: ["ignore", "ignore", "inherit"], cwd: root, env: { ...buildEnv, ...extraEnv() } });
    if (r.status !== 0) fail(`${script} failed (exit ${r.status ?? r.signal})`, `see the output above; logs are in ${out}`);
  };
}

async function ensureKernel() {
  const k = join(root, "native", "kernel");
  const key = sha256(hashTree(k), dpkgVersion("linux-source-6.1")).slice(0, 16);
  const dir = await ensureArtifact("kernel", key, ["vmlinux"], buildWith("native/kernel/build.sh"), "about 5 minutes on 2 cores");
  return { kernel: join(dir, "vmlinux"), kernelKey: key };
}

async function ensureAgent() {
  const a = join(root, "native", "agent");
  const rustc = spawnSync("rustc", ["--version"], { encoding: "utf8", env: buildEnv }).stdout?.trim() ?? "";
  const key = sha256(hashTree(a, (p) => p.endsWith("/target")), rustc).slice(0, 16);
  // A cargo target directory of its own for each build: one shared between checkouts can hand
  // a binary of another checkout's sources to this key (cargo judged it fresh by mtimes).
  let target;
  const build = buildWith("native/agent/build.sh", () => ({ CARGO_TARGET_DIR: (target = mkdtempSync(join(tmpdir(), "supermachine-agent-target-"))) }));
  let dir;
  try {
    dir = await ensureArtifact("agent", key, ["initramfs.cpio", "supermachine-agent"], build, "under a minute");
  } finally {
    if (target) rmSync(target, { recursive: true, force: true });
  }
  // The binary must be the one these sources make: it reports the protocol version they define.
  const proto = /pub const VERSION: u16 = (\d+);/.exec(readFileSync(join(a, "src", "proto.rs"), "utf8"))?.[1];
  const reported = spawnSync(join(dir, "supermachine-agent"), ["--version"], { encoding: "utf8" }).stdout ?? "";
  if (proto && !reported.includes(`(protocol ${proto})`)) {
    rmSync(dir, { recursive: true, force: true });
    fail(`the agent built for key ${key} reports "${reported.trim()}", but its sources define protocol ${proto}`, "run npm run setup again (the cached build was removed)");
  }
  const cargo = readFileSync(join(a, "Cargo.toml"), "utf8");
  const agentVersion = /^version\s*=\s*"([^"]+)"/m.exec(cargo)?.[1] ?? "unknown";
  return { initramfs: join(dir, "initramfs.cpio"), agentBinary: join(dir, "supermachine-agent"), agentKey: key, agentVersion };
}

function ensureBusybox() {
  const script = join(root, "scripts", "build-busybox-image.mjs");
  const key = sha256(readFileSync(script), dpkgVersion("busybox-static"));
  const out = join(home, "builtin", "busybox");
  const stamp = join(home, "builtin", ".busybox.key");
  if (existsSync(join(out, "index.json")) && existsSync(stamp) && readFileSync(stamp, "utf8") === key) return;
  const t0 = Date.now();
  say("builtin busybox image: building the OCI layout");
  mkdirSync(dirname(out), { recursive: true });
  run(process.execPath, [script, out]);
  writeFileSync(stamp + ".tmp", key);
  renameSync(stamp + ".tmp", stamp);
  say(`builtin busybox image built in ${secs(t0)}`);
}

function writeManifest(m) {
  const path = join(root, "dist", "native.json");
  const text = JSON.stringify(m, null, 2) + "\n";
  if (existsSync(path) && readFileSync(path, "utf8") === text) return;
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path + ".tmp", text);
  renameSync(path + ".tmp", path);
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
      if (r.status !== 0 || f.length < 4) fail(`useradd ${name} did not create the user`);
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

// ---- main ----------------------------------------------------------------------------------------

if (process.platform !== "linux" || process.arch !== "x64") {
  fail(`supermachine runs on Linux x86_64; this is ${process.platform}/${process.arch}`);
}
ensurePackages();
ensureNodeModules();
ensureDist();
const kernel = await ensureKernel();
const agent = await ensureAgent();
ensureBusybox();
writeManifest({ ...kernel, ...agent });
await ensureConfinement([kernel.kernel, agent.initramfs]);
note(`ready in ${secs(started)} (cache: ${home})`);
