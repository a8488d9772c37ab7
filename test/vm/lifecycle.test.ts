// Failure paths and process hygiene: clear errors, and no QEMU process outlives its owner.
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { Image } from "../../src/index.js";
import { isRunning, waitFor } from "../helpers/vm.js";

const root = join(import.meta.dirname, "..", "..");
const saved = { ...process.env };
afterEach(() => {
  for (const k of ["SUPERMACHINE_KERNEL", "SUPERMACHINE_QEMU", "SUPERMACHINE_INITRAMFS"]) {
    if (saved[k] === undefined) delete process.env[k];
    else process.env[k] = saved[k];
  }
});

describe("errors", () => {
  it("names the setup command when the kernel is missing", async () => {
    process.env.SUPERMACHINE_KERNEL = "/nonexistent/vmlinux";
    const err = await Image.build({ ref: "builtin:busybox" })
      .then((image) => image.pool({ min: 1 }))
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "SETUP_KERNEL_MISSING" });
    expect((err as Error).message).toContain("/nonexistent/vmlinux");
    expect((err as { hint: string }).hint).toContain("npx supermachine setup");
  });

  it("reports QEMU's stderr when QEMU cannot start, and names no console log (QEMU wrote none)", async () => {
    process.env.SUPERMACHINE_QEMU = "/nonexistent/qemu-system-x86_64";
    const err = (await Image.build({ ref: "builtin:busybox" })
      .then((image) => image.pool({ min: 1 }))
      .catch((e: unknown) => e)) as Error & { code: string; hint?: string };
    expect(err.code).toBe("ENGINE_EXITED_DURING_BOOT");
    expect(err.message).toMatch(/QEMU stderr:[\s\S]*nonexistent/);
    expect(err.message).not.toContain("guest console log");
    expect(err.hint).toMatch(/qemu-system-x86/);
  });

  it("names the kept console log of a VM that died, and that log exists with the guest's output", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    const pool = await image.pool({ min: 1, max: 1 });
    try {
      const vm = await pool.acquire();
      const marker = `last-words-${process.pid}-${Date.now()}`;
      await vm.exec({ argv: ["sh", "-c", `echo ${marker} > /dev/console`] });
      // Dies during a call, then is called again: both errors name the same kept log (the cause,
      // the channel's own error, may come before QEMU's exit is seen).
      const during = vm.exec({ argv: ["sleep", "30"] }).catch((e: unknown) => e) as Promise<Error & { code: string; cause?: Error }>;
      await new Promise((r) => setTimeout(r, 200));
      process.kill(vm.pid, "SIGKILL");
      await vm.machine.exited;
      const inFlight = await during;
      const after = (await vm.exec({ argv: ["true"] }).catch((e: unknown) => e)) as Error & { code: string };
      const named = (e: Error) => /guest console log: ([^\s)]+)/.exec(e.message)?.[1];
      for (const e of [inFlight, after]) {
        expect(named(e), e.message).toBe(vm.machine.failureLog);
      }
      expect([inFlight.code, after.code]).toEqual(["VM_DEAD", "VM_DEAD"]);
      // The call sees the channel close or the process exit first, whichever QEMU's death
      // reaches this process through first.
      expect(["ENGINE_VM_EXITED", "AGENT_CHANNEL_CLOSED"]).toContain((inFlight.cause as Error & { code: string }).code);
      expect(readFileSync(vm.machine.failureLog!, "utf8")).toContain(marker);
      rmSync(vm.machine.failureLog!, { force: true });
    } finally {
      await pool.shutdown();
    }
  });

  it("reports QEMU's own error when it cannot load the kernel", async () => {
    process.env.SUPERMACHINE_KERNEL = "/etc/hostname";
    const err = (await Image.build({ ref: "builtin:busybox" })
      .then((image) => image.pool({ min: 1 }))
      .catch((e: unknown) => e)) as Error & { code: string };
    expect(err.code).toBe("ENGINE_EXITED_DURING_BOOT");
    expect(err.message).toMatch(/QEMU stderr:[\s\S]*kernel/i);
  });

  it("refuses a memory size larger than the host before starting anything", async () => {
    await expect(Image.build({ ref: "builtin:busybox", memoryMib: 1 << 30 })).rejects.toMatchObject({ code: "OPTION_INVALID" });
    const image = await Image.build({ ref: "builtin:busybox" });
    await expect(image.pool({ min: 1, memoryMib: 1 << 20 })).rejects.toMatchObject({
      code: "OPTION_MEMORY_INVALID",
      message: expect.stringContaining("this host's"),
    });
  });

  it("rejects bad options with the accepted values", async () => {
    await expect(Image.build({ ref: "builtin:busybox", pullPolicy: "sometimes" as never })).rejects.toMatchObject({
      code: "OPTION_INVALID",
      hint: expect.stringContaining('"missing"'),
    });
    await expect(Image.build({ ref: "builtin:busybox", memroyMib: 512 } as never)).rejects.toMatchObject({ code: "OPTION_UNKNOWN" });
    const image = await Image.build({ ref: "builtin:busybox" });
    await expect(image.pool({ min: 3, max: 2 })).rejects.toThrow("image.pool: min is larger than max (2), got 3");
  });

  it("rejects unknown and malformed references, naming them", async () => {
    await expect(Image.build({ ref: "oci:/nonexistent/layout" })).rejects.toMatchObject({
      code: "IMAGE_LAYOUT_NOT_FOUND",
      message: expect.stringContaining("/nonexistent/layout"),
    });
    await expect(Image.build({ ref: "builtin:nope" })).rejects.toThrow(/nope/);
    await expect(Image.build({ ref: "gopher://x" })).rejects.toThrow(/gopher:\/\/x/);
  });
});

/** Runs a Node script that boots VMs and prints lines; resolves with the child and its lines. */
function runScript(code: string) {
  const child = spawn(process.execPath, ["--input-type=module", "-e", code], { cwd: root, stdio: ["ignore", "pipe", "inherit"] });
  const lines: string[] = [];
  let buf = "";
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (d: string) => {
    buf += d;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  const exited = new Promise<number | null>((r) => child.on("exit", (c) => r(c)));
  return { child, lines, exited };
}

/** Runtime directories (sockets, console log) that a process with this pid created. */
const runDirsOf = (pid: number) => readdirSync(tmpdir()).filter((n) => n.startsWith(`sm-${pid}-`));

describe("process hygiene", () => {
  let killedOwner = 0;

  it("kills QEMU when the owning Node process is SIGKILLed", async () => {
    const { child, lines, exited } = runScript(`
      import { Image } from "supermachine";
      const img = await Image.build({ ref: "builtin:busybox" });
      const pool = await img.pool({ min: 2, max: 2 });
      const a = await pool.acquire(), b = await pool.acquire();
      console.log(a.pid + " " + b.pid + " " + process.pid);
      setInterval(() => {}, 1000);
    `);
    expect(await waitFor(() => lines.length > 0, 60_000, 50)).toBe(true);
    const [a, b, owner] = lines[0]!.split(" ").map(Number) as [number, number, number];
    expect([a, b].every(isRunning)).toBe(true);
    // Two VMs, plus a QEMU process pre-started for the next restore.
    expect(runDirsOf(owner).length).toBeGreaterThanOrEqual(2);
    child.kill("SIGKILL");
    await exited;
    expect(await waitFor(() => !isRunning(a) && !isRunning(b), 5_000)).toBe(true);
    killedOwner = owner;
  });

  it("lets a seed-style program (no shutdown) exit on its own, leaving no QEMU behind", async () => {
    const { lines, exited } = runScript(`
      import { Image } from "supermachine";
      const img = await Image.build({ ref: "builtin:busybox", name: "hello-busybox" });
      const pool = await img.pool({ min: 1, max: 1 });
      const vm = await pool.acquire();
      const { stdout, exitCode } = await vm.exec({ argv: ["echo", "hello from supermachine"], timeoutMs: 5_000 });
      console.log(vm.pid + " " + process.pid);
      console.log(\`exit \${exitCode}:\`, stdout.toString().trim());
      await vm.release();
    `);
    const code = await exited;
    expect(code).toBe(0);
    expect(lines[1]).toBe("exit 0: hello from supermachine");
    const [vmPid, owner] = lines[0]!.split(" ").map(Number) as [number, number];
    expect(await waitFor(() => !isRunning(vmPid), 3_000)).toBe(true);
    // Its own runtime directories went with it; those of the SIGKILLed owner above were
    // swept by this process's first launch.
    expect(runDirsOf(owner)).toEqual([]);
    if (killedOwner) expect(runDirsOf(killedOwner)).toEqual([]);
  });

  it("removes each VM's runtime directory when it stops", async () => {
    const image = await Image.build({ ref: "builtin:busybox" });
    const pool = await image.pool({ min: 1, max: 1 });
    const vm = await pool.acquire();
    const dir = vm.vsockPath.replace(/\/agent\.sock$/, "");
    expect(existsSync(dir)).toBe(true);
    await pool.shutdown();
    expect(await waitFor(() => !existsSync(dir), 2_000)).toBe(true);
  });
});

describe("orderly stop", () => {
  it("powers the guest off through the agent, or quits QEMU over QMP when the agent cannot", async () => {
    const { MicroVm } = await import("../../src/engine/qemu.js");
    const image = await Image.build({ ref: "builtin:busybox" });
    const spec = { rootfs: image.rootfsPath, memoryMib: 256, vcpus: 1 };
    const a = await MicroVm.launch(spec);
    const byAgent = await a.stop();
    expect(byAgent).toMatchObject({ code: 0, signal: null });
    // Stop the guest's vCPU so the agent cannot answer: QMP quit must end QEMU (exit 0),
    // not the SIGKILL that comes later.
    const b = await MicroVm.launch(spec);
    await b.pause();
    const byQmp = await b.stop(300);
    expect(byQmp).toMatchObject({ code: 0, signal: null });
  });
});
