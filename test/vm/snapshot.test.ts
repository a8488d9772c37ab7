// Engine-level snapshots: a VM with file-backed RAM is captured (device state through QEMU
// migration, RAM left in its file) and restored, copy-on-write, into new QEMU processes.
import { mkdtempSync, rmSync, statSync, writeFileSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MicroVm, type VmSpec } from "../../src/engine/qemu.js";
import { Image } from "../../src/index.js";

let dir: string;
let spec: VmSpec;
let ram: string;
let state: string;

async function run(vm: MicroVm, script: string): Promise<string> {
  const out: Buffer[] = [];
  const e = vm.agent.exec({ argv: ["sh", "-c", script], env: ["PATH=/bin:/usr/bin"] });
  e.onStdout = (c) => out.push(c);
  const x = await e.wait();
  expect(x.exitCode).toBe(0);
  return Buffer.concat(out).toString();
}

beforeAll(async () => {
  const image = await Image.build({ ref: "builtin:busybox" });
  dir = mkdtempSync(join(tmpdir(), "sm-snapshot-test-"));
  ram = join(dir, "ram");
  state = join(dir, "state");
  spec = { rootfs: image.rootfsPath, memoryMib: 256, vcpus: 1 };
  const vm = await MicroVm.launch({ ...spec, memoryFile: { path: ram, shared: true } });
  await run(vm, "echo written-before-snapshot > /tmp/marker");
  await vm.capture(state);
  await vm.kill();
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("snapshot and restore", () => {
  it("restores the guest as it was, in new processes that share the RAM file", async () => {
    expect(statSync(state).size).toBeGreaterThan(0);
    const ramBefore = readFileSync(ram).subarray(0, 1 << 20);
    const [a, b] = await Promise.all([0, 1].map(() => MicroVm.launch({ ...spec, memoryFile: { path: ram, shared: false }, incomingState: state })));
    try {
      expect(await run(a!, "cat /tmp/marker")).toBe("written-before-snapshot\n");
      expect(await run(b!, "cat /tmp/marker")).toBe("written-before-snapshot\n");
      // Writes in one clone are its own: neither the other clone nor the RAM file sees them.
      await run(a!, "echo only-a > /tmp/marker; dd if=/dev/zero of=/tmp/fill bs=1M count=8 2>/dev/null");
      expect(await run(b!, "cat /tmp/marker")).toBe("written-before-snapshot\n");
      expect(readFileSync(ram).subarray(0, 1 << 20).equals(ramBefore)).toBe(true);
    } finally {
      await Promise.all([a!.kill(), b!.kill()]);
    }
  });

  it("gives every clone fresh entropy and the host's clock", async () => {
    const clones = await Promise.all([0, 1].map(() => MicroVm.launch({ ...spec, memoryFile: { path: ram, shared: false }, incomingState: state })));
    try {
      const [ra, rb] = await Promise.all(clones.map((c) => run(c, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")));
      expect(ra).toMatch(/^[0-9a-f]{64}$/);
      expect(ra).not.toBe(rb);
      for (const c of clones) {
        const guest = Number(await run(c, "date +%s"));
        expect(Math.abs(guest - Date.now() / 1000)).toBeLessThan(2);
      }
    } finally {
      await Promise.all(clones.map((c) => c.kill()));
    }
  });

  it("fails clearly on a corrupt device-state file", async () => {
    const bad = join(dir, "bad-state");
    writeFileSync(bad, Buffer.alloc(4096, 0x41));
    await expect(MicroVm.launch({ ...spec, memoryFile: { path: ram, shared: false }, incomingState: bad, bootTimeoutMs: 20_000 })).rejects.toMatchObject({
      code: "ENGINE_RESTORE_FAILED",
      message: expect.stringContaining("bad-state"),
    });
  });
});
