#!/usr/bin/env node
// Builds the built-in "busybox" OCI image layout offline from the host's static busybox
// (Debian busybox-static). Usage: node scripts/build-busybox-image.mjs OUT_DIR [BUSYBOX]
//
// The layout is deterministic for a given busybox binary (fixed mtimes, sorted entries, root
// ownership, gzip without timestamp), so its manifest digest, and with it the image cache
// entry, stays the same across setups. OUT_DIR is replaced atomically: the layout is written
// to a temp dir next to it and renamed into place.
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, openSync, fsyncSync, closeSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { gzipSync } from "node:zlib";
import tar from "tar-stream";

const MTIME = new Date(0);
const APPLET_DIRS = ["bin", "sbin", "usr/bin", "usr/sbin"];
const DIRS = [
  ["bin", 0o755], ["dev", 0o755], ["etc", 0o755], ["home", 0o755], ["proc", 0o555], ["root", 0o700],
  ["run", 0o755], ["sbin", 0o755], ["sys", 0o555], ["tmp", 0o1777], ["usr", 0o755], ["usr/bin", 0o755],
  ["usr/sbin", 0o755], ["var", 0o755], ["var/tmp", 0o1777],
];
const FILES = {
  "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
  "etc/group": "root:x:0:\nnobody:x:65534:\n",
  "etc/hostname": "supermachine\n",
};
const ARCH = { x64: "amd64", arm64: "arm64" }[process.arch] ?? process.arch;

function usage(msg) {
  if (msg) console.error(`build-busybox-image: ${msg}`);
  console.error("usage: node scripts/build-busybox-image.mjs OUT_DIR [BUSYBOX]  (BUSYBOX defaults to /bin/busybox)");
  process.exit(2);
}

/** Applet paths from `busybox --list-full`, limited to the usual bin/sbin dirs. */
function applets(busybox) {
  const out = execFileSync(busybox, ["--list-full"], { encoding: "utf8" });
  const paths = new Set();
  for (const line of out.split("\n")) {
    const p = line.trim();
    const dir = dirname(p);
    const name = basename(p);
    if (!p || !APPLET_DIRS.includes(dir) || name === "busybox" || name.includes("..")) continue;
    paths.add(p);
  }
  if (paths.size === 0) throw new Error(`${busybox} --list-full listed no applets`);
  return [...paths];
}

/** The single layer, as an uncompressed tar buffer. */
async function buildLayerTar(busybox) {
  const entries = [];
  for (const [path, mode] of DIRS) entries.push({ name: `${path}/`, type: "directory", mode });
  entries.push({ name: "bin/busybox", type: "file", mode: 0o755, data: readFileSync(busybox) });
  for (const [path, text] of Object.entries(FILES)) entries.push({ name: path, type: "file", mode: 0o644, data: Buffer.from(text) });
  for (const p of applets(busybox)) {
    const depth = p.split("/").length - 1;
    const linkname = dirname(p) === "bin" ? "busybox" : `${"../".repeat(depth)}bin/busybox`;
    entries.push({ name: p, type: "symlink", mode: 0o777, linkname });
  }
  // Sorted by path; a directory sorts before its contents ("bin/" < "bin/x").
  entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));

  const pack = tar.pack();
  const chunks = [];
  const done = new Promise((resolve, reject) => {
    pack.on("data", (c) => chunks.push(c));
    pack.on("end", resolve);
    pack.on("error", reject);
  });
  for (const e of entries) {
    const header = { name: e.name, type: e.type, mode: e.mode, mtime: MTIME, uid: 0, gid: 0, uname: "root", gname: "root" };
    if (e.linkname) header.linkname = e.linkname;
    await new Promise((res, rej) => pack.entry(header, e.data ?? Buffer.alloc(0), (err) => (err ? rej(err) : res())));
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

const sha256 = (buf) => `sha256:${createHash("sha256").update(buf).digest("hex")}`;

function writeSynced(path, data) {
  writeFileSync(path, data);
  const fd = openSync(path, "r");
  fsyncSync(fd);
  closeSync(fd);
}

function fsyncDir(path) {
  const fd = openSync(path, "r");
  fsyncSync(fd);
  closeSync(fd);
}

async function main() {
  const [outArg, busyboxArg] = process.argv.slice(2);
  if (!outArg || outArg.startsWith("-")) usage(outArg ? `unknown option ${outArg}` : "missing OUT_DIR");
  const out = resolve(outArg);
  const busybox = resolve(busyboxArg ?? "/bin/busybox");
  if (!existsSync(busybox)) usage(`${busybox} not found (Debian/Ubuntu: apt-get install busybox-static)`);

  const layerTar = await buildLayerTar(busybox);
  const layer = gzipSync(layerTar, { level: 9 });
  const config = Buffer.from(JSON.stringify({
    created: MTIME.toISOString(),
    architecture: ARCH,
    os: "linux",
    config: {
      Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
      Cmd: ["sh"],
      WorkingDir: "/",
    },
    rootfs: { type: "layers", diff_ids: [sha256(layerTar)] },
    history: [{ created: MTIME.toISOString(), created_by: "supermachine build-busybox-image.mjs" }],
  }));
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: sha256(config), size: config.length },
    layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: sha256(layer), size: layer.length }],
  }));
  const index = JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [{
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      digest: sha256(manifest),
      size: manifest.length,
      platform: { architecture: ARCH, os: "linux" },
      annotations: { "org.opencontainers.image.ref.name": "latest" },
    }],
  });

  const parent = dirname(out);
  mkdirSync(parent, { recursive: true });
  // Leftovers of interrupted runs.
  for (const name of readdirSync(parent)) {
    if (name.startsWith(`${basename(out)}.tmp-`) || name.startsWith(`${basename(out)}.old-`)) rmSync(join(parent, name), { recursive: true, force: true });
  }
  const tmp = `${out}.tmp-${randomBytes(6).toString("hex")}`;
  try {
    const blobs = join(tmp, "blobs", "sha256");
    mkdirSync(blobs, { recursive: true });
    for (const blob of [layer, config, manifest]) writeSynced(join(blobs, sha256(blob).slice(7)), blob);
    writeSynced(join(tmp, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
    writeSynced(join(tmp, "index.json"), index);
    fsyncDir(blobs);
    fsyncDir(tmp);
    if (existsSync(out)) {
      const old = `${out}.old-${randomBytes(6).toString("hex")}`;
      renameSync(out, old);
      renameSync(tmp, out);
      rmSync(old, { recursive: true, force: true });
    } else {
      renameSync(tmp, out);
    }
    fsyncDir(parent);
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  console.log(`busybox image: ${out} (manifest ${sha256(manifest)})`);
}

main().catch((err) => {
  console.error(`build-busybox-image: ${err instanceof Error ? err.message : err}`);
  process.exit(1);
});
