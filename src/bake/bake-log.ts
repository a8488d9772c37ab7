/**
 * The bake log: what a bake did, step by step, with the warmup's commands and their output.
 * Kept as `bake.log` in the snapshot, or under `<home>/logs` when the bake failed.
 */
import { keepLog, logPathFor } from "../failure-logs.js";

/** A bake log holds at most this much; past it, lines are counted, not kept. */
const MAX_LOG_BYTES = 1 << 20;
/** Output of one command kept in the log. */
export const MAX_OUTPUT_IN_LOG = 16 * 1024;

export class BakeLog {
  private readonly lines: string[] = [];
  private bytes = 0;
  private dropped = 0;
  private readonly t0 = performance.now();

  line(text: string): void {
    const stamped = `[${((performance.now() - this.t0) / 1000).toFixed(3).padStart(8)}s] ${text}`;
    if (this.bytes + stamped.length > MAX_LOG_BYTES) {
      this.dropped++;
      return;
    }
    this.lines.push(stamped);
    this.bytes += stamped.length + 1;
  }

  /** Logs a command's output under a label, trimmed to MAX_OUTPUT_IN_LOG. */
  output(label: string, data: Buffer): void {
    if (data.length === 0) return;
    const shown = data.subarray(0, MAX_OUTPUT_IN_LOG).toString("utf8");
    const more = data.length > MAX_OUTPUT_IN_LOG ? `\n    ... (${data.length - MAX_OUTPUT_IN_LOG} more bytes)` : "";
    this.line(`${label}:\n${shown.replace(/\n$/, "").replace(/^/gm, "    | ")}${more}`);
  }

  text(): string {
    return this.lines.join("\n") + (this.dropped ? `\n(${this.dropped} more lines not kept)` : "") + "\n";
  }

  /** Writes the log for a failed bake under `<home>/logs` (0600, pruned: src/logs.ts); returns its path. */
  keep(name: string): string | undefined {
    return keepLog(logPathFor(`bake-${name.replace(/[^A-Za-z0-9_.-]/g, "_")}`), this.text());
  }
}
