// pattern-4-resource-files.mjs: bake host files into the snapshot with `extraFiles`.
// A config file and a script (mode 0755) written on the host appear at fixed paths in every VM.
// Their contents are part of the snapshot's input hash: building again with the files unchanged
// reuses the snapshot, editing one bakes a new snapshot that has the new contents.
// Files and snapshots go to a temp dir removed at the end.
//
//   node examples/pattern-4-resource-files.mjs
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image, connect } from "supermachine";

if (process.env.SUPERMACHINE_URL) {
  // Through `supermachine serve`: the files are the server project's (its "pattern4" pool stages
  // app.conf and greet.sh the same way), and editing one rebakes on the server when it runs with
  // --watch. Here the client only sees what every VM of that pool has.
  const pool = (await connect(process.env.SUPERMACHINE_URL)).pattern4;
  const vm = await pool.acquire();
  try {
    const { stdout } = await vm.exec({ argv: ["greet"] });
    console.log(`  guest says: ${stdout.toString().trim()}`);
  } finally {
    await vm.release();
    await pool.shutdown();
  }
  process.exit(0);
}

const work = await mkdtemp(join(tmpdir(), "supermachine-example-"));
const configFile = join(work, "app.conf");
const scriptFile = join(work, "greet.sh");
await writeFile(configFile, "greeting=hello\n");
await writeFile(scriptFile, '#!/bin/sh\n. /etc/app.conf\necho "$greeting from a baked-in script"\n', { mode: 0o755 });

async function build() {
  const t0 = Date.now();
  const image = await Image.build({
    ref: "builtin:busybox",
    snapshotsDir: join(work, "snapshots"),
    extraFiles: [
      { hostPath: configFile, guestPath: "/etc/app.conf" },
      { hostPath: scriptFile, guestPath: "/usr/local/bin/greet" }, // keeps the host file's mode
    ],
  });
  console.log(`built in ${Date.now() - t0} ms, inputHash ${image.inputHash.slice(0, 12)}`);
  return image;
}

async function runGreet(image) {
  const pool = await image.pool({ min: 1, max: 1 });
  try {
    const vm = await pool.acquire();
    try {
      const { stdout } = await vm.exec({ argv: ["greet"] });
      console.log(`  guest says: ${stdout.toString().trim()}`);
    } finally {
      await vm.release();
    }
  } finally {
    await pool.shutdown();
  }
}

try {
  const first = await build();
  await runGreet(first);

  const again = await build();
  if (again.inputHash !== first.inputHash) throw new Error("the same files gave another input hash");
  console.log("  files unchanged: same inputHash, the snapshot is reused");

  await writeFile(configFile, "greeting=bonjour\n");
  const edited = await build();
  if (edited.inputHash === first.inputHash) throw new Error("editing app.conf did not change the input hash");
  console.log("  app.conf edited: new inputHash, a new snapshot was baked");
  await runGreet(edited);
} finally {
  await rm(work, { recursive: true, force: true });
}
