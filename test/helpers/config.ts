// Fixture projects for the config tests: copied to a temp dir when a test writes to them.
import { cpSync, mkdirSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { expect, onTestFinished } from "vitest";
import { ConfigError } from "../../src/config/index.js";

/** A fixture project in the repository (read only). */
export function fixture(name: string): string {
  return fileURLToPath(new URL(`../fixtures/config/${name}`, import.meta.url));
}

/** A temp directory (real path), removed when the test ends. */
export function tempDir(): string {
  const dir = realpathSync(mkdtempSync(join(tmpdir(), "sm-config-")));
  onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A writable copy of a fixture project, outside the repository (so no node_modules/supermachine). */
export function copyFixture(name: string): string {
  const dir = tempDir();
  cpSync(fixture(name), dir, { recursive: true });
  return dir;
}

/** A project written from file contents (path relative to the project → source). */
export function writeProject(files: Record<string, string>, dir = tempDir()): string {
  for (const [path, source] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, path)), { recursive: true });
    writeFileSync(join(dir, path), source);
  }
  return dir;
}

/** The ConfigError a promise rejects with. */
export async function refused(p: Promise<unknown>): Promise<ConfigError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return e as ConfigError;
  }
  throw new Error("expected a ConfigError");
}
