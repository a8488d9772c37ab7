// 07-network.mjs: transparent egress. A warmup installs a package from a package index on the
// host; then a VM's program reaches that index with plain `fetch`, and nothing else.
//
// A VM has no network device. With `network: { allow: [...] }` the guest's agent takes every
// TCP connection and every DNS query a guest program makes and carries it to this process,
// which lets through only what `allow` names (by name, or by IP for a raw address). A name not
// allowed does not resolve (NXDOMAIN, so ENOTFOUND); an allowed one resolves to an address
// the agent maps back to the name. No proxy settings are needed: the programs below run with
// the proxy variables removed.
//
// Here the "outside world" is a tiny package index served by this script on the host's
// loopback, under the name pkgs.internal (`hosts` maps it to 127.0.0.1; a name that resolves
// to a private or loopback address also needs that IP in `allow`, so a DNS name cannot reach
// the host's own services by accident). The VMs run Debian's Node 18 (examples/_images.mjs).
//
//   node examples/07-network.mjs
import { createHash } from "node:crypto";
import { createServer } from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Image } from "supermachine";
import { nodeImageRef } from "./_images.mjs";

// The package: one shell script, listed in the index with its checksum.
const tool = '#!/bin/sh\necho "greet 1.0: hello, ${1:-world}"\n';
const index = { greet: { version: "1.0", url: "/files/greet-1.0.sh", sha256: createHash("sha256").update(tool).digest("hex") } };
let requests = 0;
const server = createServer((req, res) => {
  requests++;
  if (req.url === "/index/greet") return res.end(`${index.greet.version} ${index.greet.url} ${index.greet.sha256}\n`);
  if (req.url === index.greet.url) return res.end(tool);
  res.statusCode = 404;
  res.end("no such package\n");
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const port = server.address().port;
const index_ = `http://pkgs.internal:${port}`;
// Only the index, by name and by the loopback address it resolves to.
const network = { allow: [`pkgs.internal:${port}`, `127.0.0.1:${port}`], hosts: { "pkgs.internal": "127.0.0.1" } };

// Runs `node -e <code> <args...>` in the VM without any proxy variable: plain sockets and DNS.
const noProxy = ["env", "-u", "http_proxy", "-u", "HTTP_PROXY", "-u", "https_proxy", "-u", "HTTPS_PROXY", "-u", "all_proxy", "-u", "ALL_PROXY"];
const node = (code, ...args) => [...noProxy, "node", "--no-warnings", "-e", code, ...args];
// Prints the body of a URL (exit 1 on a bad status), or the error's code (ENOTFOUND, ...).
const GET = `fetch(process.argv[1]).then(async (r) => { if (!r.ok) throw new Error("HTTP " + r.status); process.stdout.write(await r.text()); })
  .catch((e) => { console.log("error " + (e.cause?.code ?? e.message)); process.exitCode = 1; })`;

// A fresh snapshots directory, so the warmup runs (a cached bake would not fetch anything).
const snapshotsDir = mkdtempSync(join(tmpdir(), "supermachine-example-"));
try {
  const image = await Image.build({
    ref: await nodeImageRef(),
    snapshotsDir,
    network, // what the warmup may reach
    warmup: async (vm) => {
      // Fetch the index entry, then the file, check its sha256 and install it.
      const entry = await vm.exec({ argv: node(GET, `${index_}/index/greet`), timeoutMs: 60_000 });
      if (entry.exitCode !== 0) throw new Error(`index: ${entry.stdout}${entry.stderr}`);
      const [version, path, sha256] = entry.stdout.toString().trim().split(" ");
      const file = await vm.exec({ argv: node(GET, `${index_}${path}`), timeoutMs: 60_000 });
      if (file.exitCode !== 0) throw new Error(`download: ${file.stdout}${file.stderr}`);
      await vm.writeFile("/usr/local/bin/greet", file.stdout, { mode: 0o755 });
      const check = await vm.exec({ argv: ["sh", "-c", `echo "${sha256}  /usr/local/bin/greet" | sha256sum -c --status`] });
      if (check.exitCode !== 0) throw new Error("greet: checksum mismatch");
      console.log(`warmup: installed greet ${version} from ${index_} (${requests} requests)`);
    },
  });

  // The pool's VMs get the same allowlist (a pool does not inherit the build's network; its
  // default is "none", no egress at all).
  const pool = await image.pool({ min: 1, max: 1, network });
  const vm = await pool.acquire();
  try {
    const r = await vm.exec({ argv: ["greet", "sandbox"] });
    console.log(`in the VM: ${r.stdout.toString().trim()}`);
    // An allowed name: fetch resolves it and connects, like anywhere else.
    const ok = await vm.exec({ argv: node(GET, `${index_}/index/greet`), timeoutMs: 60_000 });
    console.log(`in the VM, fetch ${index_}/index/greet -> ${ok.stdout.toString().split(" ").slice(0, 2).join(" ")} (version, file)`);
    // Any other name does not resolve, and no lookup leaves the host.
    const other = await vm.exec({ argv: node(GET, "http://example.com/"), timeoutMs: 60_000 });
    console.log(`in the VM, fetch http://example.com/ -> ${other.stdout.toString().trim()} (not in network.allow)`);
    // A raw address not in the list: the connection is reset at once, and counted with its reason.
    const raw = await vm.exec({ argv: node(GET, "http://192.0.2.1/"), timeoutMs: 60_000 });
    console.log(`in the VM, fetch http://192.0.2.1/ -> ${raw.stdout.toString().trim()} (not in network.allow)`);
    const { connections, refused, refusedBy, dnsQueries, dnsRefused } = vm.netStats();
    console.log(`netStats: ${JSON.stringify({ connections, refused, refusedBy, dnsQueries, dnsRefused })}`);
  } finally {
    await vm.release();
    await pool.shutdown();
  }
} finally {
  server.close();
  rmSync(snapshotsDir, { recursive: true, force: true });
}
