// A pool's `user` option (a row of the option table, src/schema/options.ts): every exec of the
// pool's VMs runs as that user unless the image's User is all there is; names are looked up in the
// guest. Real microVMs of the built-in busybox image (root by default; it has `nobody`).
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image, OptionError, type Pool } from "../../src/index.js";

let image: Image;
const pools: Pool[] = [];

beforeAll(async () => {
  image = await Image.build({ ref: "builtin:busybox" });
});

afterAll(async () => {
  await Promise.all(pools.map((p) => p.shutdown()));
});

async function idIn(options: Parameters<Image["pool"]>[0]): Promise<string> {
  const pool = await image.pool({ min: 0, max: 1, ...options });
  pools.push(pool);
  const vm = await pool.acquire();
  try {
    const r = await vm.exec({ argv: ["sh", "-c", "echo $(id -u):$(id -g)"] });
    expect(r.exitCode, r.stderr.toString()).toBe(0);
    return r.stdout.toString().trim();
  } finally {
    await vm.release();
  }
}

describe("pool option user", () => {
  it("runs execs as the image's user by default, and as the pool's user when set", async () => {
    expect(await idIn({})).toBe("0:0");
    expect(await idIn({ user: "nobody" })).toBe("65534:65534");
    expect(await idIn({ user: "1000:1001" })).toBe("1000:1001");
  });

  it("runs one call as another user when it says so, and gives written files that owner", async () => {
    const pool = await image.pool({ min: 0, max: 1, user: "nobody" });
    pools.push(pool);
    const vm = await pool.acquire();
    try {
      expect((await vm.exec({ argv: ["id", "-u"], user: "root" })).stdout.toString()).toBe("0\n");
      expect((await vm.exec({ argv: ["id", "-u"] })).stdout.toString()).toBe("65534\n");
      const child = await vm.spawn({ argv: ["id", "-u"], user: "1000:1001" });
      expect((await child.readStdout()).toString()).toBe("1000\n");
      await child.wait();
      await vm.writeFile("/tmp/owned", "x", { user: "nobody" });
      await vm.writeFileStream("/tmp/owned-stream", (async function* () { yield Buffer.from("y"); })(), { user: "1000:1001" });
      expect((await vm.exec({ argv: ["stat", "-c", "%u:%g", "/tmp/owned", "/tmp/owned-stream"] })).stdout.toString()).toBe("65534:65534\n1000:1001\n");
      await expect(vm.exec({ argv: ["true"], user: "ghost" })).rejects.toMatchObject({ code: "EXEC_USER_UNKNOWN" });
      await expect(vm.exec({ argv: ["true"], user: "" })).rejects.toThrow(OptionError);
    } finally {
      await vm.release();
    }
  });

  it("refuses a malformed user at image.pool, and names an unknown one at the first exec", async () => {
    await expect(image.pool({ user: "no body" })).rejects.toThrow(OptionError);
    await expect(image.pool({ user: "no body" })).rejects.toThrow(/user is not a user: expected name, uid, name:group or uid:gid/);
    const pool = await image.pool({ min: 0, max: 1, user: "ghost" });
    pools.push(pool);
    const vm = await pool.acquire();
    try {
      await expect(vm.exec({ argv: ["true"] })).rejects.toMatchObject({ code: "EXEC_USER_UNKNOWN", message: expect.stringContaining('"ghost"') });
    } finally {
      await vm.release();
    }
  });
});
