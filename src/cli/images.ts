/** Image commands: pull, tag, images, rmi, gc. */
import { InvalidArgumentError, Option, type Command } from "commander";
import { Image } from "../runtime/image.js";
import { collectProjectGarbage } from "../project/gc.js";
import { listImages, removeImage } from "../image/gc.js";
import { tagImage, type TagProgress } from "../image/tag.js";
import { action, collect, isJson, mb, platform, progressPrinter, PULL_POLICIES, writeJson, type PullPolicyArg } from "./common.js";

const GROUP = "Images:";

export function registerImageCommands(program: Command): void {
  program
    .command("pull")
    .helpGroup(GROUP)
    .summary("fetch an image (always asks the registry) and build its root filesystem")
    .description("Fetch an image and build its root filesystem. Asks the registry every time unless --pull-policy says otherwise.")
    .argument("<ref>", "image reference")
    .option("--platform <os/arch>", "platform to pick from a multi-platform image", platform)
    .option("--insecure-registry <host>", "reach registry host[:port] over plain HTTP (repeatable)", collect)
    .addOption(new Option("--pull-policy <policy>", "when to ask the registry (default always)").choices(PULL_POLICIES))
    .action(action(pull));

  program
    .command("tag")
    .helpGroup(GROUP)
    .summary("name image <source> as <target>, a registry-style name, without any network")
    .description(
      "Make <source> available as <target> (like docker tag / docker load): its blobs are copied into the " +
        "local store and <target> names it, so `run <target>` and Image.build({ ref: <target> }) find it " +
        "without asking a registry. A registry <source> is used from the local store when present, else pulled.",
    )
    .argument("<source>", "any image reference: oci:<dir>[:<tag>], builtin:busybox, docker-archive:<file.tar>, alpine:3.20, ...")
    .argument("<target>", "a registry-style name without a digest: python:3-bookworm, localhost/app:v1, ...")
    .option("--platform <os/arch>", "platform to pick from a multi-platform source (default: this host's)", platform)
    .option("--insecure-registry <host>", "reach registry host[:port] over plain HTTP (repeatable)", collect)
    .addHelpText("after", "\nExample:\n  supermachine tag oci:./python-layout:3-bookworm python:3-bookworm\n  supermachine run python:3-bookworm -- python3 -V")
    .action(action(tag));

  program
    .command("images")
    .helpGroup(GROUP)
    .description("list pulled, imported and tagged images with their sizes")
    .action(action(images));

  program
    .command("rmi")
    .helpGroup(GROUP)
    .description("forget an image and remove what only it used")
    .argument("<ref...>", "image references, as `supermachine images` lists them or as written when pulled")
    .action(action(rmi));

  program
    .command("gc")
    .helpGroup(GROUP)
    .summary("remove snapshots no project references, then blobs and root filesystems nothing uses")
    .description(
      "Remove the snapshots that no image of the project (supermachine.config.* here or above, or --config) " +
        "references by its current key, from the project's snapshots directory and the default one " +
        "($SUPERMACHINE_HOME/snapshots); then the blobs and root filesystems no image and no remaining snapshot " +
        "uses (older than an hour). Never removed: a snapshot a pool restores from (a live lease), one being " +
        "written, and anything that is not a supermachine snapshot.",
    )
    .option("-c, --config <file>", "the project's config file (default: supermachine.config.{ts,mts,js,mjs} here or above)")
    .option("--all-configs", "also keep what every registered project (each one loaded on this machine) references, and collect their snapshots directories")
    .option("--all", "also remove snapshots made by Image.build outside any project (img-<key> or its name) and vm.snapshot captures in those directories: nothing records who uses them")
    .option("--older-than <duration>", "remove only snapshots created longer ago than this: 30m, 12h, 7d, 2w", duration)
    .option("--dry-run", "list what would be removed, remove nothing")
    .addHelpText(
      "after",
      "\nOutside a project, without --all-configs, no project snapshot is removed.\n" +
        "Without --all-configs, snapshots other projects left in the default directory are removed too.\n\n" +
        "Examples:\n  supermachine gc --dry-run\n  supermachine gc --all-configs --older-than 7d",
    )
    .action(action(gc));
}

const UNITS: Record<string, number> = { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

/** Option parser for durations: a number and a unit (s, m, h, d, w). */
export function duration(v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([smhdw])$/.exec(v.trim());
  if (!m) throw new InvalidArgumentError(`expected a duration such as 30m, 12h, 7d or 2w, got ${JSON.stringify(v)}`);
  return Number(m[1]) * UNITS[m[2]!]!;
}

async function pull(ref: string, o: { platform?: string; insecureRegistry?: string[]; pullPolicy?: PullPolicyArg }, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  const image = await Image.build({
    ref,
    pullPolicy: o.pullPolicy ?? "always",
    ...(o.platform ? { platform: o.platform } : {}),
    ...(o.insecureRegistry ? { insecureRegistries: o.insecureRegistry } : {}),
    onProgress: progressPrinter(json),
  });
  if (json) writeJson({ ref, digest: image.digest, rootfs: image.rootfsPath, config: image.config });
  else process.stdout.write(`${ref}: ${image.digest}\n`);
  return 0;
}

async function tag(source: string, target: string, o: { platform?: string; insecureRegistry?: string[] }, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  const [os, architecture, variant] = (o.platform ?? "").split("/");
  const r = await tagImage(source, target, {
    ...(o.platform ? { platform: { os: os!, architecture: architecture!, ...(variant ? { variant } : {}) } } : {}),
    ...(o.insecureRegistry ? { insecureRegistries: o.insecureRegistry } : {}),
    onProgress: tagProgressPrinter(json),
  });
  if (json) writeJson({ source, ...r });
  else process.stdout.write(`${r.target}: ${r.manifestDigest}\n`);
  return 0;
}

/** Pulls and imports print as for `pull`; each blob copied into the store gets a line. */
function tagProgressPrinter(json: boolean): (p: TagProgress) => void {
  const pulling = progressPrinter(json);
  if (json) return () => {};
  return (p) => {
    if (p.phase !== "copy") return pulling(p);
    const short = p.digest.slice(7, 19);
    const size = p.bytes < 1e6 ? `${(p.bytes / 1e3).toFixed(1)} kB` : mb(p.bytes);
    process.stderr.write(`${p.kind} ${short}: ${p.cached ? "already present" : `copied ${size}`}\n`);
  };
}

async function images(_o: unknown, cmd: Command): Promise<number> {
  const list = await listImages();
  if (isJson(cmd)) {
    writeJson(list, true);
    return 0;
  }
  const size = (n: number | undefined) => (n === undefined ? "-" : mb(n));
  const rows = [["REFERENCE", "DIGEST", "BLOBS", "ROOTFS", "PULLED"], ...list.map((i) => [i.ref, i.manifestDigest.slice(7, 19), size(i.blobBytes), size(i.rootfsBytes), i.pulledAt])];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  for (const r of rows) process.stdout.write(r.map((cell, c) => cell.padEnd(widths[c]!)).join("  ").trimEnd() + "\n");
  return 0;
}

async function rmi(refs: string[], _o: unknown, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  let missing = 0;
  for (const ref of refs) {
    const r = await removeImage(ref);
    if (json) writeJson({ ref, ...r });
    else if (r.removed.length === 0) process.stderr.write(`supermachine: no local image named ${ref}\n`);
    else process.stdout.write(`removed ${r.removed.join(", ")} (${mb(r.bytesFreed)} freed)\n`);
    if (r.removed.length === 0) missing++;
  }
  return missing ? 1 : 0;
}

interface GcFlags {
  config?: string;
  allConfigs?: boolean;
  all?: boolean;
  olderThan?: number;
  dryRun?: boolean;
}

async function gc(o: GcFlags, cmd: Command): Promise<number> {
  const r = await collectProjectGarbage({
    ...(o.config ? { config: o.config } : {}),
    ...(o.allConfigs ? { allConfigs: true } : {}),
    ...(o.all ? { all: true } : {}),
    ...(o.olderThan !== undefined ? { olderThanMs: o.olderThan } : {}),
    ...(o.dryRun ? { dryRun: true } : {}),
  });
  if (isJson(cmd)) {
    const { snapshots: s, images: i, ...rest } = r;
    writeJson({ ...rest, snapshots: { removed: s.removed, kept: s.kept, count: s.removed.length, bytesFreed: s.bytesFreed }, ...i, bytesFreed: r.bytesFreed }, true);
    return 0;
  }
  const out = process.stdout;
  const verb = r.dryRun ? "would remove" : "removed";
  for (const w of r.warnings) process.stderr.write(`supermachine: ${w}\n`);
  for (const s of r.snapshots.removed) out.write(`${verb} ${s.dir} (${s.name}, ${mb(s.bytes)}, created ${s.created})\n`);
  const held = r.snapshots.kept.filter((k) => k.reason === "in-use" || k.reason === "being-written");
  for (const k of held) out.write(`kept ${k.dir}: ${k.reason === "in-use" ? "a pool restores from it" : "being written"}\n`);
  const recent = r.snapshots.kept.filter((k) => k.reason === "recent").length;
  const other = r.snapshots.kept.filter((k) => k.reason === "not-a-project-snapshot").length;
  out.write(
    `${verb} ${r.snapshots.removed.length} snapshot${r.snapshots.removed.length === 1 ? "" : "s"} (${mb(r.snapshots.bytesFreed)})` +
      `${recent ? `, kept ${recent} newer than --older-than` : ""}${other ? `, kept ${other} made outside a project (--all removes them)` : ""}\n`,
  );
  out.write(`${verb} ${r.images.blobsRemoved} blobs and ${r.images.imagesRemoved} root filesystems (${mb(r.images.bytesFreed)}); ${mb(r.bytesFreed)} ${r.dryRun ? "would be " : ""}freed\n`);
  return 0;
}
