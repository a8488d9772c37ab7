// The image's workload: started after every restore by default (pre-exec snapshots), captured
// already listening with listenerRequired, and reachable with vm.workloadSignal.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Image, type Vm } from "../../src/index.js";
import { busyboxLayer } from "../helpers/vm.js";
import { writeLayout } from "../helpers/image.js";

const snapshotsDir = mkdtempSync(join(tmpdir(), "sm-workload-test-"));
afterAll(() => rmSync(snapshotsDir, { recursive: true, force: true }));

const sh = async (vm: Vm, script: string) => (await vm.exec({ argv: ["sh", "-c", script] })).stdout.toString();
/** True when something in the guest listens on TCP `port`. */
const listening = async (vm: Vm, port: number) => {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  return (await sh(vm, `cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$2 ~ /:${hex}$/ && $4 == "0A"' | wc -l`)).trim() !== "0";
};

describe("workloads", () => {
  it("starts the workload in every restored VM, with the build env, and signals it", async () => {
    const image = await Image.build({
      ref: "builtin:busybox",
      snapshotsDir,
      env: { GREETING: "from-build" },
      cmd: ["sh", "-c", 'echo "$GREETING" > /tmp/workload.out; echo $$ > /tmp/workload.pid; exec sleep 1000'],
    });
    const pool = await image.pool({ min: 1, max: 2 });
    try {
      const [a, b] = await Promise.all([pool.acquire(), pool.acquire()]);
      for (const vm of [a, b]) {
        let pid = "";
        for (let i = 0; i < 100 && !pid; i++) pid = (await sh(vm, "cat /tmp/workload.pid 2>/dev/null")).trim();
        expect(pid).toMatch(/^\d+$/);
        expect(await sh(vm, "cat /tmp/workload.out")).toBe("from-build\n");
        expect(await sh(vm, `kill -0 ${pid} && echo alive`)).toBe("alive\n");
        await vm.workloadSignal(15);
        let gone = "";
        for (let i = 0; i < 100 && gone !== "gone\n"; i++) gone = await sh(vm, `kill -0 ${pid} 2>/dev/null || echo gone`);
        expect(gone).toBe("gone\n");
        await expect(vm.workloadSignal(15)).rejects.toMatchObject({ code: "EXEC_NO_WORKLOAD" });
      }
    } finally {
      await pool.shutdown();
    }
  });

  it("with listenerRequired, captures the workload listening: restored VMs serve at once", async () => {
    const image = await Image.build({
      ref: "builtin:busybox",
      snapshotsDir,
      cmd: ["httpd", "-f", "-p", "8080", "-h", "/etc"],
      guestPort: 8080,
      listenerRequired: true,
    });
    const pool = await image.pool({ min: 0, max: 1 });
    try {
      const vm = await pool.acquire();
      expect(await listening(vm, 8080)).toBe(true);
      expect(await sh(vm, "wget -qO- http://127.0.0.1:8080/hostname")).toBe(await sh(vm, "cat /etc/hostname"));
      await vm.workloadSignal(15);
      let still = true;
      for (let i = 0; i < 100 && still; i++) still = await listening(vm, 8080);
      expect(still).toBe(false);
    } finally {
      await pool.shutdown();
    }
  });

  it("refuses listenerRequired for an image without ENTRYPOINT or CMD", async () => {
    const layout = mkdtempSync(join(tmpdir(), "sm-nocmd-"));
    try {
      await writeLayout(layout, { layers: [{ tar: busyboxLayer(), gzip: true }], config: { Env: ["PATH=/bin"] }, tag: "v1" });
      await expect(Image.build({ ref: `oci:${layout}:v1`, snapshotsDir, listenerRequired: true })).rejects.toMatchObject({
        code: "IMAGE_NO_WORKLOAD",
        hint: expect.stringContaining("cmd"),
      });
    } finally {
      rmSync(layout, { recursive: true, force: true });
    }
  });
});

