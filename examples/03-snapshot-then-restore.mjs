// 03-snapshot-then-restore.mjs: capture a running VM and start new VMs from the capture.
// A VM gets some state (a file written from the host, one written by a command), `vm.snapshot`
// saves it into a directory, and a pool of the reopened snapshot hands out VMs that have that
// state from their first instruction. The snapshot lives in a temp dir removed at the end.
//
//   node examples/03-snapshot-then-restore.mjs
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "supermachine";

const work = await mkdtemp(join(tmpdir(), "supermachine-example-"));
const snapshotDir = join(work, "configured-vm");

const image = await Image.build({ ref: "builtin:busybox" });
const pool = await image.pool({ min: 1, max: 1 });
let restoredPool;
try {
  const vm = await pool.acquire();
  try {
    await vm.writeFile("/srv/notes.txt", "written before the snapshot\n");
    await vm.exec({ argv: ["sh", "-c", "echo $((6 * 7)) > /srv/answer"] });

    const saved = await vm.snapshot(snapshotDir);
    console.log(`snapshot saved: ${saved.snapshotPath}`);

    // The VM goes on running after the capture; what it does now is not in the snapshot.
    await vm.writeFile("/srv/notes.txt", "changed after the snapshot\n");
  } finally {
    await vm.release();
  }

  // Reopen the snapshot from disk, as another process could, and start a VM from it.
  const restored = await Image.fromSnapshot(snapshotDir);
  restoredPool = await restored.pool({ min: 1, max: 1 });
  const vm2 = await restoredPool.acquire();
  try {
    const { stdout } = await vm2.exec({ argv: ["sh", "-c", "echo \"notes: $(cat /srv/notes.txt)\"; echo \"answer: $(cat /srv/answer)\""] });
    console.log(`new VM (QEMU pid ${vm2.pid}) sees:`);
    for (const line of stdout.toString().trimEnd().split("\n")) console.log(`  ${line}`);
  } finally {
    await vm2.release();
  }
} finally {
  await restoredPool?.shutdown();
  await pool.shutdown();
  await rm(work, { recursive: true, force: true });
}
