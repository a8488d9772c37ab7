// The remote client under this runtime: connect() to a `supermachine serve` (argv[2]; the key in
// SUPERMACHINE_API_KEY), acquire from the compat project's child pool, exec, write and read a file.
import { connect } from "supermachine";
import { assert, report } from "./_lib.mjs";

const url = process.argv[2];
assert.ok(url, "usage: remote.mjs <server url>");
const pools = await connect(url);
try {
  assert.ok(pools.child, `the server has no pool "child": ${Object.keys(pools).join(", ")}`);
  const vm = await pools.child.acquire();
  try {
    const r = await vm.exec({ argv: ["cat", "/etc/child-warm"] });
    assert.equal(r.stdout.toString(), "warmed by child: 42\n");
    await vm.writeFile("/tmp/remote.txt", "over the wire\n");
    assert.equal((await vm.readFile("/tmp/remote.txt")).toString(), "over the wire\n");
  } finally {
    await vm.release();
  }
} finally {
  await pools.close();
}
report({ scenario: "remote" });
