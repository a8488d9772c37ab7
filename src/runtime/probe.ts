/**
 * A test restore of one snapshot (`supermachine verify --restore`): a VM restored from it the way
 * a pool restores one, its agent greeted as a new VM, then killed. A snapshot can be whole byte
 * for byte and still fail every restore (garbage state sealed with a correct checksum, a RAM and
 * state pair that do not belong together): only a restore finds out.
 */
import { isRestoreFault, MicroVm } from "../engine/qemu.js";
import { holdSnapshot } from "../store/leases.js";
import type { LoadedSnapshot } from "../store/snapshots.js";

export type RestoreProbe =
  | { ok: true; ms: number }
  /** `fault`: the snapshot's (QEMU refused what it loaded); otherwise the host's or a deadline (inconclusive). */
  | { ok: false; fault: boolean; error: Error };

export async function probeRestore(snap: LoadedSnapshot, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<RestoreProbe> {
  const release = holdSnapshot(snap.dir); // gc and watch leave it alone meanwhile
  const t0 = performance.now();
  try {
    const vm = await MicroVm.launch({
      rootfs: snap.meta.image.rootfs,
      memoryMib: snap.meta.memoryMib,
      vcpus: snap.meta.vcpus,
      bootTimeoutMs: opts.timeoutMs ?? 30_000,
      memoryFile: { path: snap.ram, shared: false },
      incomingState: snap.state,
      capturedBy: { engine: snap.meta.inputs.engine, what: `snapshot ${snap.dir}` },
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    const ms = Math.round(performance.now() - t0);
    await vm.kill();
    return { ok: true, ms };
  } catch (err) {
    return { ok: false, fault: isRestoreFault(err), error: err as Error };
  } finally {
    release();
  }
}
