/**
 * `vm.snapshot(destDir)`: captures a running VM (whose RAM is private, as in every restored VM)
 * into a new snapshot directory. Its RAM is not in any file, so the capture goes in two steps: a
 * full migration stream (RAM included) is written while the VM is paused, and the VM resumes;
 * then a helper QEMU loads that stream into a shared RAM file and is captured the usual way, RAM
 * staying in the file. The helper and the full stream are gone afterwards.
 */
import { randomBytes } from "node:crypto";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { MicroVm } from "../engine/qemu.js";
import { logger } from "../debug.js";
import { publish } from "../store/publish.js";
import { SNAPSHOT_FILES, sealSnapshot, type LoadedSnapshot, type SnapshotMeta } from "../store/snapshots.js";

const log = logger("bake");

export async function captureRunning(vm: MicroVm, destDir: string, origin: SnapshotMeta, signal?: AbortSignal): Promise<LoadedSnapshot> {
  const t0 = performance.now();
  const { value } = await publish<LoadedSnapshot>({
    target: destDir,
    kind: "dir",
    what: `snapshot ${destDir}`,
    // Always a new capture: whatever was there is replaced.
    check: async () => undefined,
    ...(signal ? { signal } : {}),
    write: async (tmp) => {
      const full = join(tmp, "full-stream");
      try {
        await vm.capture(full, { includeRam: true, ...(signal ? { signal } : {}) });
      } finally {
        await vm.resume().catch((e: Error) => log("resuming VM %d: %s", vm.pid, e.message));
      }
      const helper = await MicroVm.launch({
        rootfs: origin.image.rootfs,
        memoryMib: origin.memoryMib,
        vcpus: origin.vcpus,
        memoryFile: { path: join(tmp, SNAPSHOT_FILES.ram), shared: true },
        incomingState: full,
        incomingHasRam: true,
      });
      try {
        await helper.capture(join(tmp, SNAPSHOT_FILES.state), signal ? { signal } : {});
      } finally {
        await helper.kill();
      }
      await rm(full, { force: true });
      const { version: _v, files: _f, ...rest } = origin;
      const meta = await sealSnapshot(
        tmp,
        {
          ...rest,
          // Not reproducible from inputs: a capture of one VM at one moment.
          hash: `capture-${randomBytes(16).toString("hex")}`,
          // Whatever the VM was running is running in the capture.
          workloadRunning: origin.workload !== null,
          created: new Date().toISOString(),
          bakeMs: Math.round(performance.now() - t0),
        },
        destDir,
      );
      return { dir: destDir, ram: join(destDir, SNAPSHOT_FILES.ram), state: join(destDir, SNAPSHOT_FILES.state), meta };
    },
  });
  return value;
}
