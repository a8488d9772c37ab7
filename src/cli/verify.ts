/** `supermachine verify [--fix]`: checks every snapshot, image and blob in the caches. */
import type { Command } from "commander";
import { verifyCache, type VerifyEntry } from "../project/verify.js";
import { loadProject } from "../config/loader.js";
import { findConfig } from "../config/discover.js";
import { action, isJson, writeJson } from "./common.js";

export function registerVerifyCommand(program: Command): void {
  program
    .command("verify")
    .helpGroup("Host:")
    .summary("check every snapshot, image and blob in the caches; --restore test-boots snapshots; --fix quarantines damaged ones")
    .description(
      "Check every byte the caches hold against what was recorded when it was written: each snapshot " +
        "(its metadata's checksum, the device state, every RAM chunk, its root filesystem) in the default " +
        "snapshots directory, the project's and every registered project's; each image's root filesystem; " +
        "each blob of the blob store. With --restore, each snapshot that checks out is also restored once in a VM: " +
        "one whose restore QEMU refuses (garbage state, a RAM and state pair that do not belong together) is damaged too. " +
        "Exit status 1 when something is damaged (with --fix: when something damaged could not be moved aside).",
    )
    .option("-c, --config <file>", "also check this project's snapshots directory (default: the project here or above, if any)")
    .option("--restore", "also restore each snapshot once in a VM (about a second each under TCG)")
    .option("--fix", "move damaged entries into their quarantine (.quarantine beside them, kept 7 days): never used again, baked or pulled again when next needed")
    .addHelpText("after", "\nExamples:\n  supermachine verify\n  supermachine verify --restore --fix\n  supermachine verify --fix --json")
    .action(action(verify));
}

async function verify(o: { config?: string; fix?: boolean; restore?: boolean }, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  const dirs: string[] = [];
  const config = o.config ?? findConfig(process.cwd());
  if (config) {
    try {
      const project = await loadProject({ configFile: config, command: "verify" });
      if (project.snapshotsDir) dirs.push(project.snapshotsDir);
    } catch (err) {
      if (o.config) throw err;
      if (!json) process.stderr.write(`supermachine: the project at ${config} does not load (${(err as Error).message.split("\n")[0]}): its snapshots directory is checked only if it is registered\n`);
    }
  }
  const line = (e: VerifyEntry) => {
    if (json) return;
    if (e.restore && !e.restore.ok && e.status !== "damaged") process.stdout.write(`could not test-restore snapshot ${e.path} (${e.name}): ${e.restore.error}\n`);
    if (e.status !== "damaged") return;
    const where = e.kind === "snapshot" ? `${e.path} (${e.name})` : e.kind === "image" ? `${e.path} (image ${e.name.slice(7, 19)})` : `${e.path}`;
    const q = e.quarantined ? `; moved to ${e.quarantined}` : "";
    process.stdout.write(`damaged ${e.kind} ${where}: ${e.reason ?? ""}${q}\n`);
  };
  const r = await verifyCache({ snapshotsDirs: dirs, ...(o.fix ? { fix: true } : {}), ...(o.restore ? { restore: true } : {}), onEntry: line });
  const failed = o.fix ? r.damaged - r.fixed : r.damaged;
  if (json) {
    writeJson(r, true);
    return failed > 0 ? 1 : 0;
  }
  const n = (k: number, what: string) => `${k} ${what}${k === 1 ? "" : "s"}`;
  const unchecked = [...r.snapshots, ...r.images].filter((e) => e.status === "unchecked").length;
  const restored = r.snapshots.filter((e) => e.restore?.ok).length;
  process.stdout.write(
    `checked ${n(r.snapshots.length, "snapshot")}, ${n(r.images.length, "image")} and ${n(r.blobs.checked, "blob")} in ${(r.ms / 1000).toFixed(1)} s: ` +
      (r.damaged === 0 ? "nothing damaged" : `${r.damaged} damaged${o.fix ? `, ${r.fixed} moved to quarantine` : " (supermachine verify --fix moves them aside)"}`) +
      (unchecked ? `; ${unchecked} made by older versions could not be checked (--json lists them)` : "") +
      (o.restore ? `; ${restored} of ${r.snapshots.length} restored in a VM` : "") +
      "\n",
  );
  return failed > 0 ? 1 : 0;
}
