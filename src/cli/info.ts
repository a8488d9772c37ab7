/**
 * `supermachine info`: the accelerator choice, the native artifacts, the cache directory, and how
 * QEMU is confined (its sandbox, the user it runs as, SUPERMACHINE_UNSANDBOXED).
 */
import { spawnSync } from "node:child_process";
import type { Command } from "commander";
import { SupermachineError } from "../errors.js";
import { engineFingerprint } from "../engine/fingerprint.js";
import { chooseAccel } from "../engine/accel.js";
import { nativeArtifacts } from "../engine/artifacts.js";
import { confinementReport } from "../engine/confine.js";
import { qemuBinary } from "../engine/qemu-binary.js";
import { supermachineHome } from "../paths.js";
import { action, isJson, writeJson } from "./common.js";

export function registerInfoCommand(program: Command): void {
  program
    .command("info")
    .helpGroup("Host:")
    .description("accelerator choice, kernel/agent artifacts, cache directory, QEMU's sandbox and user")
    .action(action((_o: unknown, cmd: Command) => info(isJson(cmd))));
}

async function info(json: boolean): Promise<number> {
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
    /** How QEMU is confined: its seccomp sandbox and the user it runs as. */
    confinement: await confinementReport(qemuBinary()),
    artifacts,
    /** What snapshot keys record of the engine. */
    fingerprint: "error" in artifacts ? null : fingerprintOrError(),
  };
  if (json) {
    writeJson(report, true);
  } else {
    process.stdout.write(
      [
        `accelerator: ${report.accel} (${report.accelReason})`,
        `qemu:        ${report.qemu}`,
        `cache:       ${report.home}`,
        `sandbox:     ${describeSandbox(report.confinement)}`,
        `qemu user:   ${report.confinement.qemuUser.name}${report.confinement.qemuUser.uid !== null ? ` (uid ${report.confinement.qemuUser.uid})` : ""}${report.confinement.qemuUser.dropped ? ", unprivileged" : ""}`,
        ...(report.confinement.error ? [`error:       VMs cannot start: ${report.confinement.error}`] : []),
        ...(report.fingerprint && "cpu" in report.fingerprint
          ? [`identity:    machine ${report.fingerprint.machine}, -cpu ${report.fingerprint.cpu}${report.fingerprint.cpuFlags ? `, this CPU's ${report.fingerprint.cpuFlags.length} flags` : ""} (snapshots restore on hosts alike: supermachine doctor)`]
          : report.fingerprint ? [`identity:    ${report.fingerprint.error}`] : []),
        ...("error" in artifacts
          ? [`artifacts:   ${artifacts.error}`]
          : [`kernel:      ${artifacts.kernel}`, `agent:       ${artifacts.initramfs} (v${artifacts.agentVersion})`]),
      ].join("\n") + "\n",
    );
  }
  return "error" in artifacts || report.confinement.error ? 1 : 0;
}

/** The engine fingerprint, or why it cannot be made (SUPERMACHINE_CPU or SUPERMACHINE_ACCEL not usable). */
function fingerprintOrError(): ReturnType<typeof engineFingerprint> | { error: string } {
  try {
    return engineFingerprint();
  } catch (e) {
    return { error: e instanceof SupermachineError ? e.describe() : String(e) };
  }
}

function describeSandbox(c: Awaited<ReturnType<typeof confinementReport>>): string {
  if (c.sandbox === "off") return "off (SUPERMACHINE_UNSANDBOXED=1)";
  if (c.sandbox === "unavailable") return `unavailable: ${c.sandboxReason} (set SUPERMACHINE_UNSANDBOXED=1 to run without it)`;
  return `on (seccomp: ${c.sandboxOptions})${c.sandboxReason ? `, ${c.sandboxReason}` : ""}`;
}
