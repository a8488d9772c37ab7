// 04-expose-tcp.mjs: reach a server inside the VM from the host.
// Starts busybox httpd on the guest's 127.0.0.1:8080, forwards a free host port to it with
// `vm.exposeTcp(0, 8080)` and fetches the page with the host's `fetch`. The VM has no network
// device: the connection is carried over the agent's channel.
//
//   node examples/04-expose-tcp.mjs
import { Image, connect } from "supermachine";

// With SUPERMACHINE_URL (and SUPERMACHINE_API_KEY) set, the pool is the "busybox" pool of a
// `supermachine serve` there instead (docs/serve.md, "The remote client"): the rest is unchanged.
const pool = process.env.SUPERMACHINE_URL
  ? (await connect(process.env.SUPERMACHINE_URL)).busybox
  : await (await Image.build({ ref: "builtin:busybox" })).pool({ min: 1, max: 1 });
const vm = await pool.acquire();
try {
  await vm.writeFile("/www/index.html", "<h1>hello from inside the VM</h1>\n");
  // Without -f, httpd binds the port and then goes to the background: exec returns at once.
  const started = await vm.exec({ argv: ["httpd", "-p", "127.0.0.1:8080", "-h", "/www"], timeoutMs: 10_000 });
  if (started.exitCode !== 0) throw new Error(`httpd failed: ${started.stderr}`);

  const forwarder = await vm.exposeTcp(0, 8080); // 0: pick a free host port
  try {
    console.log(`guest port 8080 is at http://${forwarder.localAddr}/`);
    const res = await fetch(`http://${forwarder.localAddr}/index.html`);
    console.log(`GET /index.html -> ${res.status} ${res.statusText}, ${res.headers.get("content-type")}`);
    console.log(`body: ${(await res.text()).trim()}`);
    const missing = await fetch(`http://${forwarder.localAddr}/nope.html`);
    await missing.body?.cancel();
    console.log(`GET /nope.html -> ${missing.status}`);
  } finally {
    await forwarder.stop();
  }
} finally {
  await vm.release();
  await pool.shutdown();
}
