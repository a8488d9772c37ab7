/**
 * The projects this machine has loaded, so that `supermachine gc --all-configs` can keep what
 * every one of them references. Each `loadProject` writes `$SUPERMACHINE_HOME/projects/<sha256 of
 * the config path>.json`: the config's path, its snapshots directory and when it was last loaded.
 * A record whose config file is gone is dropped by whoever lists the records.
 *
 * Registration is best effort: a home that cannot be written must not fail a build.
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { readdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { logger } from "../debug.js";
import { homePaths } from "../paths.js";

const log = logger("config");

export interface ProjectRecord {
  /** Absolute (real) path of the config file. */
  config: string;
  /** The project's snapshots directory (absolute), or null for the default one. */
  snapshotsDir: string | null;
  /** ISO time of the last load (gc's own loads do not count). */
  lastUsed: string;
}

/** Where the records live. */
export const projectsDir = (home?: string): string => join(homePaths(home).home, "projects");

const recordFile = (config: string, home?: string) => join(projectsDir(home), `${createHash("sha256").update(config).digest("hex")}.json`);

/** A record is rewritten at most this often when nothing but its time changed (watch mode loads often). */
const REFRESH_MS = 60_000;

let quiet = 0;

/**
 * Records that the project at `config` was loaded now. Called by loadProject; does nothing inside
 * `withoutRegistration` (gc loads other projects to learn their keys, which is not a use).
 */
export function registerProject(config: string, snapshotsDir: string | null, home?: string): void {
  if (quiet > 0) return;
  const file = recordFile(config, home);
  try {
    const old = readRecord(readFileSync(file, "utf8"));
    if (old && old.config === config && old.snapshotsDir === snapshotsDir && Date.now() - Date.parse(old.lastUsed) < REFRESH_MS) return;
  } catch {
    /* no record yet */
  }
  const record: ProjectRecord = { config, snapshotsDir, lastUsed: new Date().toISOString() };
  const tmp = `${file}.tmp-${randomBytes(6).toString("hex")}`;
  try {
    mkdirSync(projectsDir(home), { recursive: true, mode: 0o700 });
    writeFileSync(tmp, JSON.stringify(record, null, 2) + "\n", { mode: 0o600 });
    renameSync(tmp, file); // readers see the old record or the new one, never half of one
  } catch (err) {
    rmSync(tmp, { force: true });
    log("cannot register project %s: %s", config, (err as Error).message);
  }
}

/** Runs `fn` with registration off (for loads that are not a use of the project). */
export async function withoutRegistration<T>(fn: () => Promise<T>): Promise<T> {
  quiet++;
  try {
    return await fn();
  } finally {
    quiet--;
  }
}

/** Every registered project whose config file still exists; the records of the others are removed. */
export async function registeredProjects(home?: string): Promise<ProjectRecord[]> {
  const dir = projectsDir(home);
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return [];
  }
  const out: ProjectRecord[] = [];
  for (const name of names.sort()) {
    if (!name.endsWith(".json")) continue;
    const file = join(dir, name);
    const record = readRecord(await readFile(file, "utf8").catch(() => ""));
    if (!record) continue; // unreadable: somebody else's file, or a write in progress elsewhere
    if (!existsSync(record.config)) {
      log("dropping project %s: its config is gone", record.config);
      await rm(file, { force: true });
      continue;
    }
    out.push(record);
  }
  return out;
}

function readRecord(text: string): ProjectRecord | undefined {
  try {
    const r = JSON.parse(text) as Partial<ProjectRecord>;
    if (typeof r.config !== "string" || typeof r.lastUsed !== "string" || (r.snapshotsDir !== null && typeof r.snapshotsDir !== "string")) return undefined;
    return { config: r.config, snapshotsDir: r.snapshotsDir, lastUsed: r.lastUsed };
  } catch {
    return undefined;
  }
}
