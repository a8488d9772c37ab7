// The file-backed upload journal: entries round-trip, are written atomically and privately,
// expire after a day, and whatever is unreadable, oversized, malformed or of another key reads
// as absent (without hanging on a FIFO or following a symlink).
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { fileUploadJournal, MAX_LOCATION_LENGTH, UPLOAD_JOURNAL_TTL_MS, uploadJournalKey } from "../../src/registry/upload-journal.js";

const dirs: string[] = [];
function journalDir(): string {
  const d = mkdtempSync(join(tmpdir(), "sm-journal-"));
  dirs.push(d);
  return join(d, "uploads");
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const KEY = uploadJournalKey("registry.example:5000", "team/cache", `sha256:${"a".repeat(64)}`);
const LOC = "https://registry.example:5000/v2/team/cache/blobs/uploads/0b5c?_state=abc";
const fileOf = (dir: string, key: string) => join(dir, `${createHash("sha256").update(key).digest("hex")}.json`);

describe("fileUploadJournal", () => {
  it("round-trips a location, one private file per key, no temp left behind", async () => {
    const dir = journalDir();
    const j = fileUploadJournal(dir);
    expect(await j.get(KEY)).toBeUndefined();
    await j.set(KEY, LOC);
    await j.set(KEY, `${LOC}2`); // replaced, not appended
    expect(await j.get(KEY)).toBe(`${LOC}2`);
    expect(await fileUploadJournal(dir).get(KEY)).toBe(`${LOC}2`);
    expect(readdirSync(dir)).toEqual([fileOf(dir, KEY).slice(dir.length + 1)]);
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(statSync(fileOf(dir, KEY)).mode & 0o777).toBe(0o600);
    await j.delete(KEY);
    await j.delete(KEY); // idempotent
    expect(await j.get(KEY)).toBeUndefined();
    expect(readdirSync(dir)).toEqual([]);
  });

  it("keys are separate", async () => {
    const j = fileUploadJournal(journalDir());
    const other = uploadJournalKey("registry.example:5000", "team/cache", `sha256:${"b".repeat(64)}`);
    await j.set(KEY, LOC);
    expect(await j.get(other)).toBeUndefined();
    await j.set(other, `${LOC}-b`);
    expect(await j.get(KEY)).toBe(LOC);
    expect(await j.get(other)).toBe(`${LOC}-b`);
  });

  it("ignores and removes an entry older than a day; sweeps old ones of other keys on the next write", async () => {
    let now = 1_000_000_000_000;
    const dir = journalDir();
    const j = fileUploadJournal(dir, { now: () => now });
    await j.set(KEY, LOC);
    now += UPLOAD_JOURNAL_TTL_MS - 1000;
    expect(await j.get(KEY)).toBe(LOC);
    now += 2000;
    expect(await j.get(KEY)).toBeUndefined();
    expect(existsSync(fileOf(dir, KEY))).toBe(false);

    // A stale entry and a stale temp (a writer killed mid-write), by file time.
    const old = fileOf(dir, "some other key");
    writeFileSync(old, JSON.stringify({ key: "some other key", location: LOC, at: Date.now() }));
    const tmp = join(dir, `.${"c".repeat(64)}.0123456789ab.tmp`);
    writeFileSync(tmp, "{");
    const longAgo = new Date(Date.now() - 2 * UPLOAD_JOURNAL_TTL_MS);
    utimesSync(old, longAgo, longAgo);
    utimesSync(tmp, longAgo, longAgo);
    const fresh = fileUploadJournal(dir);
    await fresh.set(KEY, LOC);
    expect(readdirSync(dir)).toEqual([fileOf(dir, KEY).slice(dir.length + 1)]);
  });

  it("an entry dated far in the future is not trusted either", async () => {
    const dir = journalDir();
    await fileUploadJournal(dir, { now: () => Date.now() + 10 * UPLOAD_JOURNAL_TTL_MS }).set(KEY, LOC);
    expect(await fileUploadJournal(dir).get(KEY)).toBeUndefined();
  });

  it("reads junk as absent", async () => {
    const dir = journalDir();
    mkdirSync(dir, { recursive: true });
    const j = fileUploadJournal(dir);
    const at = Date.now();
    const cases: unknown[] = [
      "not json",
      "",
      "null",
      "[]",
      JSON.stringify({ key: KEY }),
      JSON.stringify({ key: "another key", location: LOC, at }),
      JSON.stringify({ key: KEY, location: 42, at }),
      JSON.stringify({ key: KEY, location: LOC, at: "yesterday" }),
      JSON.stringify({ key: KEY, location: "file:///etc/passwd", at }),
      JSON.stringify({ key: KEY, location: "/v2/relative/only", at }),
      JSON.stringify({ key: KEY, location: "https://user:secret@registry.example/v2/x", at }),
      JSON.stringify({ key: KEY, location: `https://registry.example/${"x".repeat(MAX_LOCATION_LENGTH)}`, at }),
      JSON.stringify({ key: KEY, location: LOC, at, pad: "x".repeat(20_000) }), // oversized file
    ];
    for (const text of cases) {
      writeFileSync(fileOf(dir, KEY), text as string);
      expect(await j.get(KEY), String(text).slice(0, 80)).toBeUndefined();
    }
    // set refuses to record junk too.
    rmSync(fileOf(dir, KEY));
    await j.set(KEY, "javascript:alert(1)");
    expect(existsSync(fileOf(dir, KEY))).toBe(false);
  });

  it("does not follow a symlink, nor hang on a FIFO or read a directory", async () => {
    const dir = journalDir();
    mkdirSync(dir, { recursive: true });
    const j = fileUploadJournal(dir);
    const elsewhere = join(dir, "..", "target.json");
    writeFileSync(elsewhere, JSON.stringify({ key: KEY, location: LOC, at: Date.now() }));
    symlinkSync(elsewhere, fileOf(dir, KEY));
    expect(await j.get(KEY)).toBeUndefined();
    rmSync(fileOf(dir, KEY));
    execFileSync("mkfifo", [fileOf(dir, KEY)]);
    expect(await j.get(KEY)).toBeUndefined();
    rmSync(fileOf(dir, KEY));
    mkdirSync(fileOf(dir, KEY));
    expect(await j.get(KEY)).toBeUndefined();
    // Replacing the symlink with an entry leaves its target alone.
    rmSync(fileOf(dir, KEY), { recursive: true });
    symlinkSync(elsewhere, fileOf(dir, KEY));
    await j.set(KEY, `${LOC}-new`);
    expect(await j.get(KEY)).toBe(`${LOC}-new`);
    expect(JSON.parse(readFileSync(elsewhere, "utf8")).location).toBe(LOC);
  });

  it("concurrent writers of one key leave one whole entry", async () => {
    const dir = journalDir();
    const locations = Array.from({ length: 20 }, (_, i) => `${LOC}&n=${i}`);
    await Promise.all(locations.map((l) => fileUploadJournal(dir).set(KEY, l)));
    expect(locations).toContain(await fileUploadJournal(dir).get(KEY));
    expect(readdirSync(dir)).toHaveLength(1);
  });
});
