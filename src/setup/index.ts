/**
 * One idempotent setup of the host, what `npx supermachine setup` runs, and in this repository
 * what `npm run setup` runs once its bootstrap (scripts/setup.mjs: npm ci, tsc) is done:
 *
 *   1. the Debian packages that are missing (src/setup/packages.ts);
 *   2. the guest kernel, the agent and the built-in busybox image, found (an explicit path, the
 *      prebuilt package) or built into the cache under a key of their inputs (./artifacts.ts);
 *   3. the install manifest recording where they are (./manifest.ts);
 *   4. confinement: QEMU's system user when root, the cache made private (./confinement.ts).
 *
 * A second run with nothing changed does no work. `check` reports instead (./check.ts).
 */
import { SetupError, SupermachineError } from "../errors.js";
import { ensureAgent, ensureBusybox, ensureKernel, plan, toBuild } from "./artifacts.js";
import { checkAll, formatCheck } from "./check.js";
import { ensureConfinement } from "./confinement.js";
import { duration, estimates, secs, setupContext, type SetupContext, type SetupFlags } from "./context.js";
import { manifestFor, writeManifest } from "./manifest.js";
import { ensurePackages } from "./packages.js";

export type { SetupFlags } from "./context.js";
export type { CheckReport } from "./check.js";

/** Runs setup for the package at `root`; resolves with the exit status (errors are printed, and with --json written as `{ error }`). */
export async function runSetup(root: string, flags: SetupFlags): Promise<number> {
  const ctx = setupContext(root, flags);
  try {
    if (process.platform !== "linux" || process.arch !== "x64") {
      throw new SetupError("SETUP_HOST_UNSUPPORTED", `supermachine runs on Linux x86_64; this is ${process.platform}/${process.arch}`);
    }
    if (flags.check) {
      const report = checkAll(ctx);
      process.stdout.write(flags.json ? JSON.stringify(report, null, 2) + "\n" : formatCheck(report));
      return report.ok ? 0 : 1;
    }
    await setupAll(ctx);
    return 0;
  } catch (err) {
    const e = err instanceof SupermachineError ? err : new SetupError("SETUP_COMMAND_FAILED", (err as Error).message, { cause: err });
    ctx.say(`error: ${e.message}`);
    if (e.hint) ctx.say(`hint: ${e.hint}`);
    if (flags.json) process.stdout.write(JSON.stringify({ error: { code: e.code, message: e.message, ...(e.hint ? { hint: e.hint } : {}) } }) + "\n");
    return 1;
  }
}

async function setupAll(ctx: SetupContext): Promise<void> {
  const started = Date.now();
  const est = estimates(ctx.cores);
  // In the repository every package (the tests use them); from a package, what the missing artifacts need.
  ensurePackages(ctx, ctx.artifactsOnly ? toBuild(plan(ctx)).map((p) => p.name) : []);
  // Planned after the packages: the kernel's and the busybox image's keys include package versions.
  const p = plan(ctx);
  for (const a of [p.kernel, p.agent]) if (a.source === "prebuilt") ctx.note(`${a.name}: prebuilt, from ${p.prebuilt.package}@${p.prebuilt.version} (${a.path})`);
  const todo = toBuild(p);
  if (todo.length) {
    const total = todo.reduce((s, x) => s + est[x.name], 0);
    ctx.say(`to build: ${todo.map((x) => `${x.name} (about ${duration(est[x.name])})`).join(", ")}; about ${duration(total)} in all on ${ctx.cores} core${ctx.cores === 1 ? "" : "s"}`);
  }
  const step = (name: string) => (todo.length > 1 ? `[${todo.findIndex((x) => x.name === name) + 1}/${todo.length}] ` : "");
  await ensureKernel(ctx, p.kernel, step("kernel"));
  await ensureAgent(ctx, p.agent, step("agent"));
  await ensureBusybox(ctx, p.busybox, step("busybox"));
  await writeManifest(ctx, manifestFor(ctx, p));
  // Only the cache's files are given to QEMU's group here: the engine grants the others as it opens them.
  ensureConfinement(ctx, [p.kernel, p.agent].filter((a) => a.source === "cache").map((a) => a.path));
  ctx.note(`ready in ${secs(started)} (cache: ${ctx.home})`);
  if (ctx.flags.json) {
    const out = { ok: true, mode: ctx.artifactsOnly ? "package" : "repository", home: ctx.home, built: todo.map((x) => x.name), sources: { kernel: p.kernel.source, agent: p.agent.source }, ms: Date.now() - started };
    process.stdout.write(JSON.stringify(out) + "\n");
  }
}
