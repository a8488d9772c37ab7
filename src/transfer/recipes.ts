/**
 * Recipe keys on export: besides its key, a snapshot is recorded under its recipe key (its key
 * without the host's part, src/schema/host.ts), so that a machine of another host whose key
 * misses learns that the cache has the image, and for which host. A child's recipe names its
 * parent's, which the exporter knows from this session or from the parent's entry in the cache.
 */
import { logger } from "../debug.js";
import { recipeKeyOf } from "../schema/host.js";
import type { LoadedSnapshot } from "../store/snapshots.js";
import { ANNOTATIONS, KEY_RE, parseManifest } from "./format.js";

const log = logger("transfer");

/**
 * `snap`'s recipe key, or undefined when its parent's is not known (neither in `known`, keys to
 * recipe keys of this session, nor recorded by the parent's entry that `manifestOf` reads).
 */
export async function recipeOf(snap: LoadedSnapshot, known: Map<string, string>, manifestOf: (key: string) => Promise<Buffer | undefined>, location: string): Promise<string | undefined> {
  const parentKey = snap.meta.inputs.parent;
  if (!parentKey) return recipeKeyOf(snap.meta.inputs, null);
  let parentRecipe = known.get(parentKey);
  if (!parentRecipe) {
    try {
      const bytes = await manifestOf(parentKey);
      const m = bytes ? parseManifest(bytes, `snapshot ${parentKey.slice(0, 16)} in cache ${location}`, "null") : null;
      const r = m?.annotations[ANNOTATIONS.key] === parentKey ? m.annotations[ANNOTATIONS.recipe] : undefined;
      if (r && KEY_RE.test(r)) parentRecipe = r;
    } catch (err) {
      log("the recipe key of %s in %s is not readable: %s", parentKey.slice(0, 16), location, (err as Error).message);
    }
  }
  if (!parentRecipe) {
    log("%s: its parent's recipe key is not known: recorded by key only", snap.dir);
    return undefined;
  }
  return recipeKeyOf(snap.meta.inputs, parentRecipe);
}
