// Host identity through a directory cache, on snapshots made without a VM: export records each
// snapshot under its recipe key too; an import refuses a snapshot of another host by name
// (SNAPSHOT_HOST_MISMATCH), an entry of an older version without the new fields the same way,
// and one whose fields are not strings as invalid; and a key that misses while its recipe is
// there for another host says so instead of reporting the snapshot missing.
import { existsSync, readdirSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { engineFingerprint } from "../../src/engine/fingerprint.js";
import { importSnapshots } from "../../src/project/cache.js";
import { homePaths } from "../../src/paths.js";
import { recipeKeyOf } from "../../src/schema/host.js";
import type { LoadedSnapshot } from "../../src/store/snapshots.js";
import { exportSnapshots } from "../../src/transfer/index.js";
import { generateSigningKey, readSigningKey } from "../../src/transfer/sign.js";
import { keyOfConfig, manifestOf, readIndex, rewriteEntry } from "../helpers/transfer-format.js";
import { cleanup, fakeImage, fakeSnapshot, inHome, signed, SIGNING, tempDir, trusted } from "../helpers/transfer.js";

const src = tempDir("sm-identity-src-");
let parent: LoadedSnapshot;
let child: LoadedSnapshot;

beforeAll(async () => {
  await inHome(src, async () => {
    const image = fakeImage();
    parent = await fakeSnapshot({ name: "base", image, chunks: [1, 5, 9] });
    child = await fakeSnapshot({ name: "app", image, parent, chunks: [2, 7] });
  });
});
afterAll(cleanup);

const here = () => engineFingerprint();
const nothingPublished = () => expect(existsSync(homePaths().snapshots) ? readdirSync(homePaths().snapshots) : []).toEqual([]);

describe("host identity in a directory cache", () => {
  it("records each snapshot under its recipe key too: a child's names its parent's recipe", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [child, parent], signed);
    const parentRecipe = recipeKeyOf(parent.meta.inputs, null);
    const childRecipe = recipeKeyOf(child.meta.inputs, parentRecipe);
    expect(manifestOf(cache, parent.meta.hash).annotations["dev.supermachine.recipe"]).toBe(parentRecipe);
    expect(manifestOf(cache, child.meta.hash).annotations["dev.supermachine.recipe"]).toBe(childRecipe);
    expect(readIndex(cache).manifests.map((m) => m.annotations["dev.supermachine.recipe"])).toEqual([parentRecipe, childRecipe]);
    // A fingerprint carries the host's machine type and CPU model now.
    expect(parent.meta.inputs.engine).toMatchObject({ machine: "microvm", cpu: expect.any(String) });

    // The child alone into a new cache whose parent entry is there: its recipe still names the parent's.
    const again = tempDir("sm-cache-");
    await exportSnapshots(again, [parent], signed);
    await exportSnapshots(again, [child], signed);
    expect(manifestOf(again, child.meta.hash).annotations["dev.supermachine.recipe"]).toBe(childRecipe);
  });

  it("refuses a snapshot made with another CPU model, naming the field and both values", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], signed);
    const key = rewriteEntry(cache, parent.meta.hash, (config, m) => {
      config.snapshot.inputs.engine.cpu = "Skylake-Server-v4,enforce";
      m.annotations["dev.supermachine.engine"] = JSON.stringify(config.snapshot.inputs.engine);
      config.snapshot.hash = keyOfConfig(config.snapshot);
      return config.snapshot.hash;
    }, SIGNING);
    await inHome(tempDir("sm-home-"), async () => {
      const err = await importSnapshots(cache, [key], trusted).catch((e: unknown) => e);
      expect(err).toMatchObject({
        code: "SNAPSHOT_HOST_MISMATCH",
        message: expect.stringContaining(`was made on another host: cpu: the snapshot's is "Skylake-Server-v4,enforce", this host's is ${JSON.stringify(here().cpu)}`),
        hint: expect.stringContaining("SUPERMACHINE_CPU"),
      });
      nothingPublished();
    });
  });

  it("refuses an entry of an older version (no machine, no cpu) as another host's; one with a machine that is not a string as invalid", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], signed);
    const old = rewriteEntry(cache, parent.meta.hash, (config) => {
      const e = config.snapshot.inputs.engine as unknown as Record<string, unknown>;
      delete e.machine;
      delete e.cpu;
      delete e.cpuFlags;
      config.snapshot.hash = keyOfConfig(config.snapshot);
      return config.snapshot.hash;
    }, SIGNING);
    await inHome(tempDir("sm-home-"), async () => {
      const err = await importSnapshots(cache, [old], trusted).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "SNAPSHOT_HOST_MISMATCH", message: expect.stringContaining(`machine: the snapshot's is (not recorded), this host's is "microvm"; cpu: the snapshot's is (not recorded), this host's is ${JSON.stringify(here().cpu)}`) });
      nothingPublished();
    });
    const bad = rewriteEntry(cache, old, (config) => {
      (config.snapshot.inputs.engine as unknown as Record<string, unknown>).machine = 42;
      config.snapshot.hash = keyOfConfig(config.snapshot);
      return config.snapshot.hash;
    }, SIGNING);
    await inHome(tempDir("sm-home-"), async () => {
      const err = await importSnapshots(cache, [bad], trusted).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "CACHE_CONFIG_INVALID", message: expect.stringContaining("snapshot.inputs.engine.machine or cpu is not a string") });
    });
  });

  it("explains a miss by the recipe key: the cache has the image for another QEMU (signed by a trusted key only)", async () => {
    const cache = tempDir("sm-cache-");
    await exportSnapshots(cache, [parent], signed);
    const recipe = recipeKeyOf(parent.meta.inputs, null);
    // The entry becomes another host's: this host's key is no longer in the cache, its recipe is.
    rewriteEntry(cache, parent.meta.hash, (config, m) => {
      config.snapshot.inputs.engine.qemu = "QEMU emulator version 9.9.9 (elsewhere)";
      m.annotations["dev.supermachine.engine"] = JSON.stringify(config.snapshot.inputs.engine);
      config.snapshot.hash = keyOfConfig(config.snapshot);
      return config.snapshot.hash;
    }, SIGNING);
    await inHome(tempDir("sm-home-"), async () => {
      const recipes = new Map([[parent.meta.hash, recipe]]);
      const err = await importSnapshots(cache, [parent.meta.hash], { ...trusted, recipes }).catch((e: unknown) => e);
      expect(err).toMatchObject({
        code: "SNAPSHOT_HOST_MISMATCH",
        message: expect.stringMatching(new RegExp(`^snapshot base \\(key ${parent.meta.hash.slice(0, 16)}\\) is not in cache .*; its image there \\(key [0-9a-f]{16}\\) was made on another host: qemu: the snapshot's is "QEMU emulator version 9\\.9\\.9 \\(elsewhere\\)", this host's is `)),
      });
      nothingPublished();
      // Without its recipe, or when no trusted key signed the entry of that recipe: a plain miss.
      expect((await importSnapshots(cache, [parent.meta.hash], trusted)).snapshots[0]!.status).toBe("missing");
      const stranger = readSigningKey(generateSigningKey().privatePem, "another key");
      expect((await importSnapshots(cache, [parent.meta.hash], { trust: [stranger.publicKey], recipes })).snapshots[0]!.status).toBe("missing");
      // A project that imports unsigned entries (trust "unsigned") gets the explanation too.
      const unsigned = await importSnapshots(cache, [parent.meta.hash], { trust: "unsigned", recipes }).catch((e: unknown) => e);
      expect(unsigned).toMatchObject({ code: "SNAPSHOT_HOST_MISMATCH" });
    });
  });
});
