// Snapshots moved to a host of another identity, on real VMs: a busybox image baked here and
// exported to a directory cache is refused, by name, where the CPU model differs (SUPERMACHINE_CPU
// =qemu64, a real other model under TCG or KVM) or the QEMU says another version (a wrapper as
// SUPERMACHINE_QEMU): an import of its key, a frozen build against the cache (which misses its
// own key and finds the recipe key there), and a restore of its snapshot directory, which stops
// before QEMU starts. A build that may bake bakes under the other model (the guest boots with it)
// and says why the cache's copy was not used.
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Image } from "../../src/index.js";
import { engineCounters } from "../../src/engine/processes.js";
import { engineFingerprint } from "../../src/engine/fingerprint.js";
import { importSnapshots } from "../../src/project/cache.js";
import { readIndex } from "../helpers/transfer-format.js";
import { cli as runCli } from "../helpers/run.js";
import { generateSigningKey } from "../../src/transfer/sign.js";

const work = mkdtempSync(join(tmpdir(), "sm-host-identity-"));
const signing = generateSigningKey();
const trust = { trust: [signing.publicKey] };
let project: string;
let cacheDir: string;
let key: string;
let snapshotDir: string;
/** This host's CPU model as snapshots made here record it, and the other one the tests move to. */
let cpuHere: string;
const OTHER_CPU = "qemu64";

interface Row {
  name: string;
  key: string;
  status: string;
  error?: { code: string; message: string };
  cacheError?: { code: string; message: string };
}

/** The CLI from dist/ in `cwd`, with `env` over this process's environment. */
const cli = (cwd: string, env: NodeJS.ProcessEnv, ...args: string[]) => runCli(args, { cwd, env: { ...process.env, ...env }, timeout: 400_000 });

/** A one-image project (busybox, with a warmup) whose cache is signed by `signing`. */
function makeProject(name: string): string {
  const dir = join(work, name);
  mkdirSync(join(dir, "images"), { recursive: true });
  writeFileSync(join(dir, "cache.key"), signing.privatePem, { mode: 0o600 });
  writeFileSync(
    join(dir, "supermachine.config.ts"),
    `import { defineConfig } from "supermachine/config";
export default defineConfig({ images: ["./images/*.ts"], snapshotsDir: "./.snapshots", cache: { signingKey: "./cache.key", trust: [${JSON.stringify(signing.publicKey)}] } });
`,
  );
  writeFileSync(
    join(dir, "images", "box.ts"),
    `import { defineImage } from "supermachine/config";
export default defineImage({ ref: "builtin:busybox", warmup: async (vm) => { await vm.exec({ argv: ["sh", "-c", "echo box > /srv-box"] }); } });
`,
  );
  return dir;
}

/** Runs `fn` with the environment variables `vars` set (undefined: unset), restoring them after. */
async function withEnv<T>(vars: Record<string, string | undefined>, fn: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  const set = (v: Record<string, string | undefined>) => {
    for (const [k, x] of Object.entries(v)) {
      if (x === undefined) delete process.env[k];
      else process.env[k] = x;
    }
  };
  set(vars);
  try {
    return await fn();
  } finally {
    set(saved);
  }
}

beforeAll(async () => {
  // This host's own model: whatever SUPERMACHINE_CPU the run has, or the accelerator's default.
  cpuHere = engineFingerprint().cpu;
  if (cpuHere === OTHER_CPU) throw new Error(`this run's CPU model is already ${OTHER_CPU}: unset SUPERMACHINE_CPU`);
  project = makeProject("a");
  cacheDir = join(work, "cache");
  const r = await cli(project, {}, "build", "--json", "--cache-to", cacheDir);
  if (r.status !== 0) throw new Error(`build failed: ${r.stdout}\n${r.stderr}`);
  const rows = (JSON.parse(r.stdout) as { images: Row[] }).images;
  key = rows[0]!.key;
  snapshotDir = join(project, ".snapshots", readdirSync(join(project, ".snapshots")).find((n) => n.endsWith(key.slice(0, 16)))!);
}, 900_000);

afterAll(() => rmSync(work, { recursive: true, force: true }));

describe("a snapshot on a host of another identity", () => {
  it("is in the cache under its key and its recipe key", () => {
    const entry = readIndex(cacheDir).manifests.find((m) => m.annotations["dev.supermachine.key"] === key)!;
    expect(entry.annotations["dev.supermachine.recipe"]).toMatch(/^[0-9a-f]{64}$/);
  });

  it("an import of its key under another CPU model refuses naming cpu", async () => {
    const home = join(work, "home-import");
    const err = await withEnv({ SUPERMACHINE_CPU: OTHER_CPU, SUPERMACHINE_HOME: home }, () => importSnapshots(cacheDir, [key], trust).catch((e: unknown) => e));
    console.log(`import under SUPERMACHINE_CPU=${OTHER_CPU}: ${(err as Error).message}`);
    expect(err).toMatchObject({ code: "SNAPSHOT_HOST_MISMATCH", message: expect.stringContaining(`was made on another host: cpu: the snapshot's is ${JSON.stringify(cpuHere)}, this host's is "${OTHER_CPU}"`) });
    // The same cache imports under this host's model.
    const ok = await withEnv({ SUPERMACHINE_HOME: home }, () => importSnapshots(cacheDir, [key], trust));
    expect(ok.snapshots.map((s) => s.status)).toEqual(["imported"]);
  }, 300_000);

  it("a frozen build under another CPU model fails with SNAPSHOT_HOST_MISMATCH (found by the recipe key), not 'not baked'", async () => {
    const copy = makeProject("frozen");
    const r = await cli(copy, { SUPERMACHINE_CPU: OTHER_CPU }, "build", "--json", "--frozen", "--cache-from", cacheDir);
    expect(r.status).toBe(1);
    const row = (JSON.parse(r.stdout) as { images: Row[] }).images[0]!;
    console.log(`frozen build under SUPERMACHINE_CPU=${OTHER_CPU}: ${row.error?.message}`);
    expect(row).toMatchObject({ status: "failed", error: { code: "SNAPSHOT_HOST_MISMATCH" } });
    // Its own key (another one: the CPU model is in it) misses; the recipe key finds the image.
    const own = /^snapshot box \(key ([0-9a-f]{16})\) is not in cache /.exec(row.error!.message)?.[1];
    expect(own).toBeDefined();
    expect(own).not.toBe(key.slice(0, 16));
    expect(row.error!.message).toBe(`snapshot box (key ${own}) is not in cache ${cacheDir}; its image there (key ${key.slice(0, 16)}) was made on another host: cpu: the snapshot's is ${JSON.stringify(cpuHere)}, this host's is "${OTHER_CPU}"`);
  }, 300_000);

  it("a build that may bake bakes it under the other model (the guest boots with it), saying why the cache's copy was not used", async () => {
    const copy = makeProject("bake");
    const r = await cli(copy, { SUPERMACHINE_CPU: OTHER_CPU }, "build", "--json", "--cache-from", cacheDir);
    expect(r.status, r.stderr).toBe(0);
    const row = (JSON.parse(r.stdout) as { images: Row[] }).images[0]!;
    expect(row).toMatchObject({ status: "baked", cacheError: { code: "SNAPSHOT_HOST_MISMATCH", message: expect.stringContaining(`cpu: the snapshot's is ${JSON.stringify(cpuHere)}`) } });
    const run = await cli(copy, { SUPERMACHINE_CPU: OTHER_CPU }, "run", "box", "--", "cat", "/srv-box");
    expect(run.stdout).toBe("box\n");
  }, 600_000);

  it("its snapshot directory is not restored under another CPU model: refused before QEMU starts", async () => {
    const opened = await Image.fromSnapshot(snapshotDir); // this host's model: opens
    const before = engineCounters().launched;
    await withEnv({ SUPERMACHINE_CPU: OTHER_CPU }, async () => {
      const err = await Image.fromSnapshot(snapshotDir).catch((e: unknown) => e);
      console.log(`Image.fromSnapshot under SUPERMACHINE_CPU=${OTHER_CPU}: ${(err as Error).message}`);
      expect(err).toMatchObject({ code: "SNAPSHOT_HOST_MISMATCH", message: `snapshot ${snapshotDir} was made on another host: cpu: the snapshot's is ${JSON.stringify(cpuHere)}, this host's is "${OTHER_CPU}"` });
      // An image opened before the model changed: its pool's restore stops before QEMU starts.
      const poolErr = await opened.pool({ min: 1, max: 1 }).catch((e: unknown) => e);
      expect(poolErr).toMatchObject({ code: "SNAPSHOT_HOST_MISMATCH", message: expect.stringContaining("cpu: the snapshot's is") });
    });
    expect(engineCounters().launched).toBe(before);
  }, 300_000);

  it("under another QEMU version (a wrapper that says so) its import and its restore are refused naming qemu", async () => {
    const wrapper = join(work, "qemu-wrapper");
    const real = process.env.SUPERMACHINE_QEMU || "qemu-system-x86_64";
    writeFileSync(wrapper, `#!/bin/sh\nif [ "$1" = "--version" ]; then echo "QEMU emulator version 99.0.0 (a wrapper)"; exit 0; fi\nexec ${real} "$@"\n`);
    chmodSync(wrapper, 0o755);
    const qemuHere = engineFingerprint().qemu;
    await withEnv({ SUPERMACHINE_QEMU: wrapper, SUPERMACHINE_HOME: join(work, "home-wrapper") }, async () => {
      const err = await importSnapshots(cacheDir, [key], trust).catch((e: unknown) => e);
      console.log(`import under the QEMU wrapper: ${(err as Error).message}`);
      expect(err).toMatchObject({ code: "SNAPSHOT_HOST_MISMATCH", message: expect.stringContaining(`qemu: the snapshot's is ${JSON.stringify(qemuHere)}, this host's is "QEMU emulator version 99.0.0 (a wrapper)"`) });
      const before = engineCounters().launched;
      await expect(Image.fromSnapshot(snapshotDir)).rejects.toMatchObject({ code: "SNAPSHOT_HOST_MISMATCH", message: expect.stringContaining('this host\'s is "QEMU emulator version 99.0.0 (a wrapper)"') });
      expect(engineCounters().launched).toBe(before);
    });
  }, 300_000);
});
