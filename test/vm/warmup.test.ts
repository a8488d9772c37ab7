// Build options extraFiles and warmup on real bakes: staged files and warmed state are in every
// VM the pool hands out; their contents and tags (not paths or mtimes) key the snapshot; a
// warmup that throws leaves no snapshot and no running VM; warmup output is in the bake log.
import { chmodSync, copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { engineCounters } from "../../src/engine/qemu.js";
import { BakeError, Image, type WarmupVm } from "../../src/index.js";

const work = mkdtempSync(join(tmpdir(), "sm-warmup-test-"));
const snapshotsDir = join(work, "snapshots");
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe("extraFiles", () => {
  it("stages host files with their modes into every VM, keyed by contents only", async () => {
    const conf = join(work, "app.toml");
    const script = join(work, "run.sh");
    writeFileSync(conf, "answer = 42\n");
    writeFileSync(script, "#!/bin/sh\necho script says hi\n");
    chmodSync(script, 0o750);
    const build = (confPath = conf) =>
      Image.build({
        ref: "builtin:busybox",
        snapshotsDir,
        extraFiles: [
          { hostPath: confPath, guestPath: "/etc/app.toml" },
          { hostPath: script, guestPath: "/usr/local/bin/run.sh" },
        ],
      });
    const img = await build();
    const pool = await img.pool({ min: 1, max: 2 });
    try {
      for (const vm of [await pool.acquire(), await pool.acquire()]) {
        const r = await vm.exec({ argv: ["sh", "-c", "cat /etc/app.toml; stat -c %a /etc/app.toml /usr/local/bin/run.sh; run.sh"] });
        expect(r.stdout.toString()).toBe("answer = 42\n644\n750\nscript says hi\n");
      }
    } finally {
      await pool.shutdown();
    }
    // Same contents elsewhere, and a newer mtime: the same key, nothing booted.
    const copy = join(work, "copy-of-app.toml");
    copyFileSync(conf, copy);
    utimesSync(copy, new Date(), new Date(Date.now() + 60_000));
    const launched = engineCounters().launched;
    const same = await build(copy);
    expect(same.inputHash).toBe(img.inputHash);
    expect(engineCounters().launched).toBe(launched);
    // Edited contents: another key, a new bake with the new contents.
    writeFileSync(conf, "answer = 43\n");
    const edited = await build();
    expect(edited.inputHash).not.toBe(img.inputHash);
    const p2 = await edited.pool({ min: 1, max: 1 });
    try {
      const vm = await p2.acquire();
      expect((await vm.exec({ argv: ["cat", "/etc/app.toml"] })).stdout.toString()).toBe("answer = 43\n");
    } finally {
      await p2.shutdown();
    }
  });

  it("refuses a missing hostPath before booting anything", async () => {
    const launched = engineCounters().launched;
    const e = await Image.build({ ref: "builtin:busybox", snapshotsDir, extraFiles: [{ hostPath: "./no/such/file.toml", guestPath: "/etc/x" }] }).catch((x: unknown) => x);
    expect(e).toMatchObject({ code: "OPTION_EXTRA_FILE_MISSING" });
    expect((e as Error).message).toContain("no/such/file.toml");
    await expect(Image.build({ ref: "builtin:busybox", snapshotsDir, extraFiles: [{ hostPath: work, guestPath: "/etc/x" }] })).rejects.toMatchObject({
      code: "OPTION_EXTRA_FILE_INVALID",
    });
    await expect(Image.build({ ref: "builtin:busybox", snapshotsDir, extraFiles: [{ hostPath: join(work, "app.toml"), guestPath: "etc/x" }] })).rejects.toMatchObject({
      code: "OPTION_INVALID",
    });
    expect(engineCounters().launched).toBe(launched);
  });
});

describe("warmup", () => {
  it("runs against the booted VM before the snapshot; every VM starts warmed", async () => {
    let calls = 0;
    const warmup = async (vm: WarmupVm) => {
      calls++;
      const r = await vm.exec({ argv: ["sh", "-c", "echo warmed-at-bake > /var/warm; echo visible-in-log; echo err-in-log >&2"] });
      expect(r.exitCode).toBe(0);
      await vm.writeFile("/var/cache.json", JSON.stringify({ primed: true }));
      const child = await vm.spawn({ argv: ["sh", "-c", "read line; echo \"got $line\""] });
      await child.writeStdin("spawned\n");
      expect((await child.readStdout()).toString()).toBe("got spawned\n");
      expect((await vm.readFile("/var/warm")).toString()).toBe("warmed-at-bake\n");
    };
    const img = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "warm", warmupTag: "v1", warmup });
    expect(calls).toBe(1);
    const pool = await img.pool({ min: 1, max: 2 });
    try {
      for (const vm of [await pool.acquire(), await pool.acquire()]) {
        expect((await vm.exec({ argv: ["cat", "/var/warm", "/var/cache.json"] })).stdout.toString()).toBe('warmed-at-bake\n{"primed":true}');
      }
    } finally {
      await pool.shutdown();
    }
    const log = readFileSync(join(img.snapshotPath, "bake.log"), "utf8");
    expect(log).toContain("warmup exec:");
    expect(log).toContain("visible-in-log");
    expect(log).toContain("err-in-log");
    // Same tag: cached, the warmup does not run; another tag: baked again.
    await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "warm", warmupTag: "v1", warmup });
    expect(calls).toBe(1);
    const v2 = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "warm", warmupTag: "v2", warmup });
    expect(calls).toBe(2);
    expect(v2.inputHash).not.toBe(img.inputHash);
    // A build without warmup is keyed apart from one with it.
    const plain = await Image.build({ ref: "builtin:busybox", snapshotsDir, name: "plain", warmupTag: "v2" });
    expect(plain.inputHash).not.toBe(v2.inputHash);
  });

  it("a warmup that throws fails the build, leaving no snapshot and no VM", async () => {
    const live = engineCounters().live;
    const boom = new Error("warmup exploded");
    const e = await Image.build({
      ref: "builtin:busybox",
      snapshotsDir,
      name: "broken",
      warmup: async (vm) => {
        await vm.exec({ argv: ["echo", "before the failure"] });
        throw boom;
      },
    }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(BakeError);
    expect(e).toMatchObject({ code: "BAKE_WARMUP_FAILED" });
    expect((e as Error).message).toContain("warmup exploded");
    expect((e as Error).cause).toBe(boom);
    const logPath = /bake log: (\S+)\)/.exec((e as BakeError).hint ?? "")?.[1];
    expect(logPath && existsSync(logPath)).toBe(true);
    expect(readFileSync(logPath!, "utf8")).toContain("before the failure");
    expect(existsSync(join(snapshotsDir, "broken"))).toBe(false);
    expect(readdirSync(snapshotsDir).filter((n) => n.startsWith("broken.tmp-"))).toEqual([]);
    expect(engineCounters().live).toBe(live);
  });
});
