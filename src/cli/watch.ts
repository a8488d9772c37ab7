/**
 * `supermachine watch [names...]`: keeps the project's images baked while files change. Runs
 * until interrupted (Ctrl-C). Text: what changed, what rebakes, each round's result; `--json`:
 * one event per line.
 */
import { relative } from "node:path";
import type { Command } from "commander";
import { ProjectWatcher, type WatchEvent, type WatchRound } from "../project/watch.js";
import { action, integer, isJson, nodeJson } from "./common.js";

interface WatchOptions {
  config?: string;
  concurrency?: number;
  debounce?: number;
}

export function registerWatchCommand(program: Command): void {
  program
    .command("watch")
    .helpGroup("Projects:")
    .summary("rebake images as their files change")
    .description(
      "Watch the config, every module and helper an image's key comes from, and every extra file; " +
        "on a change, rebake the images whose key changed and their descendants. Runs until interrupted.",
    )
    .argument("[names...]", "images to keep baked (with their ancestors; default: all)")
    .option("-c, --config <file>", "the project's config file (default: supermachine.config.{ts,mts,js,mjs} here or above)")
    .option("--concurrency <n>", "bakes at once (default: from cores and memory)", integer)
    .option("--debounce <ms>", "quiet time after a change before rebaking (default 150)", integer)
    .action(action(watchProject));
}

function roundJson(r: WatchRound) {
  return { round: r.round, changed: r.changed, rekeyed: r.rekeyed, ms: r.ms, images: [...r.nodes.values()].map(nodeJson) };
}

async function watchProject(names: string[], o: WatchOptions, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  const watcher = new ProjectWatcher({
    ...(names.length ? { names } : {}),
    ...(o.config ? { config: o.config } : {}),
    ...(o.concurrency ? { concurrency: o.concurrency } : {}),
    ...(o.debounce !== undefined ? { debounceMs: o.debounce } : {}),
  });
  const root = () => watcher.current?.project.root ?? process.cwd();
  const say = (line: string) => process.stderr.write(`${line}\n`);
  watcher.on("event", (e: WatchEvent) => {
    // The first round is reported by "ready".
    if (e.type === "round-done" && e.round.round === 1) return;
    if (json) {
      const out =
        e.type === "build"
          ? e.event.type === "done"
            ? { type: "image", ...nodeJson(e.event.node) }
            : e.event.type === "start"
              ? { type: "image-start", name: e.event.name }
              : undefined
          : e.type === "ready"
            ? { type: "ready", files: e.files, ...roundJson(e.round) }
            : e.type === "round-done"
              ? { type: "round-done", ...roundJson(e.round) }
              : e.type === "round-failed"
                ? { type: "round-failed", round: e.round, error: { code: (e.error as { code?: string }).code ?? "ERROR", message: e.error.message } }
                : e;
      if (out) process.stdout.write(JSON.stringify(out) + "\n");
      return;
    }
    switch (e.type) {
      case "ready": {
        const baked = [...e.round.nodes.values()].filter((n) => n.status === "baked").length;
        say(`watching ${e.files} files of ${e.round.nodes.size} images (${baked} baked now, the rest cached); Ctrl-C to stop`);
        break;
      }
      case "change":
        say(`changed: ${e.files.map((f) => relative(root(), f) || f).join(", ")}`);
        break;
      case "build":
        if (e.event.type === "progress" && e.event.progress.phase === "bake" && e.event.progress.step === "boot") say(`  ${e.event.name}: rebaking`);
        if (e.event.type === "done" && (e.event.node.status === "failed" || e.event.node.status === "skipped")) {
          say(`  ${e.event.name}: ${e.event.node.status}: ${e.event.node.error?.message ?? ""}`);
        }
        break;
      case "round-done": {
        const baked = [...e.round.nodes.values()].filter((n) => n.status === "baked").map((n) => n.name);
        say(baked.length ? `rebaked ${baked.join(", ")} in ${(e.round.ms / 1000).toFixed(1)} s` : "no image's key changed: nothing to rebake");
        break;
      }
      case "round-failed":
        say(`the project no longer loads: ${e.error.message}${(e.error as { hint?: string }).hint ? `\n  hint: ${(e.error as { hint?: string }).hint}` : ""}\n  (keeping the last good graph; fix it and save again)`);
        break;
    }
  });
  await watcher.start();
  await new Promise<void>((resolve) => {
    const stop = () => resolve();
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
  });
  await watcher.close();
  return 0;
}
