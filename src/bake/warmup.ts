/**
 * The build's `warmup` function: it runs against the booted VM before the capture, so every VM
 * restored from the snapshot starts warmed. What it runs, and what that prints, goes to the
 * bake log. Processes it spawned and left running are stopped before the capture (their
 * streams would not survive it), and so are processes its execs left running in the background
 * unless started with `detach: true`; daemons belong in the image workload (`cmd`).
 */
import type { MicroVm } from "../engine/qemu.js";
import { BakeError } from "../errors.js";
import type { ExecDefaults } from "../session/env.js";
import { GuestSession } from "../session/session.js";
import type { ExecOptions, ReadFileOptions, SpawnOptions, WarmupVm, WriteFileOptions } from "../schema/calls.js";
import type { ResolvedNetwork } from "../schema/network.js";
import type { BakeLog } from "./bake-log.js";

const argvText = (o: { argv?: unknown }) => (Array.isArray(o?.argv) ? o.argv.map((a) => JSON.stringify(a)).join(" ") : "(invalid argv)");

export async function runWarmup(
  machine: MicroVm,
  defaults: ExecDefaults,
  warmup: (vm: WarmupVm) => Promise<void>,
  log: BakeLog,
  ref: string,
  logPath: () => string | undefined,
  network: ResolvedNetwork | "none" = "none",
): Promise<void> {
  const session = new GuestSession(machine, defaults);
  if (network !== "none") {
    await session.startEgress(network);
    const how = network.mode === "transparent" ? "every connection and DNS query checked by the host" : "through the host's proxy port";
    log.line(`warmup network (${network.mode}, ${how}): ${network.allow.map((a) => a.text).join(", ")}`);
  }
  const vm: WarmupVm = {
    exec: async (o: ExecOptions) => {
      log.line(`warmup exec: ${argvText(o)}`);
      try {
        const r = await session.exec(o);
        log.output("  stdout", r.stdout);
        log.output("  stderr", r.stderr);
        log.line(`  exit ${r.exitCode}${r.signal ? ` (${r.signal})` : ""}${r.timedOut ? " (timed out)" : ""} in ${r.durationMs.toFixed(1)} ms`);
        return r;
      } catch (e) {
        log.line(`  failed: ${(e as Error).message}`);
        throw e;
      }
    },
    spawn: async (o: SpawnOptions) => {
      log.line(`warmup spawn: ${argvText(o)}`);
      const child = await session.spawn(o);
      child.wait().then(
        (r) => log.line(`  spawned ${argvText(o)}: exit ${r.exitCode}${r.signal ? ` (${r.signal})` : ""}`),
        (e: Error) => log.line(`  spawned ${argvText(o)}: ${e.message}`),
      );
      return child;
    },
    readFile: (path: string, o?: ReadFileOptions) => {
      log.line(`warmup readFile ${path}`);
      return session.readFile(path, o);
    },
    writeFile: (path: string, bytes: Buffer | Uint8Array | string, o?: WriteFileOptions) => {
      log.line(`warmup writeFile ${path} (${typeof bytes === "string" ? Buffer.byteLength(bytes) : bytes.length} bytes)`);
      return session.writeFile(path, bytes, o);
    },
  };
  const t0 = performance.now();
  try {
    await warmup(vm);
    const killed = await session.killBackground();
    if (killed > 0) log.line(`stopped the background processes of ${killed} warmup exec(s) (detach: true keeps them)`);
  } catch (e) {
    log.line(`warmup threw: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    const path = logPath();
    throw new BakeError("BAKE_WARMUP_FAILED", `${ref}: warmup failed: ${e instanceof Error ? e.message : String(e)}`, {
      cause: e,
      hint: `no snapshot was made; fix the warmup and build again${path ? ` (bake log: ${path})` : ""}`,
    });
  } finally {
    if (network !== "none") {
      const n = session.netStats();
      log.line(`warmup network: ${n.connections} connection(s), ${n.refused} refused, ${n.bytesIn} bytes in, ${n.bytesOut} bytes out, ${n.dnsQueries} DNS queries (${n.dnsRefused} without an address)`);
    }
    // Egress stops here, before the capture: the snapshot holds no proxy listener.
    await session.closeSession(new BakeError("BAKE_WARMUP_ENDED", "the warmup has finished; its processes were stopped before the snapshot"));
  }
  log.line(`warmup done in ${(performance.now() - t0).toFixed(0)} ms`);
}
