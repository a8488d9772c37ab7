/** The image workload at bake time and in new VMs; and waiting for it to listen. */
import { ImageError } from "../errors.js";
import type { MicroVm } from "../engine/qemu.js";
import { resolveImageUser } from "../session/env.js";
import type { WorkloadSpec } from "../store/snapshots.js";

/** Starts the workload in `vm` (the user is resolved against the guest's own files). */
export async function startWorkload(vm: MicroVm, w: WorkloadSpec): Promise<number> {
  const ids = w.user ? await resolveImageUser(vm.agent, w.user) : undefined;
  return vm.agent.startWorkload({ argv: w.argv, env: w.env, cwd: w.cwd, ...ids });
}

/** Polls the guest's TCP tables until something listens on `port` (listener readiness). */
export async function waitListening(vm: MicroVm, port: number, timeoutMs: number, ref: string, signal?: AbortSignal): Promise<void> {
  const hex = `:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  const end = performance.now() + timeoutMs;
  for (;;) {
    signal?.throwIfAborted();
    for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
      const text = (await vm.agent.readFile(table, 1 << 20).catch(() => Buffer.alloc(0))).toString();
      // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
      if (text.split("\n").some((l) => l.trim().split(/\s+/)[1]?.endsWith(hex) && l.trim().split(/\s+/)[3] === "0A")) return;
    }
    if (performance.now() > end) {
      throw new ImageError("IMAGE_LISTENER_TIMEOUT", `${ref}: the workload did not listen on port ${port} within ${timeoutMs} ms`, {
        hint: "check guestPort, and the workload's output in the guest console log (DEBUG=supermachine:*)",
      });
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}
