// An OCI image layout made in the test (busybox base layer + a layer with whiteouts), booted
// for real: layer semantics and the image config (Env, WorkingDir, User) as the guest sees them.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image, type Pool } from "../../src/index.js";
import { busyboxLayer } from "../helpers/vm.js";
import { makeTar, removeDir, tempDir, writeLayout } from "../helpers/image.js";

let dir: string;
let pool: Pool | undefined;

beforeAll(async () => {
  dir = await tempDir("sm-oci-vm-");
  const top = await makeTar([
    { name: "app/", type: "directory" },
    { name: "app/hello.txt", data: "hello from a layer\n" },
    { name: "bin/.wh.vi" }, // deletes /bin/vi from the base layer
    { name: "etc/.wh..wh..opq" }, // hides the base layer's /etc ...
    { name: "etc/passwd", data: "root:x:0:0:root:/root:/bin/sh\nrunner:x:1234:4321:runner:/app:/bin/sh\n" },
    { name: "etc/group", data: "root:x:0:\nrunners:x:4321:\n" },
  ]);
  await writeLayout(dir, {
    layers: [{ tar: busyboxLayer(), gzip: true }, { tar: top }],
    config: { Env: ["PATH=/bin:/usr/bin:/sbin:/usr/sbin", "GREETING=from-image"], WorkingDir: "/app", User: "runner" },
    tag: "v1",
  });
});

afterAll(async () => {
  await pool?.shutdown();
  await removeDir(dir);
});

describe("an OCI layout image in a VM", () => {
  it("applies layers, whiteouts and opaque dirs, and honours Env, WorkingDir and User", async () => {
    const image = await Image.build({ ref: `oci:${dir}:v1` });
    expect(image.config).toMatchObject({ workingDir: "/app", user: "runner" });
    pool = await image.pool({ min: 1, max: 1 });
    const vm = await pool.acquire();
    const r = await vm.exec({
      argv: ["sh", "-c", 'id -u; id -g; pwd; echo "$GREETING"; cat hello.txt; ls /bin/vi >/dev/null 2>&1 || echo no-vi; ls /etc'],
    });
    expect(r.stderr.toString()).toBe("");
    expect(r.stdout.toString()).toBe("1234\n4321\n/app\nfrom-image\nhello from a layer\nno-vi\ngroup\npasswd\n");
    const env = await vm.exec({ argv: ["sh", "-c", 'echo "$GREETING"'], env: { GREETING: "overridden" } });
    expect(env.stdout.toString()).toBe("overridden\n");
    await vm.release();
  });
});
