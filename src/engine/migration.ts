/**
 * QEMU migration streams, both ways, through unix sockets to and from this process, which reads
 * and writes the state files (QEMU never opens them, and never spawns a helper): a capture
 * writes a VM's device state (and RAM, when asked) to a file; a restore streams a file into a
 * QEMU started with `-incoming defer`. Also the socket helpers the engine's channels use.
 */
import { randomBytes } from "node:crypto";
import { chmodSync, chownSync, createReadStream, createWriteStream, rmSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { logger } from "../debug.js";
import { EngineError } from "../errors.js";
import type { SystemUser } from "../private.js";
import type { QmpCallOptions, QmpClient } from "./qmp.js";

const log = logger("engine");

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const RESTORE_HINT = "the snapshot is corrupt or was made by another QEMU, kernel or agent; bake it again";

/**
 * Polls `query-migrate` until the migration completed, backing off from 1 ms to `maxDelayMs`;
 * a failed (or, outgoing, cancelled) one is an EngineError. On the incoming side QEMU forgets
 * the migration once it completed, so no status there means done.
 */
async function waitMigration(
  qmp: QmpClient,
  side: { dir: "out"; what: string } | { dir: "in"; stateFile: string },
  opts: QmpCallOptions = {},
): Promise<void> {
  const maxDelayMs = side.dir === "out" ? 20 : 10;
  for (let delay = 1; ; delay = Math.min(delay * 2, maxDelayMs)) {
    opts.signal?.throwIfAborted();
    const st = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate", undefined, opts);
    if (st.status === "completed" || (side.dir === "in" && st.status === undefined)) return;
    if (side.dir === "out" && (st.status === "failed" || st.status === "cancelled")) {
      throw new EngineError("ENGINE_MIGRATION_FAILED", `${side.what} failed: ${st["error-desc"] ?? st.status}`);
    }
    if (side.dir === "in" && st.status === "failed") {
      throw new EngineError("ENGINE_RESTORE_FAILED", `restoring ${side.stateFile} failed: ${st["error-desc"] ?? "migration failed"}`, { hint: RESTORE_HINT });
    }
    await sleep(delay);
  }
}

/**
 * Has QEMU migrate to a unix socket this process listens on, and writes what arrives to
 * `stateFile` (0600). Resolves once the migration completed and the file is complete.
 */
export async function migrateToFile(qmp: QmpClient, runDir: string, user: SystemUser | undefined, stateFile: string, opts: QmpCallOptions): Promise<void> {
  const sock = join(runDir, `migrate-${randomBytes(4).toString("hex")}.sock`);
  const server = createServer();
  const written = new Promise<void>((resolve, reject) => {
    server.once("connection", (conn) => {
      server.close();
      pipeline(conn, createWriteStream(stateFile, { mode: 0o600 })).then(resolve, reject);
    });
    server.once("error", reject);
  });
  written.catch(() => {});
  try {
    server.listen(sock);
    await listening(server);
    shareSocket(sock, user);
    await qmp.execute("migrate", { uri: `unix:${sock}` }, opts);
    await waitMigration(qmp, { dir: "out", what: "snapshot" }, opts);
    // QEMU closes the stream once the migration completed: the file is whole when it ends.
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        written,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new EngineError("ENGINE_MIGRATION_FAILED", `snapshot: QEMU did not close the migration stream to ${stateFile}`)), 30_000);
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  } finally {
    server.close();
    rmSync(sock, { force: true });
  }
}

/**
 * Loads a device-state file into a QEMU started with `-incoming defer`, then resumes it. QEMU
 * listens on a unix socket in the run directory; this process streams the file into it.
 */
export async function restoreState(qmp: QmpClient, runDir: string, stateFile: string, ignoreShared: boolean): Promise<void> {
  await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: ignoreShared }] });
  const sock = join(runDir, "incoming.sock");
  await qmp.execute("migrate-incoming", { uri: `unix:${sock}` });
  // QEMU listens by the time migrate-incoming answers. A stream that breaks (QEMU rejected the
  // state and closed) is reported by the migration status below.
  const conn = connect(sock);
  // pipeline() drops its error listener once the file is written; QEMU may still close the socket
  // with bytes unread (it was killed, or rejected the state), which then errors with ECONNRESET.
  // Without a listener of our own that error would crash the owner's program.
  conn.on("error", (e: Error) => log("incoming-state socket %s: %s", sock, e.message));
  const sent = pipeline(createReadStream(stateFile), conn).catch((e: Error) => log("streaming %s into QEMU: %s", stateFile, e.message));
  try {
    for (let delay = 1; ; delay = Math.min(delay * 2, 10)) {
      const st = await qmp.execute<{ status?: string }>("query-status");
      if (st.status === "paused" || st.status === "running") break;
      if (st.status === "inmigrate") {
        await sleep(delay);
        continue;
      }
      throw new EngineError("ENGINE_RESTORE_FAILED", `restoring ${stateFile} left the VM in state ${JSON.stringify(st.status)}`);
    }
    await waitMigration(qmp, { dir: "in", stateFile });
  } finally {
    conn.destroy();
    await sent;
  }
  await qmp.execute("cont");
}

/**
 * Lets QEMU's user connect to a socket this process listens on (root's sockets are 0755), and
 * nobody else: its group, 0660. Nothing to do when QEMU runs as this process's user.
 */
export function shareSocket(path: string, user: SystemUser | undefined): void {
  if (!user) return;
  chownSync(path, -1, user.gid);
  chmodSync(path, 0o660);
}

/** Accept exactly one connection on a fresh unix socket. */
export function acceptOnce(path: string): { server: Server; conn: Promise<Socket> } {
  const server = createServer();
  const conn = new Promise<Socket>((resolve, reject) => {
    server.once("connection", (s) => {
      server.close();
      // Until its owner (the QMP or agent client) listens, an error on it is only logged: QEMU
      // may die before the channel is wrapped, and an unheard socket error would crash the program.
      s.on("error", (e: Error) => log("channel %s: %s", path, e.message));
      resolve(s);
    });
    server.once("error", reject);
  });
  conn.catch(() => {});
  server.listen(path);
  return { server, conn };
}

export function listening(server: Server): Promise<void> {
  return server.listening ? Promise.resolve() : new Promise((res, rej) => {
    server.once("listening", () => res());
    server.once("error", rej);
  });
}
