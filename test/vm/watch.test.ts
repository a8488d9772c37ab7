// Watch mode on real bakes: an edit to a helper one warmup imports rebakes exactly the images
// it affects, within seconds; a pool from loadPools({ watch: true }) hands out the new state to
// later acquires while a VM already handed out keeps the old one, whose snapshot goes once
// nothing uses it; an invalid edit keeps the last good graph; the CLI prints one event per line.
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ProjectWatcher, type WatchEvent, type WatchRound } from "../../src/project/watch.js";
import type { WatchEvent as PublicWatchEvent } from "../../src/index.js";
import { loadPools } from "../../src/index.js";
import { waitFor } from "../helpers/vm.js";

const root = join(import.meta.dirname, "..", "..");
const work = mkdtempSync(join(tmpdir(), "sm-watch-test-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** A project: a busybox base and two children, each importing its own helper. */
function makeProject(name: string): string {
  const dir = join(work, name);
  mkdirSync(join(dir, "images"), { recursive: true });
  mkdirSync(join(dir, "lib"), { recursive: true });
  writeFileSync(
    join(dir, "supermachine.config.ts"),
    `import { defineConfig } from "supermachine/config";
export default defineConfig({ images: ["./images/*.ts"], snapshotsDir: "./.snapshots", pools: { a: { image: "child-a", min: 1, max: 2 } } });
`,
  );
  writeFileSync(join(dir, "images/base.ts"), `import { defineImage } from "supermachine/config";\nexport default defineImage({ ref: "builtin:busybox" });\n`);
  for (const c of ["a", "b"]) {
    writeFileSync(
      join(dir, `images/child-${c}.ts`),
      `import { defineImage } from "supermachine/config";
import { warm } from "../lib/${c}";
export default defineImage({ from: "base", warmup: warm });
`,
    );
    setHelper(dir, c, `${c}-v1`);
  }
  return dir;
}

function setHelper(dir: string, c: string, text: string): void {
  writeFileSync(
    join(dir, `lib/${c}.ts`),
    `import type { WarmupVm } from "supermachine";
export async function warm(vm: WarmupVm): Promise<void> {
  await vm.exec({ argv: ["sh", "-c", "echo ${text} > /srv-${c}"] });
}
`,
  );
}

function nextRound(w: ProjectWatcher): Promise<{ ok: true; round: WatchRound } | { ok: false; error: Error }> {
  return new Promise((resolve) => {
    const on = (e: WatchEvent) => {
      if (e.type === "round-done") resolve({ ok: true, round: e.round });
      else if (e.type === "round-failed") resolve({ ok: false, error: e.error });
      else return;
      w.off("event", on);
    };
    w.on("event", on);
  });
}

describe("watch mode", () => {
  it("rebakes exactly what an edit affects; an invalid edit keeps the last good graph", async () => {
    const dir = makeProject("engine");
    const w = new ProjectWatcher({ cwd: dir, debounceMs: 100 });
    const first = await w.start();
    try {
      expect([...first.nodes.values()].map((n) => n.status)).toEqual(["baked", "baked", "baked"]);
      const t0 = Date.now();
      const round = nextRound(w);
      setHelper(dir, "a", "a-v2");
      const r = await round;
      expect(r.ok).toBe(true);
      if (!r.ok) return;
      expect(Date.now() - t0).toBeLessThan(15_000);
      expect(r.round.rekeyed).toEqual(["child-a"]);
      expect(Object.fromEntries([...r.round.nodes.values()].map((n) => [n.name, n.status]))).toEqual({ base: "cached", "child-a": "baked", "child-b": "cached" });
      expect(r.round.changed).toEqual([join(dir, "lib/a.ts")]);

      const broken = nextRound(w);
      writeFileSync(join(dir, "lib/b.ts"), "export async function warm( {\n");
      const b = await broken;
      expect(b.ok).toBe(false);
      expect(w.current!.nodes.get("child-b")!.status).toBe("cached"); // the last good graph
      const fixed = nextRound(w);
      setHelper(dir, "b", "b-v2");
      const f = await fixed;
      expect(f.ok && f.round.rekeyed).toEqual(["child-b"]);

      // An edit while a round bakes queues one more round; rounds never overlap.
      const seen: WatchEvent[] = [];
      const record = (e: WatchEvent) => seen.push(e);
      w.on("event", record);
      setHelper(dir, "a", "a-v3");
      await waitFor(() => seen.some((e) => e.type === "round-start"), 10_000);
      setHelper(dir, "b", "b-v3");
      await waitFor(() => seen.filter((e) => e.type === "round-done").length >= 2, 30_000);
      w.off("event", record);
      // Two rounds, one after the other (whether the first already saw the second edit depends on
      // when it read the helper); each image baked once in all.
      expect(seen.filter((e) => e.type === "round-start" || e.type === "round-done").map((e) => e.type)).toEqual(["round-start", "round-done", "round-start", "round-done"]);
      const dones = seen.filter((e): e is Extract<WatchEvent, { type: "round-done" }> => e.type === "round-done");
      const bakes = dones.flatMap((d) => [...d.round.nodes.values()].filter((n) => n.status === "baked").map((n) => n.name)).sort();
      expect(bakes).toEqual(["child-a", "child-b"]);
    } finally {
      await w.close();
    }
  });

  it("switches a pool to the rebaked snapshot for later acquires; VMs handed out keep theirs", async () => {
    const dir = makeProject("pools");
    const events: PublicWatchEvent[] = [];
    const pools = await loadPools({ cwd: dir, watch: true, onWatchEvent: (e) => events.push(e) });
    try {
      const old = await pools.a!.acquire();
      expect((await old.exec({ argv: ["cat", "/srv-a"] })).stdout.toString()).toBe("a-v1\n");
      const oldSnapshot = events.find((e): e is Extract<WatchEvent, { type: "ready" }> => e.type === "ready")!.round.nodes.get("child-a")!.dir;
      setHelper(dir, "a", "a-v2");
      // Later acquires get the new state once the round is done.
      expect(
        await waitFor(() => events.some((e) => e.type === "round-done" && e.round.rekeyed.includes("child-a")), 20_000),
      ).toBe(true);
      let fresh = "";
      const end = Date.now() + 15_000;
      while (Date.now() < end) {
        const vm = await pools.a!.acquire();
        fresh = (await vm.exec({ argv: ["cat", "/srv-a"] })).stdout.toString();
        await vm.release();
        if (fresh === "a-v2\n") break;
        await new Promise((r) => setTimeout(r, 200));
      }
      expect(fresh).toBe("a-v2\n");
      // The VM handed out before the switch still runs on the old snapshot, which is kept.
      expect((await old.exec({ argv: ["cat", "/srv-a"] })).stdout.toString()).toBe("a-v1\n");
      expect(existsSync(oldSnapshot)).toBe(true);
      await old.release();
      // Nothing uses the old snapshot now: it is removed.
      expect(await waitFor(() => !existsSync(oldSnapshot), 10_000)).toBe(true);
    } finally {
      await pools.close();
    }
  });

  it("prints one JSON event per line from the CLI", async () => {
    const dir = makeProject("cli");
    const p = spawn(process.execPath, [join(root, "dist/src/cli/main.js"), "watch", "--json", "--debounce", "100"], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
    const lines: Record<string, unknown>[] = [];
    let buf = "";
    p.stdout.on("data", (c: Buffer) => {
      buf += c.toString();
      let i: number;
      while ((i = buf.indexOf("\n")) >= 0) {
        lines.push(JSON.parse(buf.slice(0, i)) as Record<string, unknown>);
        buf = buf.slice(i + 1);
      }
    });
    try {
      expect(await waitFor(() => lines.some((l) => l.type === "ready"), 60_000)).toBe(true);
      setHelper(dir, "b", "b-v9");
      expect(await waitFor(() => lines.some((l) => l.type === "round-done"), 30_000)).toBe(true);
      const done = lines.find((l) => l.type === "round-done") as { rekeyed: string[]; changed: string[] };
      expect(done.rekeyed).toEqual(["child-b"]);
      expect(lines.some((l) => l.type === "change")).toBe(true);
    } finally {
      p.kill("SIGINT");
    }
    const code = await new Promise<number | null>((r) => p.on("exit", (c) => r(c)));
    expect(code).toBe(0);
  });
});
