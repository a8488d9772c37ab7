// The compatibility table: what the compatibility tier (compat.test.ts) runs under each runtime,
// and what docs/runtimes.md shows. test/unit/docs-runtimes.test.ts checks that the page's table is
// exactly this one, and compat.test.ts fails when a row has no test: the docs cannot claim what
// CI does not run.
import type { JsRuntimeName } from "../../src/js-runtime.js";

export interface Feature {
  /** The row's id, as docs/runtimes.md shows it (in backticks). */
  id: string;
  /** What the row covers. */
  what: string;
  /** Each runtime's cell: "yes", or how it differs. */
  status: Record<JsRuntimeName, string>;
}

const YES = { node: "yes", bun: "yes", deno: "yes" };

export const FEATURES: readonly Feature[] = [
  { id: "examples", what: "Examples 01-08: Image, Pool, Vm, snapshots, exposeTcp, spawn with a terminal, loadPools, egress, the E2B SDK", status: YES },
  {
    id: "project",
    what: "A project build: a TypeScript config loaded by jiti, a helper module, a child baked on its parent, loadPools; the same keys under every runtime",
    status: YES,
  },
  { id: "spawn", what: "vm.spawn streaming with backpressure: an unread writer is held back, stdin honours drain", status: YES },
  { id: "tcp", what: "vm.exposeTcp: an echo server (4 MiB) and HTTP (concurrent fetches, a 4 MiB download)", status: YES },
  { id: "fork-bomb", what: "A fork bomb in an exec: limited, killed at its timeout, the VM answers at once", status: YES },
  { id: "owner", what: "QEMU dies with its owner: on process.exit() with nothing released, and when the owner is SIGKILLed", status: YES },
  {
    id: "await-using",
    what: "`await using` on a Pool and a Vm in plain JavaScript",
    status: { node: "from Node 24 (older Node cannot parse it: use try/finally, or TypeScript, which compiles it)", bun: "yes", deno: "yes" },
  },
  { id: "cli", what: "The CLI: ls, build, why and run in a project", status: YES },
  {
    id: "installed",
    what: "An installed package (npm pack, npm install): a program importing supermachine, and the CLI the way the table above says to run it",
    status: YES,
  },
  { id: "cache", what: "cache keygen, a signed cache export and an import into another home (worker threads, the zstd addon, Ed25519)", status: YES },
  { id: "serve", what: "serve on a project, connect() from the same runtime, a SIGTERM drain that exits 0", status: YES },
  {
    id: "permissions",
    what: "What the runtime must allow",
    status: { node: "nothing", bun: "nothing", deno: "`deno run -A`: without it the import fails at once with RUNTIME_PERMISSIONS naming the missing flags" },
  },
];
