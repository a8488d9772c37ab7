// Local refs: written through store/publish.ts, replaced on every write, nothing else left.
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { listRefs, readRef, removeRef, writeRef, type RefRecord } from "../../src/image/local-names.js";
import { removeDir, tempDir } from "../helpers/image.js";

let home: string;
beforeEach(async () => {
  home = await tempDir("sm-refs-");
});
afterEach(async () => {
  await removeDir(home);
});

const rec = (digit: string): RefRecord => ({
  ref: "docker.io/library/alpine:3",
  manifestDigest: `sha256:${digit.repeat(64)}`,
  source: "registry",
  pulledAt: new Date().toISOString(),
});

describe("refs", () => {
  it("replaces a ref on every write, concurrent writers included, leaving one file", async () => {
    await writeRef(rec("a"), home);
    expect(await readRef("docker.io/library/alpine:3", home)).toMatchObject({ manifestDigest: `sha256:${"a".repeat(64)}`, source: "registry" });
    await Promise.all(["b", "c", "d"].map((d) => writeRef(rec(d), home)));
    const got = await readRef("docker.io/library/alpine:3", home);
    expect(["b", "c", "d"].map((d) => `sha256:${d.repeat(64)}`)).toContain(got?.manifestDigest);
    expect(await readdir(join(home, "refs"))).toHaveLength(1); // no temp, no lock
    expect((await listRefs(home)).map((r) => r.ref)).toEqual(["docker.io/library/alpine:3"]);
    expect(await removeRef("docker.io/library/alpine:3", home)).toBe(true);
    expect(await listRefs(home)).toEqual([]);
  });
});
