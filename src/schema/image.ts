/**
 * Shapes shared by the image, registry, store and runtime layers (pure types, no code): an
 * image's config as supermachine keeps it, and the progress events of a build.
 */

/** The parts of an OCI image config that supermachine uses. */
export interface ImageConfig {
  env: string[];
  entrypoint?: string[];
  cmd?: string[];
  workingDir?: string;
  user?: string;
  exposedPorts: string[];
  labels: Record<string, string>;
}

/** Progress of a registry pull. */
export type PullProgress =
  | { type: "manifest"; ref: string }
  | { type: "config"; digest: string; cached: boolean }
  | { type: "layer"; digest: string; index: number; count: number; bytes: number; total: number; cached: boolean }
  | { type: "done"; bytes: number };

/** The process that holds a store lock a build waits for (from the lock's owner record). */
export interface LockHolder {
  pid: number;
  host: string;
  /** ISO time it took the lock. */
  since: string;
  /** The lock file. */
  lock: string;
}

/** Progress of resolving an image into a root filesystem. */
export type ImageProgress =
  | { phase: "cached" }
  | { phase: "waiting-for-lock"; what: string; holder?: LockHolder }
  | { phase: "pull"; event: PullProgress }
  | { phase: "import"; file: string }
  | { phase: "scan-layer" | "copy-layer"; layer: number; layers: number; digest: string }
  | { phase: "squashfs" }
  | { phase: "done"; durationMs: number; sizeBytes: number };

/** Steps of a bake, in order. */
export type BakeStep = "boot" | "extra-files" | "warmup" | "listener" | "capture" | "handoff";

/** Progress of baking a snapshot. */
export type BakeProgress =
  | { phase: "bake-cached"; snapshot: string }
  | { phase: "bake-waiting-for-lock"; snapshot: string; holder?: LockHolder }
  /** The snapshot there was damaged: moved to `quarantine` (kept for inspection), then rebaked. */
  | { phase: "bake-damaged"; snapshot: string; reason: string; quarantine: string | undefined }
  /** The snapshot cache could not give this image's snapshot (`code`: a CACHE_ or REGISTRY_ code): it is baked instead. */
  | { phase: "cache-refused"; code: string; reason: string }
  | { phase: "bake"; step: BakeStep; snapshot: string }
  | { phase: "bake-done"; snapshot: string; durationMs: number };

/** Everything `Image.build`'s `onProgress` receives. */
export type BuildProgress = ImageProgress | BakeProgress;
