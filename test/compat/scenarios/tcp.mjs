// vm.exposeTcp under this runtime: an echo server (busybox nc -e cat) takes 4 MiB and gives it
// back intact, and busybox httpd answers several fetches at once and a 4 MiB download.
import { createHash } from "node:crypto";
import { connect } from "node:net";
import { assert, busyboxPool, report } from "./_lib.mjs";

const MiB = 1024 * 1024;
const pool = await busyboxPool();
const vm = await pool.acquire();
try {
  await vm.exec({ argv: ["sh", "-c", "mkdir -p /www && echo '<h1>compat</h1>' > /www/index.html && dd if=/dev/urandom of=/www/big bs=1M count=4 2>/dev/null"] });
  const started = await vm.exec({ argv: ["sh", "-c", "httpd -p 127.0.0.1:8080 -h /www; nc -ll -p 7000 -e cat & sleep 0.3"] });
  assert.equal(started.exitCode, 0, started.stderr.toString());
  const echo = await vm.exposeTcp(0, 7000);
  const web = await vm.exposeTcp(0, 8080);
  try {
    const data = Buffer.alloc(4 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(i, i);
    const [host, port] = echo.localAddr.split(":");
    const echoed = await new Promise((resolve, reject) => {
      const s = connect({ host, port: Number(port) }, () => s.end(data));
      const got = [];
      s.on("data", (c) => got.push(c));
      s.on("end", () => resolve(Buffer.concat(got)));
      s.on("error", reject);
    });
    assert.equal(echoed.length, data.length);
    assert.ok(echoed.equals(data), "the echoed bytes differ");

    const pages = await Promise.all(Array.from({ length: 8 }, () => fetch(`http://${web.localAddr}/index.html`).then((r) => r.text())));
    assert.deepEqual(new Set(pages), new Set(["<h1>compat</h1>\n"]));
    const big = Buffer.from(await (await fetch(`http://${web.localAddr}/big`)).arrayBuffer());
    const guestSum = (await vm.exec({ argv: ["sha256sum", "/www/big"] })).stdout.toString().split(" ")[0];
    assert.equal(createHash("sha256").update(big).digest("hex"), guestSum);
    report({ scenario: "tcp", echoedBytes: echoed.length, downloadedBytes: big.length });
  } finally {
    await echo.stop();
    await web.stop();
  }
} finally {
  await vm.release();
  await pool.shutdown();
}
