// Running the examples in examples/ the way a user does (`<runtime> examples/<file>` from the
// repo root, with this process's environment) and what each must print: shared by the examples
// test (under Node) and the compatibility tier (under Bun and Deno as well). Files starting with
// "_" are helpers, not examples. Every example needs an entry in EXPECTED.
import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { expect } from "vitest";
import { run } from "./run.js";
import { qemuPids, waitFor } from "./vm.js";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const EXAMPLES = join(ROOT, "examples");
/** Per example: the first run bakes its snapshots, and the python image may need building (~30 s). */
export const RUN_TIMEOUT_MS = 300_000;
/** The prefix the examples give their temp directories. */
const TEMP_PREFIX = "supermachine-example-";

/** What each example's stdout must contain (strings), match (regular expressions) or pass (functions). */
export type Check = string | RegExp | ((stdout: string) => void);

/** 05: the ticks (200 ms apart in the guest) reach the host as they are printed, not at the end. */
function ticksStreamed(stdout: string): void {
  const at = [...stdout.matchAll(/\+ *(\d+) ms {2}tick (\d)\n/g)].map((m) => Number(m[1]));
  expect(at, "arrival times of tick 1..5").toHaveLength(5);
  expect(at[4]! - at[0]!, "ms between tick 1 and tick 5 on the host").toBeGreaterThanOrEqual(500);
}

export const EXPECTED: Record<string, Check[]> = {
  "01-hello.mjs": ["exit 0: hello from supermachine"],
  "06-declarative.mjs": [
    /pools ready in \d+ ms: agent\n/,
    "agent runs Python 3.11",
    "python's extraFiles are there: example-package==1.0.0",
    `agent's warmup left its tools: {"question": "from the agent pool", "answer": 42}`,
  ],
  "02-pool.mjs": [
    "pool ready: alive 2, in use 0, idle 2, waiting 0 (min 2, max 4)",
    "4 acquired: alive 4, in use 4, idle 0, waiting 0 (min 2, max 4)",
    /task 1 was here \(QEMU pid \d+\)/,
    /task 4 was here \(QEMU pid \d+\)/,
    "next acquire: no /tmp/leftover: a clean VM",
  ],
  "03-snapshot-then-restore.mjs": [/snapshot saved: \S+configured-vm\n/, "  notes: written before the snapshot\n", "  answer: 42\n"],
  "04-expose-tcp.mjs": [
    /guest port 8080 is at http:\/\/127\.0\.0\.1:\d+\//,
    "GET /index.html -> 200 OK, text/html",
    "body: <h1>hello from inside the VM</h1>",
    "GET /nope.html -> 404",
  ],
  "05-spawn-streaming.mjs": [
    ticksStreamed,
    /exit 0 after \d+ ms in the guest/,
    'sent "hello", got "HELLO"',
    'sent "streaming stdin", got "STREAMING STDIN"',
    'after closeStdin: "bye", exit 0',
    "stty size with winsize { cols: 100, rows: 30 }: 30 100",
    "stty size after resize(132, 43): 43 132",
  ],
  "07-network.mjs": [
    /warmup: installed greet 1\.0 from http:\/\/pkgs\.internal:\d+ \(2 requests\)\n/,
    "in the VM: greet 1.0: hello, sandbox",
    /in the VM, fetch http:\/\/pkgs\.internal:\d+\/index\/greet -> 1\.0 \/files\/greet-1\.0\.sh \(version, file\)\n/,
    "in the VM, fetch http://example.com/ -> error ENOTFOUND (not in network.allow)",
    "in the VM, fetch http://192.0.2.1/ -> error ECONNRESET (not in network.allow)",
    // The glibc resolver may ask A and AAAA separately: the DNS counts are at least one per name.
    /netStats: \{"connections":2,"refused":1,"refusedBy":\{"not-allowed":1\},"dnsQueries":[2-9],"dnsRefused":[1-9]\}\n/,
  ],
  "08-e2b-sdk.mjs": [
    /server ready at http:\/\/127\.0\.0\.1:\d+\n/,
    /sandbox [a-z0-9]{20} created in \d+ ms\n/,
    "  stdout: hello from Linux\nexit 0, stderr \"to stderr\\n\"\n",
    "read back: written through the E2B SDK\n",
    "background process: FROM STDIN\n",
    "Sandbox.list by metadata: 1 sandbox\n",
    "killed; running: false\n",
    "server drained, exit 0\n",
  ],
  "pattern-1-one-shot-exec.mjs": [
    /sum-of-squares +ok: 285\n/,
    /reads-env +ok: home is/,
    /tampers +ok: deleted python3\n/,
    /checks-python +ok: python3 still there: True\n/,
    /crashes +failed, exit 1: ValueError: bad candidate\n/,
    /never-ends +timed out after 5 s \(killed\)\n/,
    "6 candidates in",
  ],
  "pattern-2-agent-runtime.mjs": [
    /image ready in \d+ ms: (baked, warmup ran|snapshot cached, warmup skipped)\n/,
    "task 1: exit 0\n  n=5 min=1 max=5 mean=2.80\n",
    "task 2: exit 0\n  n=4 min=1 max=8 mean=4.50\n",
    "task 3: exit 0\n  n=6 min=0 max=8 mean=3.17\n",
    /(byte-compiled at warmup: True\n {2}scratch from an earlier task: False\n[\s\S]*){3}/,
  ],
  "pattern-3-persistent-service.mjs": [
    // Two VMs, the same page: written once when the workload started at bake time.
    /VM with QEMU pid \d+: 200 "(started \d\d:\d\d:\d\d UTC, instance [0-9a-f]{8})" .*\nVM with QEMU pid \d+: 200 "\1" /,
    "same page in both VMs",
  ],
  "pattern-4-resource-files.mjs": [
    "  guest says: hello from a baked-in script\n",
    "  files unchanged: same inputHash, the snapshot is reused\n",
    "  app.conf edited: new inputHash, a new snapshot was baked\n",
    "  guest says: bonjour from a baked-in script\n",
  ],
};

export const examples = readdirSync(EXAMPLES)
  .filter((f) => /\.(mjs|cjs|js)$/.test(f) && !f.startsWith("_"))
  .sort();

export const tempDirs = (): Set<string> => new Set(readdirSync(tmpdir()).filter((e) => e.startsWith(TEMP_PREFIX)));

/** QEMU processes started with `marker` in their environment. */
export function qemuWithMarker(marker: string): number[] {
  return qemuPids().filter((pid) => {
    try {
      return readFileSync(`/proc/${pid}/environ`, "latin1").split("\0").includes(marker);
    } catch {
      return false; // gone meanwhile
    }
  });
}

export interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/**
 * Runs examples/<file> with `command` (the runtime and its arguments before the script: by
 * default this Node), `marker` (KEY=value) added to its environment so that its QEMU processes
 * can be told apart.
 */
export async function runExample(file: string, marker: string, command: readonly string[] = [process.execPath]): Promise<Run> {
  const t0 = Date.now();
  const [key, value] = marker.split("=") as [string, string];
  const r = await run(command[0]!, [...command.slice(1), join("examples", file)], {
    cwd: ROOT,
    env: { ...process.env, [key]: value },
    timeout: RUN_TIMEOUT_MS,
    killSignal: "SIGKILL",
  });
  if (r.error && r.error.code !== "ETIMEDOUT") throw r.error;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, ms: Date.now() - t0 };
}

/**
 * Runs examples/<file> as above and checks that it exits 0, prints what EXPECTED says, and
 * leaves no QEMU process and no temp directory behind. `label` names the command in failures;
 * `checks` replace EXPECTED's entry where a runtime prints something else.
 */
export async function checkExample(file: string, command: readonly string[] = [process.execPath], label = "node", checks: readonly Check[] = EXPECTED[file] ?? []): Promise<Run> {
  const marker = `SUPERMACHINE_EXAMPLE_RUN=${file}-${randomBytes(4).toString("hex")}`;
  const tempsBefore = tempDirs();
  const r = await runExample(file, marker, command);
  const report = `${label} examples/${file}: exit ${r.code ?? r.signal} after ${r.ms} ms\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
  expect(r.code, report).toBe(0);
  for (const want of checks) {
    if (typeof want === "string") expect(r.stdout, report).toContain(want);
    else if (want instanceof RegExp) expect(r.stdout, report).toMatch(want);
    else {
      try {
        want(r.stdout);
      } catch (e) {
        throw new Error(`${(e as Error).message}\n${report}`, { cause: e });
      }
    }
  }
  // QEMU dies with its owner; give the kernel a moment to deliver that.
  expect(await waitFor(() => qemuWithMarker(marker).length === 0, 5_000, 100), `QEMU processes left by ${label} examples/${file}`).toBe(true);
  const leftover = [...tempDirs()].filter((d) => !tempsBefore.has(d));
  expect(leftover, `temp dirs left by ${label} examples/${file}`).toEqual([]);
  return r;
}
