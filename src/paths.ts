import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { ensurePrivateHome } from "./private.js";

/**
 * Root of everything supermachine keeps outside a repository: build artifacts (kernel, agent),
 * the image store, snapshots and logs. `$SUPERMACHINE_HOME` overrides the default
 * `~/.cache/supermachine` (or `$XDG_CACHE_HOME/supermachine`).
 */
export function supermachineHome(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SUPERMACHINE_HOME) return env.SUPERMACHINE_HOME;
  const cache = env.XDG_CACHE_HOME || join(homedir(), ".cache");
  return join(cache, "supermachine");
}

/**
 * The home's subdirectories. The home itself is made private (0700, tightened if an older
 * version left it open: `src/private.ts`) the first time a process asks for it.
 */
export const homePaths = (home = supermachineHome()) => (ensurePrivateHome(home), {
  home,
  /** Squashfs root filesystems and metadata, by manifest digest. */
  images: join(home, "images"),
  /** Shared blob store (an OCI layout): manifests, configs and layers of pulled images. */
  store: join(home, "store"),
  /** Local names of pulled images: which manifest a registry reference resolved to. */
  refs: join(home, "refs"),
  /** Baked VM snapshots (the default `snapshotsDir`). */
  snapshots: join(home, "snapshots"),
  /** OCI layouts that setup builds offline (the built-in busybox image). */
  builtin: join(home, "builtin"),
  /** Console logs of VMs that failed, kept for diagnosis. */
  logs: join(home, "logs"),
  kernel: join(home, "kernel"),
  agent: join(home, "agent"),
});

/**
 * Short-lived per-VM directories (sockets, console log). Unix socket paths are limited to
 * 107 bytes, so these live under the system temp dir rather than under the home directory.
 */
export function runtimeRoot(env: NodeJS.ProcessEnv = process.env): string {
  return env.SUPERMACHINE_RUNTIME_DIR || tmpdir();
}
