// Quarantine (src/store/quarantine.ts): a damaged entry, a directory or a file, is moved aside
// with a note saying where from and why, and kept for a bounded time and number. Real files.
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { mkdir, mkdtemp, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { listQuarantine, pruneQuarantine, quarantine, QUARANTINE_DIR, QUARANTINE_KEEP, QUARANTINE_TTL_MS } from "../../src/store/quarantine.js";

let root: string;
beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), "sm-quarantine-"));
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

describe("quarantine", () => {
  it("moves a directory and a file aside with a note each, private to the owner", async () => {
    await mkdir(join(root, "snap"));
    await writeFile(join(root, "snap", "ram"), "bad");
    await writeFile(join(root, "blob"), "bad blob");
    const d = await quarantine(join(root, "snap"), "its RAM differs");
    const f = await quarantine(join(root, "blob"), "its content hashes to something else");
    expect(existsSync(join(root, "snap"))).toBe(false);
    expect(existsSync(join(root, "blob"))).toBe(false);
    expect(readFileSync(join(d, "ram"), "utf8")).toBe("bad");
    expect(JSON.parse(readFileSync(join(d, "QUARANTINED.json"), "utf8"))).toMatchObject({ from: join(root, "snap"), reason: "its RAM differs" });
    expect(JSON.parse(readFileSync(`${f}.QUARANTINED.json`, "utf8"))).toMatchObject({ from: join(root, "blob"), reason: "its content hashes to something else" });
    expect(statSync(join(root, QUARANTINE_DIR)).mode & 0o777).toBe(0o700);
    expect((await listQuarantine(join(root, QUARANTINE_DIR))).map((e) => e.path).sort()).toEqual([d, f].sort());
  });

  it("keeps at most QUARANTINE_KEEP entries and none older than QUARANTINE_TTL_MS (by its note, or its mtime without one)", async () => {
    const qdir = join(root, QUARANTINE_DIR);
    const old = new Date(Date.now() - QUARANTINE_TTL_MS - 60_000);
    // One expired by its note, one expired without a note (its mtime), then fresh ones.
    await mkdir(join(qdir, "expired-noted"), { recursive: true });
    await writeFile(join(qdir, "expired-noted", "QUARANTINED.json"), JSON.stringify({ from: "x", reason: "r", at: old.toISOString() }));
    await writeFile(join(qdir, "expired-unnoted"), "x");
    await utimes(join(qdir, "expired-unnoted"), old, old);
    for (let i = 0; i < 3; i++) {
      await writeFile(join(root, `e${i}`), String(i));
      await quarantine(join(root, `e${i}`), `damaged ${i}`);
    }
    const names = readdirSync(qdir);
    expect(names.some((n) => n.startsWith("expired"))).toBe(false);
    for (let i = 3; i < QUARANTINE_KEEP + 4; i++) {
      await writeFile(join(root, `e${i}`), String(i));
      await quarantine(join(root, `e${i}`), `damaged ${i}`);
      await new Promise((r) => setTimeout(r, 2)); // distinct times: "newest" is well defined
    }
    const kept = await listQuarantine(qdir);
    expect(kept).toHaveLength(QUARANTINE_KEEP);
    expect(kept[0]!.note!.reason).toBe(`damaged ${QUARANTINE_KEEP + 3}`); // the newest are the ones kept
    expect(readdirSync(qdir).filter((n) => n.endsWith(".QUARANTINED.json"))).toHaveLength(QUARANTINE_KEEP); // notes go with their entries
    expect(await pruneQuarantine(qdir)).toBe(0);
    expect(await pruneQuarantine(qdir, Date.now() + QUARANTINE_TTL_MS + 1)).toBe(QUARANTINE_KEEP);
    expect(readdirSync(qdir)).toEqual([]);
  });
});
