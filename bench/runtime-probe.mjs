// The `runtimes` benchmark's probe (bench/groups/runtimes.ts starts it under Node, Bun and Deno in
// turn): plain JavaScript on the public API, as a user's program is. Times `execs` exec round
// trips of `echo hi` on one VM and `acquires` acquire() calls of an idle VM from a pool that does
// not restore on release (the same work as the in-process `exec` and `acquire` groups), and
// prints one JSON line: { runtime, exec: [ms...], acquire: [ms...] }.
import { Image } from "supermachine";

const execs = Number(process.argv[2] ?? 200);
const acquires = Number(process.argv[3] ?? 200);
const runtime = globalThis.Deno ? `deno ${globalThis.Deno.version.deno}` : process.versions.bun ? `bun ${process.versions.bun}` : `node ${process.versions.node}`;

const image = await Image.build({ ref: "builtin:busybox" });
const pool = await image.pool({ min: 1, max: 1, restoreOnRelease: false });
try {
  const exec = [];
  const vm = await pool.acquire();
  for (let i = 0; i < 20; i++) await vm.exec({ argv: ["echo", "hi"] }); // warm both sides
  for (let i = 0; i < execs; i++) {
    const t0 = performance.now();
    const r = await vm.exec({ argv: ["echo", "hi"] });
    exec.push(performance.now() - t0);
    if (r.exitCode !== 0) throw new Error(`echo exited ${r.exitCode}`);
  }
  await vm.release();
  const acquire = [];
  for (let i = 0; i < acquires; i++) {
    const t0 = performance.now();
    const v = await pool.acquire();
    acquire.push(performance.now() - t0);
    await v.release();
  }
  process.stdout.write(JSON.stringify({ runtime, exec, acquire }) + "\n");
} finally {
  await pool.shutdown();
}
