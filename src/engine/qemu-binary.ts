/**
 * Which QEMU runs VMs, and its identity for snapshot keys.
 */
import { spawnSync } from "node:child_process";
import { basename } from "node:path";

/**
 * Identity of the QEMU in use, for snapshot keys: a snapshot is restored only by the QEMU that
 * made it. It is what the binary says of itself (`QEMU emulator version 7.2.19 (Debian
 * 1:7.2+dfsg-7+deb12u16)`), so the same package on another machine has the same identity: keys
 * must not depend on paths or mtimes. Memoised per binary name.
 */
const qemuIds = new Map<string, string>();
export function qemuIdentity(): string {
  const name = qemuBinary();
  let id = qemuIds.get(name);
  if (id === undefined) {
    const r = spawnSync(name, ["--version"], { encoding: "utf8", timeout: 10_000 });
    const line = r.status === 0 ? r.stdout.split("\n")[0]?.trim() : undefined;
    id = line || `${basename(name)}:missing`;
    qemuIds.set(name, id);
  }
  return id;
}

/** The QEMU binary; `SUPERMACHINE_QEMU` overrides (read at every launch). */
export const qemuBinary = (): string => process.env.SUPERMACHINE_QEMU || "qemu-system-x86_64";
