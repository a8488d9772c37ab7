/**
 * `supermachine gc`: which snapshots the projects still reference, then the store's collection
 * (src/store/snapshot-gc.ts) and, after it, the blobs and root filesystems nothing uses
 * (src/image/gc.ts).
 *
 * A project references the snapshot of each of its images under the image's current key, as
 * `build --dry-run` computes it. Keying never touches the network here (roots resolve with
 * pullPolicy "never"), and an image that cannot be keyed (its root image is not local, its module
 * does not bundle) keeps every snapshot of its name: gc only removes what it knows is unused.
 */
import { resolve } from "node:path";
import { findConfig, resolveConfigPath } from "../config/discover.js";
import { loadProject } from "../config/loader.js";
import { projectsDir, registeredProjects, withoutRegistration } from "../config/registry.js";
import type { Accel } from "../engine/accel.js";
import type { SupermachineError } from "../errors.js";
import { buildImageGraph } from "../graph/graph.js";
import { keyOf } from "../graph/keys.js";
import { collectGarbage, type GcResult } from "../image/gc.js";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";
import type { LoadedProject } from "../schema/project.js";
import { collectSnapshots, type SnapshotGcResult } from "../store/snapshot-gc.js";
import { buildGraph } from "./build.js";
import { openLock } from "./lock.js";

const log = logger("gc");

export interface GcOptions {
  /** Where to look for the project's config, upward (default: the working directory). */
  cwd?: string;
  /** The project's config file (else found upward from cwd; without one, no project snapshot is removed unless allConfigs). */
  config?: string;
  /** Keep what every registered project references, and collect their snapshots directories too. */
  allConfigs?: boolean;
  /** Also remove snapshots made outside any project (Image.build, vm.snapshot). */
  all?: boolean;
  /** Remove only snapshots older than this. */
  olderThanMs?: number;
  /** List, remove nothing. */
  dryRun?: boolean;
  /** Blobs and root filesystems younger than this are kept (default 1 hour). */
  graceMs?: number;
}

export interface GcReport {
  dryRun: boolean;
  /** The config files whose images' keys were kept. */
  projects: string[];
  /** The snapshot directories collected. */
  dirs: string[];
  snapshots: SnapshotGcResult;
  images: GcResult;
  /** Everything freed (snapshots, blobs, root filesystems), bytes. */
  bytesFreed: number;
  /** Images whose key could not be computed (their snapshots were kept), and similar notes. */
  warnings: string[];
}

interface References {
  keys: Set<string>;
  /** Images that could not be keyed: every snapshot of that name is kept. */
  names: Set<string>;
}

export async function collectProjectGarbage(opts: GcOptions = {}): Promise<GcReport> {
  const cwd = resolve(opts.cwd ?? process.cwd());
  const warnings: string[] = [];
  const refs: References = { keys: new Set(), names: new Set() };
  const projects: LoadedProject[] = [];

  const configPath = opts.config !== undefined ? resolveConfigPath(cwd, opts.config) : findConfig(cwd);
  if (configPath !== undefined) {
    const project = await loadProject({ configFile: configPath, command: "gc" });
    projects.push(project);
    await addReferences(project, refs, warnings);
  }
  const defaultDir = homePaths().snapshots;
  // Directories of registered projects that cannot be loaded: nothing there can be judged.
  const protectedDirs = new Set<string>();
  if (opts.allConfigs) {
    for (const record of await registeredProjects()) {
      if (projects.some((p) => p.configPath === record.config)) continue;
      try {
        // Loading a project to learn its keys is not a use of it: its last-used time stays.
        const project = await withoutRegistration(() => loadProject({ configFile: record.config, command: "gc" }));
        await addReferences(project, refs, warnings);
        projects.push(project);
      } catch (err) {
        const where = record.snapshotsDir ?? defaultDir;
        protectedDirs.add(where);
        warnings.push(
          `the registered project ${record.config} cannot be loaded (${(err as SupermachineError).code ?? "ERROR"}: ${(err as Error).message.split("\n")[0]}): ` +
            `no project snapshot in ${where} is removed; fix it, or remove its record in ${projectsDir()} to forget it`,
        );
      }
    }
  }

  const dirs = [...new Set([...projects.map((p) => p.snapshotsDir ?? defaultDir), defaultDir])];
  if (projects.length === 0) warnings.push("no project here (no supermachine.config.* found, no --config): project snapshots are not collected; --all-configs judges them by every registered project");
  const snapshots = await collectSnapshots({
    dirs,
    protectedDirs,
    ...(projects.length ? { isReferenced: (e: { key: string; name: string }) => refs.keys.has(e.key) || refs.names.has(e.name) } : {}),
    ...(opts.olderThanMs !== undefined ? { createdBefore: Date.now() - opts.olderThanMs } : {}),
    ...(opts.all ? { all: true } : {}),
    ...(opts.dryRun ? { dryRun: true } : {}),
  });

  // Root filesystems are kept while a snapshot anywhere known was made on them.
  const known = [...dirs, ...(await registeredProjects()).map((r) => r.snapshotsDir ?? defaultDir)];
  const images = await collectGarbage(undefined, opts.graceMs, {
    snapshotDirs: known,
    ...(opts.dryRun ? { dryRun: true, ignoreSnapshots: new Set(snapshots.removed.map((s) => s.dir)) } : {}),
  });
  return {
    dryRun: opts.dryRun ?? false,
    projects: projects.map((p) => p.configPath),
    dirs,
    snapshots,
    images,
    bytesFreed: snapshots.bytesFreed + images.bytesFreed,
    warnings,
  };
}

/** The current keys of every image of `project` (under either accelerator: see below). */
async function addReferences(project: LoadedProject, refs: References, warnings: string[]): Promise<void> {
  // Roots resolve from what is local: gc never pulls, and the key depends on the digest, not the policy.
  const images = project.images.map((i) => (i.from === null ? { ...i, definition: { ...i.definition, pullPolicy: "never" as const } } : i));
  const graph = buildImageGraph(images);
  const nodes = await buildGraph(graph, {
    dryRun: true,
    root: project.root,
    lock: await openLock(project), // tags key by their pins, as builds do
    snapshotsDir: project.snapshotsDir ?? homePaths().snapshots,
    ...(project.concurrency ? { concurrency: project.concurrency } : {}),
  });
  // A bake that fell back from KVM to TCG keys its snapshot by the accelerator it ran under,
  // which may not be the one chosen now: keep the keys under the other accelerator too.
  const other = new Map<string, string>();
  for (const n of nodes.values()) {
    if (n.status === "failed" || n.status === "skipped" || !n.key) {
      refs.names.add(n.name);
      warnings.push(`${project.configPath}: image ${n.name} cannot be keyed (${n.error?.message ?? "unknown error"}): its snapshots are kept`);
      continue;
    }
    refs.keys.add(n.key);
    const parentOther = n.parent === null ? null : other.get(n.parent);
    if (parentOther === undefined) continue;
    const accel: Accel = n.inputs.engine.accel === "kvm" ? "tcg" : "kvm";
    const key = keyOf({ ...n.inputs, parent: parentOther, engine: { ...n.inputs.engine, accel } });
    other.set(n.name, key);
    refs.keys.add(key);
  }
  log("%s: %d images keyed", project.configPath, nodes.size);
}
