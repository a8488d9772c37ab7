// A `supermachine serve` for tests: a temp project with busybox pools, a key file with one key,
// and the server in this process on a free loopback port.
import { mkdtempSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startServer, type ServeOptions, type SupermachineServer } from "../../src/index.js";
import { KeyStore } from "../../src/server/keys.js";

export const BUSYBOX_PROJECT = `import { defineConfig, defineImage } from "supermachine/config";
export default defineConfig({
  images: { box: defineImage({ ref: "builtin:busybox" }) },
  pools: {
    base: { image: "box", min: 1, max: 4 },
    nobody: { image: "box", min: 0, max: 2, user: "nobody" },
  },
});
`;

export interface TestServer {
  server: SupermachineServer;
  dir: string;
  keys: KeyStore;
  key: string;
  close(): Promise<void>;
}

/** A project directory holding `config` as its supermachine.config.ts. */
export function projectDir(config = BUSYBOX_PROJECT): string {
  const dir = realpathSync(mkdtempSync(join(tmpdir(), "sm-serve-")));
  writeFileSync(join(dir, "supermachine.config.ts"), config);
  return dir;
}

/** A server on a new project holding `config` (or on `options.cwd`, a project already written). */
export async function testServer(options: ServeOptions = {}, config?: string): Promise<TestServer> {
  const dir = options.cwd ?? projectDir(config);
  const keys = new KeyStore(join(dir, "keys.json"));
  const { key } = await keys.create({ name: "test" });
  const server = await startServer({ cwd: dir, listen: "127.0.0.1:0", keys: keys.path, logLevel: process.env.SM_SERVE_LOG ?? "silent", ...options });
  await server.ready;
  return {
    server,
    dir,
    keys,
    key,
    close: async () => {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
