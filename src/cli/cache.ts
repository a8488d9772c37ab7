/**
 * `supermachine cache export|import`: a project's baked snapshots to and from a cache (a
 * directory or a registry repository), by key. Names become their current keys through a dry-run
 * build; export takes the ancestors of the named images along, import brings them first.
 */
import { writeFile } from "node:fs/promises";
import type { Command } from "commander";
import { CacheError } from "../transfer/errors.js";
import { buildGraph, type BuiltNode } from "../project/build.js";
import type { LoadedSnapshot } from "../store/snapshots.js";
import { cacheSigningKey, importSnapshots, seedImages, SIGNING_KEY_ENV } from "../project/cache.js";
import { generateSigningKey } from "../transfer/sign.js";
import { exportSnapshots, type TransferEntry, type TransferReport } from "../transfer/index.js";
import { action, isJson, mb, writeJson } from "./common.js";
import { openProject } from "./project.js";

interface CacheOptions {
  config?: string;
}

const withConfig = (c: Command) => c.option("-c, --config <file>", "the project's config file (default: supermachine.config.{ts,mts,js,mjs} here or above)");

export function registerCacheCommands(program: Command): void {
  const cache = program
    .command("cache")
    .helpGroup("Projects:")
    .summary("export or import the project's baked snapshots (a directory or a registry)")
    .description(
      "Move baked snapshots by key between this machine and a cache: a directory (an OCI image layout) or a registry repository host[:port]/repo. " +
        "Guest RAM and root filesystems travel as 16 KiB chunks packed into a few large blobs, so a child costs only what it changed; nothing the other side has moves. " +
        "Exports are signed with the project's key (cache.signingKey, or $SUPERMACHINE_CACHE_SIGNING_KEY); imports accept only what a key in cache.trust signed (or anything, with trust: \"unsigned\").",
    );
  withConfig(
    cache
      .command("export")
      .summary("export the images' snapshots (with their ancestors) to <dest>")
      .argument("<dest>", "a directory, or a registry repository host[:port]/repo")
      .argument("[names...]", "images to export, with their ancestors (default: all)"),
  ).action(action(exportCmd));
  withConfig(
    cache
      .command("import")
      .summary("import the images' snapshots (ancestors first) from <src>")
      .argument("<src>", "a directory, or a registry repository host[:port]/repo")
      .argument("[names...]", "images to import, with their ancestors (default: all)"),
  ).action(action(importCmd));
  cache
    .command("keygen")
    .summary("make a key pair for signing exported snapshots; print the public key to trust")
    .argument("<file>", "where to write the private key (PEM, mode 0600; never overwritten)")
    .action(action(keygenCmd));
}

async function keygenCmd(file: string, _o: unknown, cmd: Command): Promise<number> {
  const { privatePem, publicKey, id } = generateSigningKey();
  try {
    await writeFile(file, privatePem, { mode: 0o600, flag: "wx" });
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new CacheError("CACHE_KEY_UNUSABLE", `cannot write the signing key to ${file}: ${e.code === "EEXIST" ? "the file exists" : e.message}`, { hint: "name a new file: an existing key is never overwritten" });
  }
  if (isJson(cmd)) writeJson({ file, publicKey, id }, true);
  else {
    process.stdout.write(`${publicKey}\n`);
    process.stderr.write(`private key (key ${id}) written to ${file}: keep it secret (a CI secret, $${SIGNING_KEY_ENV}); trust the public key above in the config: cache: { trust: ["${publicKey}"] }\n`);
  }
  return 0;
}

/** The project's nodes (or `names` and their ancestors) with their current keys, baking nothing. */
async function keyed(o: CacheOptions, names: string[]) {
  const { project, graph, snapshotsDir, lock } = await openProject(o, "cache");
  for (const n of names) graph.spec(n); // unknown names fail here, listing the known ones
  return { project, graph, snapshotsDir, lock };
}

async function dryRun(p: Awaited<ReturnType<typeof keyed>>, names: string[]): Promise<BuiltNode[]> {
  const nodes = await buildGraph(p.graph, { ...(names.length ? { names } : {}), root: p.project.root, snapshotsDir: p.snapshotsDir, dryRun: true, handoff: false, lock: p.lock });
  const failed = [...nodes.values()].find((n) => n.status === "failed");
  if (failed?.error) throw failed.error;
  return [...nodes.values()];
}

async function exportCmd(dest: string, names: string[], o: CacheOptions, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  const p = await keyed(o, names);
  const nodes = await dryRun(p, names);
  const baked = nodes.filter((n) => n.status === "cached" && n.snapshot).map((n) => n.snapshot as LoadedSnapshot);
  const signingKey = cacheSigningKey(p.project.cache.signingKey);
  if (!signingKey && !json) process.stderr.write(`exporting unsigned: projects that trust signed snapshots only will refuse these (sign with cache.signingKey or $${SIGNING_KEY_ENV})\n`);
  const report = await exportSnapshots(dest, baked, { onProgress: json ? undefined : (e) => e.type === "done" && printEntry(e.entry), ...(signingKey ? { signingKey } : {}) });
  const notBaked: TransferEntry[] = nodes.filter((n) => n.status !== "cached").map((n) => ({ name: n.name, key: n.key, status: "missing", chunks: 0, chunksMoved: 0, bytesMoved: 0 }));
  for (const e of notBaked) if (!json) printEntry(e);
  return finish({ ...report, snapshots: [...report.snapshots, ...notBaked] }, json, "exported to");
}

async function importCmd(src: string, names: string[], o: CacheOptions, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  const p = await keyed(o, names);
  // Root filesystems first, so that keying the roots does not build them from their sources.
  const trust = p.project.cache.trust;
  await seedImages(src, p.graph, names, { pins: p.lock, trust });
  const nodes = await dryRun(p, names);
  const byKey = new Map(nodes.map((n) => [n.key, n]));
  const report = await importSnapshots(
    src,
    nodes.map((n) => n.key),
    {
      snapshotsDir: p.snapshotsDir,
      dirs: new Map(nodes.map((n) => [n.key, n.dir])),
      // Each must run what this project computes for it, not only carry its key.
      expect: new Map(nodes.flatMap((n) => (n.image && n.workload !== undefined ? [[n.key, { workload: n.workload, image: { digest: n.image.digest, config: n.image.config } }] as const] : []))),
      ...(trust !== undefined ? { trust } : {}),
      onProgress: json ? undefined : (e) => e.type === "done" && printEntry(named(e.entry, byKey)),
    },
  );
  return finish({ ...report, snapshots: report.snapshots.map((e) => named(e, byKey)) }, json, "imported from");
}

/** The project's name for a key (a snapshot the cache lacks has no name of its own there). */
const named = (e: TransferEntry, byKey: Map<string, BuiltNode>): TransferEntry => ({ ...e, name: byKey.get(e.key)?.name ?? e.name });

function printEntry(e: TransferEntry): void {
  const what = e.status === "missing" ? "" : `  ${e.chunksMoved}/${e.chunks} chunks, ${mb(e.bytesMoved)}`;
  process.stdout.write(`${e.name}  ${e.key.slice(0, 16)}  ${e.status}${what}\n`);
}

function finish(report: TransferReport, json: boolean, verb: string): number {
  if (json) writeJson(report, true);
  else {
    const count = (s: string) => report.snapshots.filter((e) => e.status === s).length;
    const parts = ["exported", "imported", "present", "missing"].filter((s) => count(s)).map((s) => `${count(s)} ${s}`);
    process.stderr.write(`${report.snapshots.length} snapshot${report.snapshots.length === 1 ? "" : "s"} ${verb} ${report.location}: ${parts.join(", ") || "none"}; ${report.chunksMoved} chunks, ${mb(report.bytesMoved)} moved${report.requests !== undefined ? ` in ${report.requests} requests` : ""} in ${(report.ms / 1000).toFixed(1)} s\n`);
  }
  return 0;
}
