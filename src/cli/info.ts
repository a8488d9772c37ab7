/** `supermachine info`: the accelerator choice, the native artifacts and the cache directory. */
import { spawnSync } from "node:child_process";
import type { Command } from "commander";
import { SupermachineError } from "../errors.js";
import { engineFingerprint } from "../engine/fingerprint.js";
import { chooseAccel } from "../engine/accel.js";
import { nativeArtifacts } from "../engine/artifacts.js";
import { qemuBinary } from "../engine/qemu.js";
import { supermachineHome } from "../paths.js";
import { action, isJson, writeJson } from "./common.js";

export function registerInfoCommand(program: Command): void {
  program
    .command("info")
    .helpGroup("Host:")
    .description("accelerator choice, kernel/agent artifacts, cache directory")
    .action(action((_o: unknown, cmd: Command) => info(isJson(cmd))));
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
    writeJson(report, true);
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
