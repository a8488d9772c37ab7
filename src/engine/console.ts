/**
 * What a failed VM leaves for diagnosis: the tail of QEMU's stderr and the guest console log,
 * kept under `<home>/logs` only when the VM failed (src/failure-logs.ts), and a hint from
 * what QEMU printed.
 */

/** How much of QEMU's stderr is kept for an error message. */
export const STDERR_TAIL = 8 * 1024;

/** QEMU's last stderr lines, and the kept console log when there is one (never a path that does not exist). */
export function describeFailure(stderr: string, keptLog: string | undefined): string {
  const tail = stderr.trim().split("\n").slice(-10).join("\n");
  return (tail ? `\nQEMU stderr:\n${tail}` : "") + (keptLog ? `\nguest console log: ${keptLog}` : "");
}

export function failureHint(stderr: string): string | undefined {
  if (/failed to execute/.test(stderr)) return "install QEMU (Debian package qemu-system-x86, or run npx supermachine setup) or point SUPERMACHINE_QEMU at it";
  if (/memory|ram size|cannot set up guest memory/i.test(stderr)) return "lower memoryMib or free host memory";
  if (/kvm/i.test(stderr)) return "set SUPERMACHINE_ACCEL=tcg to use software emulation";
  return undefined;
}
