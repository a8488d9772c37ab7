/**
 * Progress of a project build on stderr: on a terminal, one live line per image (log-update
 * redraws them in place); elsewhere (CI logs), a plain line per step; with --json, nothing.
 */
import { logUpdateStderr } from "log-update";
import type { BuildEvent, BuiltNode } from "../project/build.js";
import { describeProgress as describe } from "../project/progress.js";

interface Row {
  name: string;
  state: string;
  started: number;
  done?: BuiltNode;
}

const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

function outcome(n: BuiltNode): string {
  switch (n.status) {
    case "baked":
      return `baked in ${seconds(n.ms)}`;
    case "cached":
      return "cached";
    case "imported":
      return `imported from the cache in ${seconds(n.ms)}`;
    case "would-bake":
      return "would bake";
    case "skipped":
      return "skipped (its parent failed)";
    case "failed":
      return `failed: ${n.error?.message.split("\n")[0] ?? "unknown error"}`;
  }
}

export class BuildRenderer {
  private readonly rows = new Map<string, Row>();
  private timer: NodeJS.Timeout | undefined;
  private readonly starts = new Map<string, number>();
  private readonly live: boolean;

  constructor(
    private readonly mode: "tty" | "plain" | "silent",
    names: string[],
    /** Say nothing of images that turn out cached (a `run` of a baked image prints no progress). */
    private readonly quietCached = false,
  ) {
    this.live = mode === "tty";
    // With quietCached an image gets a line only once it does some work (a pull, a bake).
    if (!quietCached) for (const name of names) this.rows.set(name, { name, state: "waiting", started: 0 });
    if (this.live) {
      this.timer = setInterval(() => this.draw(), 100);
      this.timer.unref();
    }
  }

  static for(json: boolean, names: string[], opts: { quietCached?: boolean } = {}): BuildRenderer {
    // A terminal of no width (some CI runners allocate one) cannot hold live lines: plain then.
    const tty = process.stderr.isTTY && (process.stderr.columns ?? 0) > 0;
    return new BuildRenderer(json ? "silent" : tty ? "tty" : "plain", names, opts.quietCached);
  }

  readonly onEvent = (e: BuildEvent): void => {
    if (this.mode === "silent") return;
    if (this.quietCached && !this.rows.has(e.name)) {
      if (e.type === "start") this.starts.set(e.name, performance.now());
      if (e.type !== "progress" || !describe(e.progress)) return;
    }
    const row = this.rows.get(e.name) ?? { name: e.name, state: "waiting", started: this.starts.get(e.name) ?? 0 };
    this.rows.set(e.name, row);
    if (e.type === "start") {
      row.started = performance.now();
      row.state = "resolving";
      if (this.live && !this.quietCached) this.draw();
    } else if (e.type === "progress") {
      const text = describe(e.progress);
      if (text && text !== row.state) this.set(row, text);
    } else {
      row.done = e.node;
      if (this.quietCached && e.node.status === "cached") {
        this.rows.delete(e.name);
        return;
      }
      this.set(row, outcome(e.node));
    }
  };

  private set(row: Row, state: string): void {
    row.state = state;
    if (this.live) this.draw();
    else process.stderr.write(`[${row.name}] ${state}\n`);
  }

  private draw(): void {
    if (this.rows.size === 0) return;
    const width = Math.max(...[...this.rows.keys()].map((n) => n.length), 4);
    const lines = [...this.rows.values()].map((r) => {
      const mark = r.done ? (r.done.status === "failed" ? "✗" : r.done.status === "skipped" ? "-" : "✓") : r.started ? "…" : " ";
      const time = r.started && !r.done ? ` ${seconds(performance.now() - r.started)}` : "";
      return `${mark} ${r.name.padEnd(width)}  ${r.state}${time}`;
    });
    logUpdateStderr(lines.join("\n"));
  }

  /** Stops redrawing and leaves the final state on screen. */
  finish(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.live) {
      this.draw();
      logUpdateStderr.done();
    }
  }
}
