/**
 * `extraFiles`: host files staged into the guest at fixed paths before the snapshot. Their
 * contents and modes (not their host paths or mtimes) are part of the snapshot key; what is
 * staged is checked against what was hashed, so a file edited during a bake cannot end up in a
 * snapshot keyed by its old contents.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import { resolve } from "node:path";
import type { AgentClient } from "../agent/client.js";
import { BakeError, OptionError } from "../errors.js";

export interface PlannedFile {
  /** Absolute host path. */
  hostPath: string;
  guestPath: string;
  mode: number;
  sha256: string;
  size: number;
}

/** Resolves, checks and hashes the build's extraFiles (relative paths against `cwd`). */
export async function planExtraFiles(files: { hostPath: string; guestPath: string; mode?: number | undefined }[], cwd = process.cwd()): Promise<PlannedFile[]> {
  const out: PlannedFile[] = [];
  for (const [i, f] of files.entries()) {
    const hostPath = resolve(cwd, f.hostPath);
    const what = `Image.build: extraFiles[${i}].hostPath ${JSON.stringify(f.hostPath)}`;
    let st;
    try {
      st = await stat(hostPath);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new OptionError("OPTION_EXTRA_FILE_MISSING", `${what}: ${code === "ENOENT" ? "no such file" : (e as Error).message} (looked at ${hostPath})`, {
        hint: "relative paths are resolved against the working directory; check the path, or pass an absolute one",
        cause: e,
      });
    }
    if (!st.isFile()) {
      throw new OptionError("OPTION_EXTRA_FILE_INVALID", `${what}: ${hostPath} is not a regular file`, {
        hint: "extraFiles stages single files; list each file of a directory",
      });
    }
    out.push({ hostPath, guestPath: f.guestPath, mode: f.mode ?? st.mode & 0o7777, sha256: await hashFile(hostPath), size: st.size });
  }
  return out;
}

function hashFile(path: string): Promise<string> {
  return new Promise((res, rej) => {
    const h = createHash("sha256");
    createReadStream(path)
      .on("data", (c) => h.update(c))
      .on("error", rej)
      .on("end", () => res(h.digest("hex")));
  });
}

/** Streams each file into the guest with its mode, checking its contents against the plan. */
export async function stageExtraFiles(agent: AgentClient, files: PlannedFile[], log: (line: string) => void): Promise<void> {
  for (const f of files) {
    const w = agent.openWrite(f.guestPath, { mode: f.mode });
    const h = createHash("sha256");
    try {
      for await (const chunk of createReadStream(f.hostPath)) {
        h.update(chunk as Buffer);
        await w.write(chunk as Buffer);
      }
    } catch (e) {
      w.abandon(e as Error);
      throw new BakeError("BAKE_EXTRA_FILE_FAILED", `staging ${f.hostPath} at ${f.guestPath} failed: ${(e as Error).message}`, { cause: e });
    }
    if (h.digest("hex") !== f.sha256) {
      w.abandon(new BakeError("BAKE_EXTRA_FILE_CHANGED", "changed"));
      throw new BakeError("BAKE_EXTRA_FILE_CHANGED", `extraFiles: ${f.hostPath} changed while the image was being built`, {
        hint: "build again once the file is no longer being written",
      });
    }
    await w.finish();
    log(`staged ${f.hostPath} -> ${f.guestPath} (${f.size} bytes, mode ${f.mode.toString(8).padStart(4, "0")}, sha256 ${f.sha256.slice(0, 12)})`);
  }
}
