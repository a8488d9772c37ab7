/**
 * `supermachine doctor [--json]`: one pass/warn/fail line per check of the host, with a fix for
 * each that is not a pass (the checks live in src/doctor/). Exit 0 when nothing fails.
 */
import type { Command } from "commander";
import { runDoctor, type Check } from "../doctor/index.js";
import { action, isJson, writeJson } from "./common.js";

export function registerDoctorCommand(program: Command): void {
  program
    .command("doctor")
    .helpGroup("Host:")
    .description("check Node, QEMU, the accelerator, /dev/kvm access, guest artifacts, the cache and QEMU's sandbox; a fix for each problem")
    .action(action((_o: unknown, cmd: Command) => doctor(isJson(cmd))));
}

async function doctor(json: boolean): Promise<number> {
  const report = await runDoctor();
  if (json) {
    writeJson(report, true);
  } else {
    const width = Math.max(...report.checks.map((c) => c.id.length));
    const lines = report.checks.flatMap((c: Check) => [
      `${c.status.padEnd(4)}  ${c.id.padEnd(width)}  ${c.summary}`,
      ...(c.detail && c.status !== "pass" ? [`${" ".repeat(width + 8)}${c.detail}`] : []),
      ...(c.fix ? [`${" ".repeat(width + 8)}fix: ${c.fix}`] : []),
    ]);
    const warns = report.checks.filter((c) => c.status === "warn").length;
    const fails = report.checks.filter((c) => c.status === "fail").length;
    lines.push(report.ok ? `ok: nothing fails${warns ? ` (${warns} warning${warns > 1 ? "s" : ""})` : ""}` : `${fails} check${fails > 1 ? "s" : ""} failed`);
    process.stdout.write(lines.join("\n") + "\n");
  }
  return report.ok ? 0 : 1;
}
