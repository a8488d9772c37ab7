/**
 * restoreState streams a state file into a socket QEMU listens on. QEMU may close that socket
 * with bytes it never read (killed by a pool's shutdown, or rejecting the state) after the file
 * was handed to the kernel: the host side then reads ECONNRESET. That must reach the caller as a
 * failed restore, never as an unhandled 'error' event that kills the owner's program (it did: a
 * README example crashed at pools.close()). A fake QMP peer plays QEMU so the timing is exact.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { restoreState } from "../../src/engine/migration.js";
import { QmpClient } from "../../src/engine/qmp.js";

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

/** A QMP peer whose incoming migration socket accepts, reads nothing, then resets the connection. */
function fakeQemu(dir: string): Promise<{ qmp: QmpClient; resets: Promise<void> }> {
  const qmpSock = join(dir, "qmp.sock");
  let incoming: Server | undefined;
  let resetAt = 0;
  let resetDone!: () => void;
  const resets = new Promise<void>((r) => (resetDone = r));
  return new Promise((resolve) => {
    const host = createServer((accepted) => resolve({ qmp: new QmpClient(accepted), resets }));
    host.listen(qmpSock, () => {
      const peer: Socket = connect(qmpSock);
      cleanups.push(() => {
        peer.destroy();
        host.close();
        incoming?.close();
      });
      let buf = "";
      const reply = (id: string, ret: unknown) => peer.write(JSON.stringify({ return: ret, id }) + "\n");
      peer.write(JSON.stringify({ QMP: { version: {}, capabilities: [] } }) + "\n");
      peer.on("data", (d) => {
        buf += d.toString();
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const msg = JSON.parse(buf.slice(0, nl)) as { execute: string; arguments?: { uri?: string }; id: string };
          buf = buf.slice(nl + 1);
          if (msg.execute === "migrate-incoming") {
            incoming = createServer({ pauseOnConnect: true }, (conn) => {
              // Let the host hand the whole file to the kernel, then close with it unread.
              setTimeout(() => {
                conn.destroy(); // unread bytes in its queue: the host reads ECONNRESET
                resetAt = Date.now();
                resetDone();
              }, 150);
            });
            incoming.listen(msg.arguments!.uri!.slice("unix:".length), () => reply(msg.id, {}));
          } else if (msg.execute === "query-status") {
            reply(msg.id, { status: resetAt && Date.now() - resetAt > 100 ? "paused" : "inmigrate" });
          } else if (msg.execute === "query-migrate") {
            reply(msg.id, { status: "failed", "error-desc": "load of migration failed: Input/output error" });
          } else {
            reply(msg.id, {});
          }
        }
      });
    });
  });
}

describe("restoreState", () => {
  it("reports QEMU closing the state socket unread as a failed restore, not a crash", { timeout: 10_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), "sm-restore-sock-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const state = join(dir, "state");
    writeFileSync(state, Buffer.alloc(64 * 1024, 7));
    const uncaught: Error[] = [];
    const onUncaught = (e: Error) => uncaught.push(e);
    process.on("uncaughtException", onUncaught);
    cleanups.push(() => process.off("uncaughtException", onUncaught));
    const { qmp, resets } = await fakeQemu(dir);
    await expect(restoreState(qmp, dir, state, false)).rejects.toMatchObject({ code: "ENGINE_RESTORE_FAILED" });
    await resets;
    await new Promise((r) => setTimeout(r, 50));
    expect(uncaught).toEqual([]);
  });
});
