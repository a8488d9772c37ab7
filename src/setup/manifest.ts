/**
 * The install manifest: where the runtime finds the kernel and the agent setup built or found,
 * `<home>/installs/<hash of the package's guest sources>.json` (src/engine/artifacts.ts reads
 * it). Never written into the package, which may be installed by root and read-only to its users.
 *
 * A setup run with SUPERMACHINE_HOME pointing elsewhere than the default home also records its
 * home in the default home (`installs/<hash>.homes.json`), so that a process with yet another,
 * scratch SUPERMACHINE_HOME (tests make many) finds the guest through the home setup used.
 */
import { existsSync, readFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { dirname } from "node:path";
import { installManifestPath, installHomesPath, readInstallHomes } from "../engine/artifacts.js";
import { SetupError } from "../errors.js";
import { writeFileSynced } from "../store/durable.js";
import { publish } from "../store/publish.js";
import { agentVersion, type Plans } from "./artifacts.js";
import type { SetupContext } from "./context.js";

export interface InstallManifest {
  kernel?: string;
  kernelKey?: string;
  initramfs?: string;
  agentBinary?: string;
  agentKey?: string;
  agentVersion?: string;
}

/** What the manifest records for these plans (an explicit path is left out: the engine reads the variable itself). */
export function manifestFor(ctx: SetupContext, p: Plans): InstallManifest {
  const k = p.kernel;
  const a = p.agent;
  return {
    ...(k.source === "env" ? {} : { kernel: k.path, kernelKey: k.key! }),
    ...(a.source === "env" ? {} : { initramfs: a.path, agentBinary: a.binary!, agentKey: a.key!, agentVersion: a.version ?? agentVersion(ctx.root) }),
  };
}

export const manifestText = (m: InstallManifest): string => JSON.stringify(m, null, 2) + "\n";

/** Writes `text` at `path` unless it holds it already: atomically, fsynced, under the entry's lock. */
async function writeEntry(path: string, text: string, what: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  await publish({
    target: path,
    kind: "file",
    what,
    synced: true,
    check: async () => (existsSync(path) && readFileSync(path, "utf8") === text ? true : undefined),
    write: async (tmp) => {
      await writeFileSynced(tmp, text);
      return true;
    },
  });
}

export async function writeManifest(ctx: SetupContext, m: InstallManifest): Promise<void> {
  const path = installManifestPath(ctx.root, process.env);
  try {
    await writeEntry(path, manifestText(m), "the install manifest");
  } catch (err) {
    throw new SetupError("SETUP_MANIFEST_WRITE", `cannot write ${path}: ${(err as Error).message}`, {
      hint: `check that ${ctx.home} is writable by this user, or set SUPERMACHINE_HOME to a directory that is`,
      cause: err,
    });
  }
  if (ctx.home !== ctx.defaultHome) await recordHome(ctx);
}

/**
 * Adds this run's home to the default home's list of homes with a guest (most recent first), so
 * that scratch homes find it. Best effort: a default home this user cannot write is reported, and
 * such a scratch home then needs SUPERMACHINE_KERNEL/SUPERMACHINE_INITRAMFS or a setup of its own.
 */
async function recordHome(ctx: SetupContext): Promise<void> {
  const defaults = { ...process.env, SUPERMACHINE_HOME: ctx.defaultHome };
  const path = installHomesPath(ctx.root, defaults);
  const homes = [ctx.home, ...readInstallHomes(path).filter((h) => h !== ctx.home)].slice(0, 16);
  try {
    await writeEntry(path, JSON.stringify(homes, null, 2) + "\n", "the list of homes with a guest");
  } catch (err) {
    ctx.note(`could not record ${ctx.home} in ${path} (${(err as Error).message}): processes with another SUPERMACHINE_HOME will not find this guest`);
  }
}
