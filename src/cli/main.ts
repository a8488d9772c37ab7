#!/usr/bin/env node
/**
 * The `supermachine` command. The only place in the package that calls process.exit.
 */
import { spawnSync } from "node:child_process";
import { parseArgs } from "node:util";
import { Image } from "../runtime/image.js";
import { SupermachineError } from "../errors.js";
import { chooseAccel } from "../engine/accel.js";
import { nativeArtifacts } from "../engine/artifacts.js";
import { qemuBinary } from "../engine/qemu.js";
import { supermachineHome } from "../paths.js";

const USAGE = `usage: supermachine <command> [options]

commands:
  run <ref> [--] <argv...>   boot <ref> in a microVM, run argv, print its output, exit with its code
      --memory <MiB>            guest memory (default 256)
      --vcpus <n>               vCPUs (default 1)
      --timeout <ms>            kill the command after this long (default 60000)
      -e, --env KEY=VALUE       extra environment (repeatable)
      -w, --workdir <dir>       working directory in the guest
  info                       accelerator choice, kernel/agent artifacts, cache directory
  help                       this text

global options:
  --json                     machine-readable output on stdout

references: builtin:busybox, oci:<dir>[:<tag>]
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
  v: { json?: boolean; memory?: string; vcpus?: string; timeout?: string; env?: string[]; workdir?: string },
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
  const image = await Image.build({ ref, memoryMib: int("memory", v.memory), vcpus: int("vcpus", v.vcpus) });
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
