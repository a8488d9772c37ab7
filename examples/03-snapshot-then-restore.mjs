// 03-snapshot-then-restore.mjs: capture a running VM and start new VMs from the capture.
// A VM gets some state (a file written from the host, one written by a command), `vm.snapshot`
// saves it into a directory, and a pool of the reopened snapshot hands out VMs that have that
// state from their first instruction. The snapshot lives in a temp dir removed at the end.
//
//   node examples/03-snapshot-then-restore.mjs
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image, connect } from "supermachine";

const work = await mkdtemp(join(tmpdir(), "supermachine-example-"));
const snapshotDir = join(work, "configured-vm");

// With SUPERMACHINE_URL (and SUPERMACHINE_API_KEY) set, the pool is the "busybox" pool of a
// `supermachine serve` there (docs/serve.md, "The remote client"): the snapshot is then taken and
// kept on the server, and reopened there by its id.
const remote = process.env.SUPERMACHINE_URL ? await connect(process.env.SUPERMACHINE_URL) : undefined;
const pool = remote ? remote.busybox : await (await Image.build({ ref: "builtin:busybox" })).pool({ min: 1, max: 1 });
let restoredPool;
let saved;
try {
  const vm = await pool.acquire();
  try {
    await vm.writeFile("/srv/notes.txt", "written before the snapshot\n");
    await vm.exec({ argv: ["sh", "-c", "echo $((6 * 7)) > /srv/answer"] });

    saved = await vm.snapshot(snapshotDir);
    console.log(`snapshot saved: ${saved.snapshotPath ?? `snapshot ${saved.id} on the server`}`);

    // The VM goes on running after the capture; what it does now is not in the snapshot.
    await vm.writeFile("/srv/notes.txt", "changed after the snapshot\n");
  } finally {
    await vm.release();
  }

  // Reopen the snapshot from disk, as another process could, and start a VM from it.
  restoredPool = remote ? remote.fromSnapshot(saved.id) : await (await Image.fromSnapshot(snapshotDir)).pool({ min: 1, max: 1 });
  const vm2 = await restoredPool.acquire();
  try {
    const { stdout } = await vm2.exec({ argv: ["sh", "-c", "echo \"notes: $(cat /srv/notes.txt)\"; echo \"answer: $(cat /srv/answer)\""] });
    console.log(`new VM (${vm2.pid ? `QEMU pid ${vm2.pid}` : `sandbox ${vm2.id}`}) sees:`);
    for (const line of stdout.toString().trimEnd().split("\n")) console.log(`  ${line}`);
  } finally {
    await vm2.release();
  }
} finally {
  await restoredPool?.shutdown();
  await pool.shutdown();
  await rm(work, { recursive: true, force: true });
}
