/**
 * How processes run in a guest: the image's environment, working directory and user, merged
 * with what a call asks for.
 */
import { posix } from "node:path";
import type { AgentClient } from "../agent/client.js";
import { ExecError } from "../errors.js";
import type { ImageConfig } from "../schema/image.js";
import type { ExecLimits } from "../schema/fields.js";

export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** What a VM needs to know about its image to run processes as the image says. */
export interface ExecDefaults {
  /** KEY=VALUE list from the image config, plus build-time `env`. */
  env: string[];
  workingDir: string | undefined;
  user: string | undefined;
  /** Limits of every exec (image's, then pool's), unless a call sets them. */
  limits?: ExecLimits | undefined;
}

export function execDefaults(config: ImageConfig, buildEnv: Record<string, string>, limits?: ExecLimits): ExecDefaults {
  return {
    env: mergeEnv(config.env, buildEnv),
    // An image config is input too: a relative or unnormalised WorkingDir is resolved from / (where
    // the agent would start it anyway), so every cwd sent to the guest is absolute and normalised.
    workingDir: config.workingDir ? posix.resolve("/", config.workingDir) : undefined,
    user: config.user || undefined,
    ...(limits ? { limits } : {}),
  };
}


/** Later keys win; a PATH is always present so argv[0] lookup works. */
export function mergeEnv(base: string[], extra: Record<string, string>): string[] {
  const map = new Map<string, string>();
  for (const kv of base) {
    const i = kv.indexOf("=");
    if (i > 0) map.set(kv.slice(0, i), kv.slice(i + 1));
  }
  for (const [k, v] of Object.entries(extra)) map.set(k, v);
  if (!map.has("PATH")) map.set("PATH", DEFAULT_PATH);
  return [...map].map(([k, v]) => `${k}=${v}`);
}

/**
 * Resolves a user in the form of an image's `User` (`name`, `uid`, `name:group`, `uid:gid`: the
 * image's own, or a pool's `user`) to numeric ids, reading the guest's /etc/passwd and /etc/group
 * when names are involved.
 */
export async function resolveImageUser(agent: AgentClient, spec: string): Promise<{ uid: number; gid: number }> {
  const [u, g] = spec.split(":", 2) as [string, string | undefined];
  let uid = /^\d+$/.test(u) ? Number(u) : undefined;
  let gid = g !== undefined && /^\d+$/.test(g) ? Number(g) : undefined;
  if (uid === undefined || gid === undefined) {
    const passwd = (await agent.readFile("/etc/passwd", 1 << 20).catch(() => Buffer.alloc(0))).toString();
    for (const line of passwd.split("\n")) {
      const f = line.split(":");
      if (f.length < 4) continue;
      if (uid === undefined ? f[0] === u : Number(f[2]) === uid) {
        uid = Number(f[2]);
        if (g === undefined) gid = Number(f[3]);
        break;
      }
    }
    if (uid !== undefined && g === undefined && gid === undefined) gid = uid;
    if (g !== undefined && gid === undefined) {
      const group = (await agent.readFile("/etc/group", 1 << 20).catch(() => Buffer.alloc(0))).toString();
      const found = group.split("\n").map((l) => l.split(":")).find((f) => f[0] === g)?.[2];
      gid = found === undefined ? undefined : Number(found);
    }
  }
  if (uid === undefined || gid === undefined || Number.isNaN(uid) || Number.isNaN(gid)) {
    throw new ExecError("EXEC_USER_UNKNOWN", `user ${JSON.stringify(spec)} (who processes run as) is not in the guest's /etc/passwd or /etc/group`, {
      hint: "name a user the image has, or a numeric uid[:gid], in the pool's `user` option or the image's User; or add the user to the image",
    });
  }
  return { uid, gid };
}
