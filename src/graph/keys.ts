/**
 * Content keys of graph nodes. A node's key is the hash of its inputs (SnapshotInputs): the
 * parent's key, the root's manifest digest, the canonical build options, the extraFiles by guest
 * path, mode and content, the module bundle, and the engine's fingerprint. The inputs are kept
 * beside the snapshot, so a later key can be compared with them and every difference named. A
 * root's tag resolves by its pin in the project's lockfile; the pin is not a key input (the
 * digest is), but the sources record it, so a changed digest is named `lock:<ref>` when the pin
 * moved.
 */
import { keyOf, stableJson, type EngineFingerprint, type ExtraFileKey, type SnapshotInputs, type SnapshotSources } from "../schema/key.js";
import type { ModuleDigest } from "./bundle.js";
import type { NodeSpec } from "./graph.js";
import { keyedOptions, whyNaming } from "../schema/options.js";

export interface KeyParts {
  parentKey: string | null;
  /** The root's resolved manifest digest (null for a child). */
  manifestDigest: string | null;
  /** The workload command the root image runs (its ENTRYPOINT/CMD, or `cmd`), null if none. */
  workload: string[] | null;
  extraFiles: ExtraFileKey[];
  module: ModuleDigest | null;
  engine: EngineFingerprint;
}

export function nodeInputs(spec: NodeSpec, p: KeyParts): SnapshotInputs {
  return {
    parent: p.parentKey,
    manifestDigest: p.manifestDigest,
    // Every keyed option under its own name, as the option table says (an unset one is left out,
    // so that images without it keep their keys). The order is `why`'s, not the hash's.
    ...keyedOptions(spec, { workload: p.workload, extraFiles: p.extraFiles }),
    module: p.module ? { sha256: p.module.sha256, packages: p.module.packages } : null,
    engine: p.engine,
  };
}

export { keyOf };

export interface InputChange {
  /**
   * `ref`, `image`, `lock:<ref>`, `parent`, `memoryMib`, `extraFiles:/srv/x`, `module`,
   * `module:lib/prepare.ts`, `package:zod`, `engine.qemu`, `engine.cpu`, `engine.machine`, ...;
   * `engine.cpuFlags` has the flags only the last bake's host had (before) and only this one has (after).
   */
  input: string;
  before: unknown;
  after: unknown;
}

/**
 * Names every input that differs between the last bake (`before`) and now (`after`), finest
 * first: a file of the module rather than "module", one extra file rather than "extraFiles".
 */
export function diffInputs(before: { inputs: SnapshotInputs; sources?: SnapshotSources | undefined }, after: { inputs: SnapshotInputs; sources?: SnapshotSources | undefined }): InputChange[] {
  const changes: InputChange[] = [];
  const a = before.inputs as unknown as Record<string, unknown>;
  const b = after.inputs as unknown as Record<string, unknown>;
  const same = (x: unknown, y: unknown) => stableJson(x) === stableJson(y);
  if ((before.sources?.ref ?? null) !== (after.sources?.ref ?? null) && after.sources) {
    changes.push({ input: "ref", before: before.sources?.ref ?? null, after: after.sources.ref });
  }
  const pin = pinChange(before.sources, after.sources);
  for (const k of [...new Set([...Object.keys(a), ...Object.keys(b)])]) {
    if (same(a[k], b[k])) continue;
    switch (k) {
      case "manifestDigest":
        // The same tag, now pinned to another digest: the lockfile moved, not the declaration.
        if (pin && pin.input.after === b[k]) changes.push({ ...pin.input, before: a[k] ?? null });
        else changes.push({ input: "image", before: a[k] ?? null, after: b[k] ?? null });
        break;
      case "parent":
        // A child names its root's moved pin too (its parent's key changed because of it).
        if (pin && b.manifestDigest === null && pin.input.before !== null) changes.push(pin.input);
        changes.push({ input: "parent", before: a[k] ?? null, after: b[k] ?? null });
        break;
      case "module": {
        const x = a[k] as SnapshotInputs["module"];
        const y = b[k] as SnapshotInputs["module"];
        const fx = before.sources?.files ?? {};
        const fy = after.sources?.files ?? {};
        const files = [...new Set([...Object.keys(fx), ...Object.keys(fy)])].sort().filter((f) => fx[f] !== fy[f]);
        for (const f of files) changes.push({ input: `module:${f}`, before: fx[f] ?? null, after: fy[f] ?? null });
        const px = x?.packages ?? {};
        const py = y?.packages ?? {};
        for (const n of [...new Set([...Object.keys(px), ...Object.keys(py)])].sort()) {
          if (px[n] !== py[n]) changes.push({ input: `package:${n}`, before: px[n] ?? null, after: py[n] ?? null });
        }
        if (files.length === 0 && same(px, py)) changes.push({ input: "module", before: x?.sha256 ?? null, after: y?.sha256 ?? null });
        break;
      }
      case "engine": {
        const x = (a[k] ?? {}) as Record<string, unknown>;
        const y = (b[k] ?? {}) as Record<string, unknown>;
        for (const e of [...new Set([...Object.keys(x), ...Object.keys(y)])].sort()) {
          if (same(x[e], y[e])) continue;
          // The host's CPU flags are a long list: named by the flags only one side has.
          if (e === "cpuFlags" && Array.isArray(x[e]) && Array.isArray(y[e])) {
            const bx = new Set(x[e] as string[]);
            const by = new Set(y[e] as string[]);
            changes.push({ input: "engine.cpuFlags", before: [...bx].filter((f) => !by.has(f)), after: [...by].filter((f) => !bx.has(f)) });
          } else changes.push({ input: `engine.${e}`, before: x[e] ?? null, after: y[e] ?? null });
        }
        break;
      }
      default:
        changes.push(...optionChanges(k, a[k], b[k]));
    }
  }
  return changes;
}

/**
 * The pin of the same tag, for the same platform, at another digest now than at the last bake
 * (`lock:<ref>`). A last bake that recorded no pin (made before the image had one) counts as
 * pinned to the digest it was made on, which only a root image's inputs hold: for a root the
 * caller compares that digest, and a child names the pin only when its last bake recorded one.
 */
function pinChange(before: SnapshotSources | undefined, after: SnapshotSources | undefined): { input: InputChange } | undefined {
  const now = after?.pin;
  if (!now || !before || before.ref !== after.ref) return undefined;
  const then = before.pin;
  if (then && (then.platform !== now.platform || then.digest === now.digest)) return undefined;
  return { input: { input: `lock:${after.ref}`, before: then?.digest ?? null, after: now.digest } };
}

/** The changes of one keyed option, named as the option table says: the option, or each entry. */
function optionChanges(input: string, x: unknown, y: unknown): InputChange[] {
  const same = (u: unknown, v: unknown) => stableJson(u) === stableJson(v);
  const naming = whyNaming(input);
  if (naming === undefined) return [{ input, before: x ?? null, after: y ?? null }];
  const entries = (v: unknown): Map<string, unknown> =>
    naming === "entries" ? new Map(Object.entries((v ?? {}) as Record<string, unknown>)) : new Map(((v ?? []) as { guestPath: string }[]).map((f) => [f.guestPath, f]));
  const ex = entries(x);
  const ey = entries(y);
  return [...new Set([...ex.keys(), ...ey.keys()])]
    .sort()
    .filter((e) => !same(ex.get(e), ey.get(e)))
    .map((e) => ({ input: `${input}:${e}`, before: ex.get(e) ?? null, after: ey.get(e) ?? null }));
}
