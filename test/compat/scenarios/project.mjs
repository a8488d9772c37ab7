// A declarative project under this runtime: a TypeScript config (loaded by jiti) with a helper
// module, a parent image with extraFiles and a warmup, a child baked on the parent's snapshot,
// and pools from loadPools. Prints each image's key and whether this run baked it, so the test
// can check that every runtime computes the same keys (a bake cached under one is found by the
// others). The project directory is argv[2].
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { loadPools } from "supermachine";
import { assert, report } from "./_lib.mjs";

const dir = process.argv[2];
assert.ok(dir, "usage: project.mjs <project directory>");
const data = readFileSync(join(dir, "data.txt"), "utf8");
const nodes = {};
const pools = await loadPools({
  cwd: dir,
  onEvent: (e) => {
    if (e.type === "done") nodes[e.name] = { key: e.node.key, status: e.node.status };
  },
});
try {
  assert.deepEqual(Object.keys(pools).sort(), ["base", "child"]);
  const vm = await pools.child.acquire();
  try {
    const r = await vm.exec({ argv: ["sh", "-c", "cat /srv/data.txt /etc/base-warm /etc/child-warm"] });
    assert.equal(r.exitCode, 0, r.stderr.toString());
    assert.equal(r.stdout.toString(), `${data}warmed by base\nwarmed by child: 42\n`);
  } finally {
    await vm.release();
  }
  const base = await pools.base.acquire();
  try {
    const r = await base.exec({ argv: ["sh", "-c", "test -e /etc/child-warm && echo leaked || echo clean"] });
    assert.equal(r.stdout.toString(), "clean\n");
  } finally {
    await base.release();
  }
} finally {
  await pools.close();
}
report({ scenario: "project", nodes });
