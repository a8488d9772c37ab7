// 08-e2b-sdk.mjs: the unchanged E2B SDK (`npm install e2b`) driving a local pool through
// `supermachine serve`, the way a user would run it: make a key, start the server on the
// project in examples/e2b-project, point the SDK at it with E2B_API_URL and E2B_SANDBOX_URL.
//
//   node examples/08-e2b-sdk.mjs
//
// By hand, the same thing is:
//   npx supermachine keys create            # prints e2b_...
//   npx supermachine serve -c examples/e2b-project/supermachine.config.ts
//   E2B_API_KEY=e2b_... E2B_API_URL=http://127.0.0.1:8080 E2B_SANDBOX_URL=http://127.0.0.1:8080 node your-e2b-program.mjs
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Sandbox } from "e2b";

const cli = join(dirname(fileURLToPath(import.meta.resolve("supermachine/package.json"))), "dist/src/cli/main.js");
const config = fileURLToPath(new URL("./e2b-project/supermachine.config.ts", import.meta.url));
const work = mkdtempSync(join(tmpdir(), "supermachine-example-"));
const keys = join(work, "keys.json");

// 1. A key for this server (kept as a hash in keys.json; the secret is printed once).
const { key } = JSON.parse(execFileSync(process.execPath, [cli, "keys", "create", "--name", "example", "--keys", keys, "--json"], { encoding: "utf8" }));

// 2. The server, on a free loopback port; it prints {"type":"ready","url":...} once the pool is warm.
const server = spawn(process.execPath, [cli, "serve", "--config", config, "--listen", "127.0.0.1:0", "--keys", keys, "--json", "--log-level", "warn"], { stdio: ["ignore", "pipe", "inherit"] });
const url = await new Promise((resolve, reject) => {
  let out = "";
  server.stdout.on("data", (d) => {
    out += d;
    for (const line of out.split("\n")) if (line.includes('"ready"')) resolve(JSON.parse(line).url);
  });
  server.once("exit", (code) => reject(new Error(`supermachine serve exited (${code})`)));
});
console.log(`server ready at ${url}`);

// 3. The E2B SDK, unchanged, pointed at it.
process.env.E2B_API_KEY = key;
process.env.E2B_API_URL = url;
process.env.E2B_SANDBOX_URL = url;

try {
  const t0 = performance.now();
  const sandbox = await Sandbox.create("base", { metadata: { example: "08" } });
  console.log(`sandbox ${sandbox.sandboxId} created in ${Math.round(performance.now() - t0)} ms`);

  const result = await sandbox.commands.run("echo hello from $(uname -s); echo to stderr >&2", {
    onStdout: (line) => process.stdout.write(`  stdout: ${line}`),
  });
  console.log(`exit ${result.exitCode}, stderr ${JSON.stringify(result.stderr)}`);

  await sandbox.files.write("/tmp/greeting.txt", "written through the E2B SDK");
  console.log(`read back: ${await sandbox.files.read("/tmp/greeting.txt")}`);

  const upper = await sandbox.commands.run("tr a-z A-Z", { background: true, stdin: true });
  await sandbox.commands.sendStdin(upper.pid, "from stdin\n");
  await sandbox.commands.closeStdin(upper.pid);
  console.log(`background process: ${(await upper.wait()).stdout.trim()}`);

  const found = await Sandbox.list({ query: { metadata: { example: "08" } } }).nextItems();
  console.log(`Sandbox.list by metadata: ${found.length} sandbox`);

  await sandbox.kill();
  console.log(`killed; running: ${await sandbox.isRunning()}`);
} finally {
  // 4. SIGTERM drains the server: live sandboxes are released, it exits 0.
  server.kill("SIGTERM");
  const [code, signal] = await new Promise((r) => server.once("exit", (...end) => r(end)));
  // Deno reports a child it sent SIGTERM as ended by the signal, even one that exited 0.
  console.log(`server drained, ${signal ? `ended by ${signal}` : `exit ${code}`}`);
  rmSync(work, { recursive: true, force: true });
}
