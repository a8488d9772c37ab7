/**
 * Commands on a project (`supermachine.config.ts`, found upward from the working directory, or
 * `--config`): build, ls, why, graph. `run <name>` on a project image lives in run.ts.
 */
import type { Command } from "commander";
import { buildGraph, type BuiltNode } from "../project/build.js";
import { listProjectImages, whyImage } from "../project/inspect.js";
import { loadProject } from "../config/loader.js";
import type { LoadedProject } from "../schema/project.js";
import { buildImageGraph, type ImageGraph } from "../graph/graph.js";
import { homePaths } from "../paths.js";
import { action, integer, isJson, nodeJson, UsageError, writeJson } from "./common.js";
import { BuildRenderer } from "./render.js";
import { cacheSigningKey, fetchFromCache, seedImages } from "../project/cache.js";
import { exportSnapshots } from "../transfer/index.js";
import { openLock, updatePins, type ProjectLock } from "../project/lock.js";
import type { GraphImage } from "../graph/layout.js";
import { graphToDot, graphToMermaid, graphToSvg } from "../graph/render.js";
import { GraphError } from "../errors.js";
import { randomBytes } from "node:crypto";
import { rename, rm, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";

interface ProjectOptions {
  config?: string;
}

export async function openProject(o: ProjectOptions, command: string): Promise<{ project: LoadedProject; graph: ImageGraph; snapshotsDir: string; lock: ProjectLock }> {
  const project = await loadProject({ ...(o.config ? { configFile: o.config } : {}), command });
  const graph = buildImageGraph(project.images);
  return { project, graph, snapshotsDir: project.snapshotsDir ?? homePaths().snapshots, lock: await openLock(project) };
}

const withConfig = (c: Command) => c.option("-c, --config <file>", "the project's config file (default: supermachine.config.{ts,mts,js,mjs} here or above)");

export function registerProjectCommands(program: Command): void {
  withConfig(
    program
      .command("build")
      .helpGroup("Projects:")
      .summary("bake the project's images that are not baked yet")
      .description("Resolve the project's images, key each by content and bake what is missing, parents first.")
      .argument("[names...]", "images to build (with their ancestors; default: all)")
      .option("--force", "bake even what is cached")
      .option("--dry-run", "report what would be baked, bake nothing")
      .option("--frozen", "bake nothing; fail, naming them, if images are not baked or tags not pinned in supermachine.lock (for CI)")
      .option("--update", "re-resolve the registry tags of the images (all, or names and their ancestors) and rewrite their pins in supermachine.lock, then build")
      .option("--concurrency <n>", "bakes at once (default: from cores and memory)", integer)
      .option("--cache-from <dir|ref>", "import images that are not baked here from this cache (a directory or a registry host[:port]/repo) instead of baking them (default: the config's cache.from)")
      .option("--cache-to <dir|ref>", "after the build, export the images' snapshots to this cache (default: the config's cache.to)"),
  ).action(action(build));

  withConfig(program.command("ls").helpGroup("Projects:").summary("list the project's images: key, parent, cached, size")).action(action(ls));

  withConfig(
    program
      .command("why")
      .helpGroup("Projects:")
      .summary("explain why an image's key changed since its last bake")
      .argument("<name>", "an image of the project"),
  ).action(action(why));

  withConfig(
    program
      .command("graph")
      .helpGroup("Projects:")
      .summary("print the project's image graph")
      .description(
        "Print the project's image graph, parents above children: a text tree, or for docs and pull requests an SVG picture, Graphviz DOT or a mermaid flowchart, which show each image's key and whether it is baked (computed as `ls` does, without baking anything).",
      )
      .option("--format <format>", `the output: ${GRAPH_FORMATS.join(", ")}`, "text")
      .option("-o, --output <file>", "write to this file (replaced atomically) instead of stdout"),
  ).action(action(graph));
}

async function build(names: string[], o: ProjectOptions & { force?: boolean; dryRun?: boolean; frozen?: boolean; update?: boolean; concurrency?: number; cacheFrom?: string; cacheTo?: string }, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  if (o.update && o.frozen) throw new UsageError("--update and --frozen cannot be combined: --update asks the registries what the tags name now, a frozen build uses the pins as they are");
  const { project, graph, snapshotsDir, lock } = await openProject(o, "build");
  for (const n of names) graph.spec(n); // unknown names fail here, listing the known ones
  // Before anything is keyed: the new pins decide the root images' digests (written when the build ends).
  if (o.update) await updatePins(lock, graph, names);
  const cacheFrom = o.dryRun ? undefined : (o.cacheFrom ?? project.cache.from);
  const cacheTo = o.dryRun ? undefined : (o.cacheTo ?? project.cache.to);
  const trust = project.cache.trust;
  if (cacheFrom) await seedImages(cacheFrom, graph, names, { pins: lock, trust });
  const order = names.length ? graph.withAncestors(names) : graph.order;
  const renderer = BuildRenderer.for(json, order);
  let nodes: Map<string, BuiltNode>;
  try {
    nodes = await buildGraph(graph, {
      ...(names.length ? { names } : {}),
      root: project.root,
      snapshotsDir,
      handoff: false,
      ...(o.force ? { force: true } : {}),
      ...(o.dryRun ? { dryRun: true } : {}),
      ...(o.frozen ? { frozen: true } : {}),
      ...((o.concurrency ?? project.concurrency) ? { concurrency: o.concurrency ?? project.concurrency! } : {}),
      onEvent: renderer.onEvent,
      lock,
      ...(cacheFrom ? { fetch: fetchFromCache(cacheFrom, snapshotsDir, { trust }) } : {}),
    });
  } finally {
    renderer.finish();
  }
  const signingKey = cacheTo ? cacheSigningKey(project.cache.signingKey) : undefined;
  const exported = cacheTo ? await exportSnapshots(cacheTo, [...nodes.values()].flatMap((n) => (n.snapshot ? [n.snapshot] : [])), signingKey ? { signingKey } : {}) : undefined;
  const images = [...nodes.values()].map(nodeJson);
  const failed = images.filter((i) => i.status === "failed" || i.status === "skipped");
  const pins = lock.written.map((c) => ({ ref: c.ref, platform: c.platform, digest: c.digest, change: c.change, ...(c.before ? { before: c.before } : {}) }));
  if (json) writeJson({ images, ...(exported ? { cache: exported } : {}), ...(pins.length ? { lock: { file: lock.file, pins } } : {}) }, true);
  else {
    for (const p of pins) {
      const what = p.change === "moved" ? `moved ${show(p.before)} → ${show(p.digest)}` : p.change === "dropped" ? `dropped (no image uses it; was ${show(p.digest)})` : `pinned to ${show(p.digest)}`;
      process.stderr.write(`lock: ${p.ref} (${p.platform}) ${what}\n`);
    }
    if (exported) process.stderr.write(`cache ${exported.location}: ${exported.snapshots.filter((s) => s.status === "exported").length} exported, ${exported.snapshots.filter((s) => s.status === "present").length} present; ${exported.chunksMoved} chunks, ${(exported.bytesMoved / 1e6).toFixed(1)} MB moved\n`);
    const baked = images.filter((i) => i.status === "baked").length;
    const cached = images.filter((i) => i.status === "cached").length;
    const imported = images.filter((i) => i.status === "imported").length;
    const would = images.filter((i) => i.status === "would-bake").length;
    process.stderr.write(`${images.length} image${images.length === 1 ? "" : "s"}: ${baked} baked, ${cached} cached${imported ? `, ${imported} imported` : ""}${would ? `, ${would} would bake` : ""}${failed.length ? `, ${failed.length} failed` : ""}\n`);
    for (const n of nodes.values()) if (n.status === "failed" && n.error) process.stderr.write(`${n.name}: ${describeError(n.error)}\n`);
    for (const n of nodes.values()) if (n.cacheError) process.stderr.write(`warning: ${n.name} was baked: the cache's copy was not imported: ${n.cacheError.message}\n`);
  }
  return failed.length ? 1 : 0;
}

function describeError(e: Error): string {
  const hint = (e as { hint?: string }).hint;
  return hint ? `${e.message}\n  hint: ${hint}` : e.message;
}

async function ls(o: ProjectOptions, cmd: Command): Promise<number> {
  const { project, graph, snapshotsDir, lock } = await openProject(o, "ls");
  const rows = await listProjectImages(graph, { root: project.root, snapshotsDir, lock });
  if (isJson(cmd)) {
    writeJson({ images: rows }, true);
    return 0;
  }
  const w = Math.max(4, ...rows.map((r) => r.name.length));
  const pw = Math.max(6, ...rows.map((r) => (r.parent ?? "-").length));
  process.stdout.write(`${"NAME".padEnd(w)}  KEY               ${"PARENT".padEnd(pw)}  CACHED  SIZE\n`);
  for (const r of rows) {
    const size = r.sizeBytes === null ? "-" : `${(r.sizeBytes / 2 ** 20).toFixed(1)} MiB`;
    process.stdout.write(`${r.name.padEnd(w)}  ${r.key.slice(0, 16)}  ${(r.parent ?? "-").padEnd(pw)}  ${r.cached ? "yes   " : "no    "}  ${size}\n`);
  }
  return 0;
}

async function why(name: string, o: ProjectOptions, cmd: Command): Promise<number> {
  const { project, graph, snapshotsDir, lock } = await openProject(o, "why");
  graph.spec(name);
  const report = await whyImage(graph, name, { root: project.root, snapshotsDir, lock });
  if (isJson(cmd)) {
    writeJson(report, true);
    return 0;
  }
  const out = process.stdout;
  if (report.cached) {
    out.write(`${name} is baked with its current key (${report.key.slice(0, 16)}): nothing changed.\n`);
  } else if (!report.lastBake) {
    out.write(`${name} has never been baked here (key ${report.key.slice(0, 16)}).\n`);
  } else {
    out.write(`${name} would be rebaked: its key is ${report.key.slice(0, 16)}, its last bake (${report.lastBake.created}) had ${report.lastBake.key.slice(0, 16)}.\n`);
    for (const c of report.changes) out.write(`  ${c.input}: ${show(c.before)} → ${show(c.after)}\n`);
    if (report.changes.length === 0) out.write("  (the inputs of that bake are not comparable: it was made by another version)\n");
  }
  return 0;
}

function show(v: unknown): string {
  if (v === null || v === undefined) return "(none)";
  // Digests and keys: their first 12 hex digits tell them apart.
  if (typeof v === "string" && /^(sha256:)?[0-9a-f]{64}$/.test(v)) return v.replace(/([0-9a-f]{12})[0-9a-f]{52}$/, "$1");
  const s = typeof v === "string" ? v : JSON.stringify(v);
  return s.length > 72 ? `${s.slice(0, 69)}...` : s;
}

const GRAPH_FORMATS = ["text", "svg", "dot", "mermaid"] as const;
type GraphFormat = (typeof GRAPH_FORMATS)[number];

async function graph(o: ProjectOptions & { format: string; output?: string }, cmd: Command): Promise<number> {
  const format = o.format as GraphFormat;
  if (!GRAPH_FORMATS.includes(format)) throw new UsageError(`--format ${JSON.stringify(o.format)} is not a graph format: use one of ${GRAPH_FORMATS.join(", ")}`);
  if (isJson(cmd) && (format !== "text" || o.output !== undefined)) throw new UsageError("--json prints the graph as JSON on stdout: it does not go with --format or --output");
  const { project, graph: g, snapshotsDir, lock } = await openProject(o, "graph");
  const emit = (text: string) => (o.output === undefined ? void process.stdout.write(text) : writeOutputFile(o.output, text));
  if (format !== "text") {
    // Keys, cached state and sizes as `ls` finds them: a dry run, nothing is baked. An image whose
    // key cannot be computed (its base image is missing...) is drawn without one, and said why.
    const unkeyed: string[] = [];
    const rows = await listProjectImages(g, {
      root: project.root,
      snapshotsDir,
      lock,
      onEvent: (e) => {
        if (e.type !== "done" || !e.node.error) return;
        if (e.node.status === "failed") process.stderr.write(`warning: ${e.name} is drawn without a key: ${describeError(e.node.error)}\n`);
        else unkeyed.push(e.name);
      },
    });
    if (unkeyed.length) process.stderr.write(`warning: drawn without a key too, as their parent has none: ${unkeyed.join(", ")}\n`);
    const images: GraphImage[] = rows.map((r) => ({ name: r.name, parent: r.parent, key: r.key || null, cached: r.cached, sizeBytes: r.sizeBytes }));
    const render = { svg: () => graphToSvg(images, { title: `Images of ${basename(project.root)}` }), dot: () => graphToDot(images), mermaid: () => graphToMermaid(images) }[format];
    await emit(render());
    return 0;
  }
  if (isJson(cmd)) {
    writeJson({ images: g.order.map((n) => ({ name: n, parent: g.parent(n), children: g.children(n), module: g.spec(n).module, ref: g.spec(n).ref })) }, true);
    return 0;
  }
  const lines: string[] = [];
  const walk = (n: string, prefix: string, last: boolean, top: boolean) => {
    const spec = g.spec(n);
    lines.push(`${top ? "" : `${prefix}${last ? "└─ " : "├─ "}`}${n}${spec.parent === null ? `  (${spec.ref})` : ""}`);
    const kids = g.children(n);
    kids.forEach((c, i) => walk(c, top ? "" : `${prefix}${last ? "   " : "│  "}`, i === kids.length - 1, false));
  };
  for (const root of g.order.filter((n) => g.parent(n) === null)) walk(root, "", true, true);
  await emit(lines.join("\n") + "\n");
  return 0;
}

/** Replaces `file` atomically (a temp beside it, renamed over it), so a reader never sees half a picture. */
async function writeOutputFile(file: string, text: string): Promise<void> {
  const tmp = join(dirname(file), `.${basename(file)}.tmp-${randomBytes(6).toString("hex")}`);
  try {
    await writeFile(tmp, text, { flag: "wx" });
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    const e = err as NodeJS.ErrnoException;
    throw new GraphError("GRAPH_OUTPUT_FAILED", `cannot write the graph to ${file}: ${e.message}`, {
      hint: e.code === "ENOENT" ? `create the directory ${dirname(file)} first, or choose another --output` : "choose another --output, or leave it out to print on stdout",
      cause: err,
    });
  }
}
