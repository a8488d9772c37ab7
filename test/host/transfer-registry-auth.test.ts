// Pushing to a registry with token auth: credentials from the Docker config, a token for
// pull,push; anonymous pushes are refused by name.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { clearTokenCache } from "../../src/registry/auth.js";
import { exportSnapshots } from "../../src/transfer/index.js";
import { importSnapshots } from "../../src/project/cache.js";
import { cleanupTemps, PASS, startRegistry, USER, writeDockerConfig, type Registry } from "../helpers/registry.js";
import { cleanup, fakeImage, fakeSnapshot, inHome, tempDir , signed, trusted } from "../helpers/transfer.js";

let reg: Registry;
let snap: LoadedSnapshot;

beforeAll(async () => {
  reg = await startRegistry("token");
  snap = await inHome(tempDir("sm-transfer-src-"), async () => fakeSnapshot({ name: "base", image: fakeImage(), chunks: [1, 2, 3] }));
});
afterAll(async () => {
  await reg?.stop();
  cleanup();
  cleanupTemps();
});

describe("a registry cache with token auth", () => {
  it("pushes with the Docker config's credentials, asking for pull,push", async () => {
    clearTokenCache();
    const dockerConfig = writeDockerConfig({ auths: { [reg.host]: { auth: Buffer.from(`${USER}:${PASS}`).toString("base64") } } });
    const repo = `${reg.host}/team/cache`;
    const r = await exportSnapshots(repo, [snap], { registry: { dockerConfig }, ...signed });
    expect(r.snapshots[0]!.status).toBe("exported");
    expect(reg.tokenRequests.some((t) => t.user === USER && t.scopes.includes("repository:team/cache:pull,push"))).toBe(true);
    const again = await exportSnapshots(repo, [snap], { registry: { dockerConfig }, ...signed });
    expect(again.snapshots[0]!.status).toBe("present");
    await inHome(tempDir("sm-home-"), async () => {
      const i = await importSnapshots(repo, [snap.meta.hash], { registry: { dockerConfig }, ...trusted });
      expect(i.snapshots[0]!.status).toBe("imported");
    });
  });

  it("refuses an anonymous push, naming the registry and repository", async () => {
    clearTokenCache();
    const dockerConfig = writeDockerConfig({ auths: {} });
    await expect(exportSnapshots(`${reg.host}/team/other`, [snap], { registry: { dockerConfig }, ...signed })).rejects.toMatchObject({
      code: "REGISTRY_UNAUTHORIZED",
      message: expect.stringContaining("team/other"),
    });
  });
});
