/** Image commands: pull, tag, images, rmi, gc. */
import { Option, type Command } from "commander";
import { Image } from "../runtime/image.js";
import { collectGarbage, listImages, removeImage } from "../image/gc.js";
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
    .description("remove blobs and root filesystems no image uses (older than an hour)")
    .action(action(gc));
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

async function gc(_o: unknown, cmd: Command): Promise<number> {
  const r = await collectGarbage();
  if (isJson(cmd)) writeJson(r);
  else process.stdout.write(`removed ${r.blobsRemoved} blobs and ${r.imagesRemoved} root filesystems, ${mb(r.bytesFreed)} freed\n`);
  return 0;
}
