#!/usr/bin/env node
// `npm run pack:all`: the two tarballs a release publishes, written into out/packages/:
//   - supermachine-guest-linux-x64-<version>.tgz: the guest kernel, the agent initramfs and the
//     agent binary from the cache (setup builds them first when missing), with guest.json
//     recording their keys and input hashes (src/engine/prebuilt.ts matches on those);
//   - supermachine-<version>.tgz: the main package, whose package.json lists the guest package in
//     optionalDependencies at the same version. The repository's own package.json does not (the
//     guest package is not on the registry until a release publishes it, and npm ci would fail),
//     so the dependency is added to the packed copy.
// Publish the guest package first: `npm publish out/packages/supermachine-guest-linux-x64-*.tgz`,
// then `npm publish out/packages/supermachine-<version>.tgz`.
//
// Flags: --json (one JSON object on stdout naming both tarballs; progress on stderr).
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const json = process.argv.includes("--json");
const say = (m) => process.stderr.write(`[pack] ${m}\n`);
const fail = (m) => {
  say(`error: ${m}`);
  process.exit(1);
};
// The cache's own artifacts: neither an explicit path nor an installed guest package.
const env = { ...process.env, SUPERMACHINE_NO_PREBUILT: "1" };
delete env.SUPERMACHINE_KERNEL;
delete env.SUPERMACHINE_INITRAMFS;

function run(cmd, argv, opts = {}) {
  const r = spawnSync(cmd, argv, { encoding: "utf8", cwd: root, env, stdio: ["ignore", "pipe", "inherit"], ...opts });
  if (r.error) fail(`${cmd} could not start: ${r.error.message}`);
  if (r.status !== 0 && !opts.allowFail) fail(`${cmd} ${argv.join(" ")} exited with ${r.status ?? r.signal}`);
  return r.stdout;
}
const npmPack = (cwd, dest) => {
  const out = JSON.parse(run("npm", ["pack", "--json", "--loglevel=error", "--pack-destination", dest], { cwd }));
  return { file: join(dest, out[0].filename), files: out[0].files.map((f) => f.path) };
};

const main = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const guestTemplate = JSON.parse(readFileSync(join(root, "packages", "guest-linux-x64", "package.json"), "utf8"));
if (process.platform !== "linux" || process.arch !== "x64") fail(`the guest package is built for linux/x64; this is ${process.platform}/${process.arch}`);

// 1. dist (with the web page, dist/web/) and the artifacts (builds only what is missing; nothing
//    when all is there).
say("setup: dist, kernel, agent (only what is missing)");
run(process.execPath, [join(root, "scripts", "setup.mjs"), "--quiet"], { stdio: ["ignore", 2, "inherit"] });
const report = JSON.parse(run(process.execPath, [join(root, "scripts", "setup.mjs"), "--check", "--json"], { allowFail: true }));
const item = (name) => {
  const i = report.items.find((x) => x.name === name);
  if (!i?.ok || i.source !== "cache" || !i.inputs) fail(`setup did not leave the ${name} in the cache: ${i?.detail ?? "not reported"}`);
  return i;
};
const kernel = item("kernel");
const agent = item("agent");
const protocol = Number(/pub const VERSION: u16 = (\d+);/.exec(readFileSync(join(root, "native", "agent", "src", "proto.rs"), "utf8"))?.[1]);

const outDir = join(root, "out", "packages");
const stage = join(root, "out", "stage");
rmSync(stage, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });
try {
  // 2. The guest package.
  const g = join(stage, "guest");
  mkdirSync(g, { recursive: true });
  writeFileSync(join(g, "package.json"), JSON.stringify({ ...guestTemplate, version: main.version }, null, 2) + "\n");
  copyFileSync(join(root, "packages", "guest-linux-x64", "README.md"), join(g, "README.md"));
  for (const [from, to, mode] of [
    [kernel.path, "vmlinux", 0o644],
    [agent.path, "initramfs.cpio", 0o644],
    [agent.binary, "supermachine-agent", 0o755],
  ]) {
    copyFileSync(from, join(g, to));
    chmodSync(join(g, to), mode);
  }
  const guest = {
    name: guestTemplate.name,
    version: main.version,
    kernel: { key: kernel.key, tree: kernel.inputs.tree, linuxSource: kernel.inputs.linuxSource, file: "vmlinux" },
    agent: { key: agent.key, tree: agent.inputs.tree, rustc: agent.inputs.rustc, version: agent.version, protocol, initramfs: "initramfs.cpio", binary: "supermachine-agent" },
  };
  writeFileSync(join(g, "guest.json"), JSON.stringify(guest, null, 2) + "\n");
  const guestTgz = npmPack(g, outDir);
  say(`${guestTgz.file} (kernel ${kernel.key}, agent ${agent.key})`);

  // 3. The main package, with the optional dependency added to the packed copy.
  const m = join(stage, "main");
  mkdirSync(m, { recursive: true });
  const first = npmPack(root, m);
  if (first.files.includes("dist/native.json")) fail("dist/native.json (machine-local) would be shipped: check package.json's files");
  // The web page of `supermachine serve`, which setup builds into dist/web/.
  for (const f of ["index.html", "app.js", "app.css"]) if (!first.files.includes(`dist/web/${f}`)) fail(`dist/web/${f} would not be shipped: run node scripts/build-web.mjs`);
  run("tar", ["-xzf", first.file, "-C", m]);
  const pj = join(m, "package", "package.json");
  const packed = JSON.parse(readFileSync(pj, "utf8"));
  packed.optionalDependencies = { ...packed.optionalDependencies, [guestTemplate.name]: main.version };
  writeFileSync(pj, JSON.stringify(packed, null, 2) + "\n");
  const mainTgz = npmPack(join(m, "package"), outDir);
  say(`${mainTgz.file} (optionalDependencies: ${guestTemplate.name}@${main.version})`);
  if (json) process.stdout.write(JSON.stringify({ main: mainTgz.file, guest: guestTgz.file, version: main.version, kernelKey: kernel.key, agentKey: agent.key }) + "\n");
} finally {
  rmSync(stage, { recursive: true, force: true });
}
