#!/usr/bin/env node
/**
 * The `supermachine` command. The only place in the package that calls process.exit.
 */
import { spawnSync } from "node:child_process";
import { parseArgs } from "node:util";
import { Image } from "../runtime/image.js";
import { SupermachineError } from "../errors.js";
import { engineFingerprint } from "../engine/fingerprint.js";
import { chooseAccel } from "../engine/accel.js";
import { nativeArtifacts } from "../engine/artifacts.js";
import { qemuBinary } from "../engine/qemu.js";
import { supermachineHome } from "../paths.js";
import { collectGarbage, listImages, removeImage } from "../image/gc.js";
import type { BuildProgress } from "../spec/image.js";

const USAGE = `usage: supermachine <command> [options]

commands:
  run <ref> [--] <argv...>   boot <ref> in a microVM, run argv, print its output, exit with its code
      --memory <MiB>            guest memory (default 256)
      --vcpus <n>               vCPUs (default 1)
      --timeout <ms>            kill the command after this long (default 60000)
      -e, --env KEY=VALUE       extra environment (repeatable)
      -w, --workdir <dir>       working directory in the guest
      --pull-policy <p>         always | missing (default) | never
  pull <ref>                 fetch an image (always asks the registry) and build its root filesystem
      --platform <os/arch>      platform to pick from a multi-platform image
      --insecure-registry <h>   reach registry host[:port] over plain HTTP (repeatable)
  images                     list pulled and imported images with their sizes
  rmi <ref>                  forget an image and remove what only it used
  gc                         remove blobs and root filesystems no image uses (older than an hour)
  info                       accelerator choice, kernel/agent artifacts, cache directory
  help                       this text

global options:
  --json                     machine-readable output on stdout

references: alpine:3.20, ghcr.io/owner/image@sha256:..., oci:<dir>[:<tag>],
            docker-archive:<file.tar>[:<name:tag>], builtin:busybox
environment: SUPERMACHINE_HOME (cache dir), SUPERMACHINE_ACCEL=kvm|tcg, DEBUG=supermachine:*`;

class UsageError extends Error {}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      json: { type: "boolean" },
      memory: { type: "string" },
      vcpus: { type: "string" },
      timeout: { type: "string" },
      env: { type: "string", short: "e", multiple: true },
      workdir: { type: "string", short: "w" },
      help: { type: "boolean", short: "h" },
      platform: { type: "string" },
      "insecure-registry": { type: "string", multiple: true },
      "pull-policy": { type: "string" },
    },
  });
  const [command, ...rest] = positionals;
  if (values.help || !command || command === "help") {
    process.stdout.write(USAGE + "\n");
    return command || values.help ? 0 : 2;
  }
  switch (command) {
    case "run":
      return run(rest, values);
    case "info":
      return info(values.json ?? false);
    case "pull":
      return pull(rest, values);
    case "images":
      return images(values.json ?? false);
    case "rmi":
      return rmi(rest, values.json ?? false);
    case "gc":
      return gc(values.json ?? false);
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}`);
  }
}

function int(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n)) throw new UsageError(`--${name} expects an integer, got ${JSON.stringify(v)}`);
  return n;
}

async function run(
  rest: string[],
  v: {
    json?: boolean;
    memory?: string;
    vcpus?: string;
    timeout?: string;
    env?: string[];
    workdir?: string;
    platform?: string;
    "insecure-registry"?: string[];
    "pull-policy"?: string;
  },
): Promise<number> {
  const [ref, ...cmd] = rest;
  if (!ref || cmd.length === 0) throw new UsageError("run needs an image reference and a command, e.g. supermachine run builtin:busybox -- echo hi");
  const env: Record<string, string> = {};
  for (const kv of v.env ?? []) {
    const i = kv.indexOf("=");
    if (i <= 0) throw new UsageError(`--env expects KEY=VALUE, got ${JSON.stringify(kv)}`);
    env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  const t0 = performance.now();
  const image = await Image.build({
    ref,
    memoryMib: int("memory", v.memory),
    vcpus: int("vcpus", v.vcpus),
    ...(v["pull-policy"] ? { pullPolicy: v["pull-policy"] as "always" | "missing" | "never" } : {}),
    ...(v.platform ? { platform: v.platform } : {}),
    ...(v["insecure-registry"] ? { insecureRegistries: v["insecure-registry"] } : {}),
    onProgress: progressPrinter(v.json ?? false),
  });
  const pool = await image.pool({ min: 1, max: 1 });
  try {
    const vm = await pool.acquire();
    const bootMs = performance.now() - t0;
    const out = await vm.exec({ argv: cmd, env, cwd: v.workdir, timeoutMs: int("timeout", v.timeout) });
    if (v.json) {
      process.stdout.write(
        JSON.stringify({
          exitCode: out.exitCode,
          stdout: out.stdout.toString("utf8"),
          stderr: out.stderr.toString("utf8"),
          accel: vm.accel,
          imageDigest: image.digest,
          readyMs: Math.round(bootMs),
        }) + "\n",
      );
    } else {
      process.stdout.write(out.stdout);
      process.stderr.write(out.stderr);
    }
    await vm.release();
    return out.exitCode < 0 ? 137 : out.exitCode;
  } finally {
    await pool.shutdown();
  }
}

/** Human progress on stderr: one line per layer when it completes, and a summary. */
function progressPrinter(json: boolean): (p: BuildProgress) => void {
  if (json) return () => {};
  const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;
  const reported = new Set<string>();
  let last = 0;
  return (p) => {
    if (p.phase === "pull") {
      const e = p.event;
      if (e.type === "layer") {
        const short = e.digest.slice(7, 19);
        const done = e.cached || (e.total !== undefined && e.bytes >= e.total);
        if (done && !reported.has(e.digest)) {
          reported.add(e.digest);
          process.stderr.write(`layer ${e.index + 1}/${e.count} ${short}: ${e.cached ? "already present" : mb(e.bytes)}\n`);
        } else if (!done && performance.now() - last > 1_000) {
          last = performance.now();
          process.stderr.write(`layer ${e.index + 1}/${e.count} ${short}: ${mb(e.bytes)}${e.total ? ` of ${mb(e.total)}` : ""}\n`);
        }
      } else if (e.type === "manifest") {
        process.stderr.write(`resolving ${e.ref}\n`);
      }
    } else if (p.phase === "import") {
      process.stderr.write(`importing ${p.file}\n`);
    } else if (p.phase === "squashfs") {
      process.stderr.write("building the root filesystem\n");
    } else if (p.phase === "done") {
      process.stderr.write(`root filesystem ready: ${mb(p.sizeBytes)} in ${(p.durationMs / 1000).toFixed(1)} s\n`);
    } else if (p.phase === "bake") {
      if (p.step === "boot") process.stderr.write("baking: booting the image\n");
      else if (p.step === "warmup") process.stderr.write("baking: running the warmup\n");
      else if (p.step === "extra-files") process.stderr.write("baking: staging extraFiles\n");
      else if (p.step === "listener") process.stderr.write("baking: waiting for the workload to listen\n");
    } else if (p.phase === "bake-waiting-for-lock") {
      process.stderr.write("waiting for another process baking the same snapshot\n");
    } else if (p.phase === "bake-done") {
      process.stderr.write(`snapshot baked in ${(p.durationMs / 1000).toFixed(1)} s\n`);
    }
  };
}

async function pull(rest: string[], v: { json?: boolean; platform?: string; "insecure-registry"?: string[]; "pull-policy"?: string }): Promise<number> {
  const [ref] = rest;
  if (!ref || rest.length > 1) throw new UsageError("pull takes exactly one image reference");
  const image = await Image.build({
    ref,
    pullPolicy: (v["pull-policy"] as "always" | "missing" | "never" | undefined) ?? "always",
    ...(v.platform ? { platform: v.platform } : {}),
    ...(v["insecure-registry"] ? { insecureRegistries: v["insecure-registry"] } : {}),
    onProgress: progressPrinter(v.json ?? false),
  });
  if (v.json) process.stdout.write(JSON.stringify({ ref, digest: image.digest, rootfs: image.rootfsPath, config: image.config }) + "\n");
  else process.stdout.write(`${ref}: ${image.digest}\n`);
  return 0;
}

async function images(json: boolean): Promise<number> {
  const list = await listImages();
  if (json) {
    process.stdout.write(JSON.stringify(list, null, 2) + "\n");
    return 0;
  }
  const mb = (n: number | undefined) => (n === undefined ? "-" : `${(n / 1e6).toFixed(1)} MB`);
  const rows = [["REFERENCE", "DIGEST", "BLOBS", "ROOTFS", "PULLED"], ...list.map((i) => [i.ref, i.manifestDigest.slice(7, 19), mb(i.blobBytes), mb(i.rootfsBytes), i.pulledAt])];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  for (const r of rows) process.stdout.write(r.map((cell, c) => cell.padEnd(widths[c]!)).join("  ").trimEnd() + "\n");
  return 0;
}

async function rmi(rest: string[], json: boolean): Promise<number> {
  if (rest.length === 0) throw new UsageError("rmi takes one or more image references");
  let missing = 0;
  for (const ref of rest) {
    const r = await removeImage(ref);
    if (json) process.stdout.write(JSON.stringify({ ref, ...r }) + "\n");
    else if (r.removed.length === 0) process.stderr.write(`supermachine: no local image named ${ref}\n`);
    else process.stdout.write(`removed ${r.removed.join(", ")} (${(r.bytesFreed / 1e6).toFixed(1)} MB freed)\n`);
    if (r.removed.length === 0) missing++;
  }
  return missing ? 1 : 0;
}

async function gc(json: boolean): Promise<number> {
  const r = await collectGarbage();
  if (json) process.stdout.write(JSON.stringify(r) + "\n");
  else process.stdout.write(`removed ${r.blobsRemoved} blobs and ${r.imagesRemoved} root filesystems, ${(r.bytesFreed / 1e6).toFixed(1)} MB freed\n`);
  return 0;
}

function info(json: boolean): number {
  const accel = chooseAccel();
  let artifacts: ReturnType<typeof nativeArtifacts> | { error: string };
  try {
    artifacts = nativeArtifacts();
  } catch (e) {
    artifacts = { error: e instanceof SupermachineError ? e.describe() : String(e) };
  }
  const qemu = spawnSync(qemuBinary(), ["--version"], { encoding: "utf8" });
  const report = {
    accel: accel.accel,
    accelReason: accel.reason,
    qemu: qemu.status === 0 ? qemu.stdout.split("\n")[0] : `not found (${qemuBinary()})`,
    home: supermachineHome(),
    artifacts,
    /** What snapshot keys record of the engine. */
    fingerprint: "error" in artifacts ? null : engineFingerprint(),
  };
  if (json) {
    process.stdout.write(JSON.stringify(report, null, 2) + "\n");
  } else {
    process.stdout.write(
      [
        `accelerator: ${report.accel} (${report.accelReason})`,
        `qemu:        ${report.qemu}`,
        `cache:       ${report.home}`,
        ...("error" in artifacts
          ? [`artifacts:   ${artifacts.error}`]
          : [`kernel:      ${artifacts.kernel}`, `agent:       ${artifacts.initramfs} (v${artifacts.agentVersion})`]),
      ].join("\n") + "\n",
    );
  }
  return "error" in artifacts ? 1 : 0;
}

const wantsJson = process.argv.includes("--json");
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith?.("ERR_PARSE_ARGS")) {
      process.stderr.write(`supermachine: ${(err as Error).message}\n\n${USAGE}\n`);
      process.exit(2);
    }
    if (wantsJson) {
      const e = err as SupermachineError;
      process.stdout.write(JSON.stringify({ error: { code: e.code ?? "INTERNAL", message: e.message, hint: e.hint } }) + "\n");
    } else {
      process.stderr.write(`supermachine: ${err instanceof SupermachineError ? err.describe() : (err as Error).stack ?? String(err)}\n`);
    }
    process.exit(1);
  },
);
