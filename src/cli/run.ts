/** `supermachine run <ref> -- <argv...>`: boot an image, run one command, exit with its status. */
import { Option, type Command } from "commander";
import { buildGraph } from "../project/build.js";
import { findConfig } from "../config/discover.js";
import { Image } from "../runtime/image.js";
import { openProject } from "./project.js";
import { BuildRenderer } from "./render.js";
import { action, collect, envPair, guestDirectory, integer, isJson, platform, progressPrinter, PULL_POLICIES, UsageError, writeJson, type PullPolicyArg } from "./common.js";

interface RunOptions {
  memory?: number;
  vcpus?: number;
  timeout?: number;
  env?: Record<string, string>;
  workdir?: string;
  pullPolicy?: PullPolicyArg;
  platform?: string;
  insecureRegistry?: string[];
  config?: string;
}

export function registerRunCommand(program: Command): void {
  program
    .command("run")
    .helpGroup("Virtual machines:")
    .summary("boot <ref> in a microVM, run argv, print its output, exit with its code")
    .description(
      "Boot <image> (an image of the project, or a reference) in a microVM, run <argv...> in it, print its output and exit with its exit code " +
        "(137 when it was killed). Everything after -- goes to the guest as is.",
    )
    .argument("<image>", "an image of the project (supermachine.config.ts here or above, or --config), else an image reference (alpine:3.20, oci:<dir>[:<tag>], docker-archive:<file.tar>, builtin:busybox, ...)")
    .argument("<argv...>", "the command and its arguments (put them after --)")
    .option("--memory <MiB>", "guest memory (default 256)", integer)
    .option("--vcpus <n>", "vCPUs (default 1)", integer)
    .option("--timeout <ms>", "kill the command after this long (default 60000)", integer)
    .option("-e, --env <KEY=VALUE>", "extra environment (repeatable)", envPair)
    .option("-w, --workdir <dir>", "working directory in the guest (absolute)", guestDirectory)
    .addOption(new Option("--pull-policy <policy>", "when to ask the registry (default missing)").choices(PULL_POLICIES))
    .option("--platform <os/arch>", "platform to pick from a multi-platform image", platform)
    .option("--insecure-registry <host>", "reach registry host[:port] over plain HTTP (repeatable)", collect)
    .option("-c, --config <file>", "the project's config file (default: supermachine.config.{ts,mts,js,mjs} here or above)")
    .addHelpText("after", "\nExample:\n  supermachine run -e WHO=me builtin:busybox -- sh -c 'echo hi $WHO'")
    .action(action(run));
}

async function run(ref: string, argv: string[], o: RunOptions, cmd: Command): Promise<number> {
  const json = isJson(cmd);
  const t0 = performance.now();
  const image = (await projectImage(ref, o, json)) ?? (await Image.build({
    ref,
    memoryMib: o.memory,
    vcpus: o.vcpus,
    ...(o.pullPolicy ? { pullPolicy: o.pullPolicy } : {}),
    ...(o.platform ? { platform: o.platform } : {}),
    ...(o.insecureRegistry ? { insecureRegistries: o.insecureRegistry } : {}),
    onProgress: progressPrinter(json),
  }));
  const pool = await image.pool({ min: 1, max: 1 });
  try {
    const vm = await pool.acquire();
    const bootMs = performance.now() - t0;
    const out = await vm.exec({ argv, env: o.env ?? {}, cwd: o.workdir, timeoutMs: o.timeout });
    if (json) {
      writeJson({
        exitCode: out.exitCode,
        stdout: out.stdout.toString("utf8"),
        stderr: out.stderr.toString("utf8"),
        accel: vm.accel,
        imageDigest: image.digest,
        readyMs: Math.round(bootMs),
      });
    } else {
      process.stdout.write(out.stdout);
      process.stderr.write(out.stderr);
    }
    await vm.release();
    return out.exitCode < 0 ? 137 : out.exitCode;
  } finally {
    await pool.shutdown();
  }
}

/**
 * `run <name>` on a project: when a config is found (or given) and declares an image of that
 * name, that image is built (with its ancestors, from the cache when they are baked) and run.
 * Anything else is an image reference.
 */
async function projectImage(name: string, o: RunOptions, json: boolean): Promise<Image | undefined> {
  if (!o.config && !findConfig(process.cwd())) return undefined;
  const { project, graph, snapshotsDir, lock } = await openProject(o, "run");
  if (!graph.has(name)) {
    if (o.config) throw new UsageError(`${project.configPath} declares no image named ${JSON.stringify(name)} (images: ${graph.names.join(", ")})`);
    return undefined;
  }
  for (const flag of ["memory", "vcpus", "pullPolicy", "platform", "insecureRegistry"] as const) {
    if (o[flag] !== undefined) throw new UsageError(`--${flag.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} does not apply to ${name}: its definition in ${project.configPath} decides`);
  }
  const order = graph.withAncestors([name]);
  const renderer = BuildRenderer.for(json, order, { quietCached: true });
  try {
    const nodes = await buildGraph(graph, { names: [name], root: project.root, snapshotsDir, handoff: (n) => n === name, onEvent: renderer.onEvent, lock });
    const node = nodes.get(name)!;
    if (node.error) throw node.error;
    return Image.create(node.snapshot!, node.handoff);
  } finally {
    renderer.finish();
  }
}
