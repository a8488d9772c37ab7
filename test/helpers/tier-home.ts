// Vitest globalSetup of every tier: the supermachine home its tests run with, handed to the
// workers through `provide` (test/helpers/tier-env.ts sets the variables in each of them).
//
// - unit: always a fresh, empty home. Unit tests must not need anything from a home.
// - host, vm: the user's SUPERMACHINE_HOME when set; otherwise a fresh temporary home, different
//   from the one setup used, holding only what setup puts in a home besides the guest artifacts:
//   the built-in busybox layout (copied). The kernel and agent are found the way a user's scratch
//   home finds them (src/engine/artifacts.ts). So `npm test` proves the suite passes with a home
//   anywhere. Removed at the end of the run.
//
// Also provided: the home setup used (tests of `setup --check` on this host read that one) and
// the fixture cache (test/fixtures/build-fixtures.mjs), kept in setup's home so that a scratch
// home does not rebuild the fixture images on every run.
import { cpSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestProject } from "vitest/node";
import { supermachineHome } from "../../src/paths.js";

declare module "vitest" {
  export interface ProvidedContext {
    /** SUPERMACHINE_HOME for this tier's tests. */
    supermachineHome: string;
    /** The home `npm run setup` used: the user's SUPERMACHINE_HOME or the default. */
    setupHome: string;
    /** Where test/fixtures/build-fixtures.mjs caches its images. */
    fixturesDir: string;
  }
}

export default function setup(project: TestProject): () => void {
  const setupHome = supermachineHome(process.env);
  const userSet = Boolean(process.env.SUPERMACHINE_HOME);
  const scratch = project.name === "unit" || !userSet;
  let home = setupHome;
  if (scratch) {
    home = mkdtempSync(join(tmpdir(), `sm-test-home-${project.name}-`));
    if (project.name !== "unit") {
      const builtin = join(setupHome, "builtin", "busybox");
      if (!existsSync(join(builtin, "index.json"))) {
        rmSync(home, { recursive: true, force: true });
        throw new Error(`the built-in busybox image is missing from ${setupHome} (${builtin}): run "npm run setup" first`);
      }
      cpSync(builtin, join(home, "builtin", "busybox"), { recursive: true });
    }
  }
  project.provide("supermachineHome", home);
  project.provide("setupHome", setupHome);
  project.provide("fixturesDir", process.env.SUPERMACHINE_TEST_FIXTURES || join(setupHome, "fixtures"));
  return () => {
    if (scratch) rmSync(home, { recursive: true, force: true });
  };
}
