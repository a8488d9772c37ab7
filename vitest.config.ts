// The suite in three tiers, run in this order by `npm test` (each alone by npm run test:<tier>):
//   unit  no VM, no root, no QEMU, no registry, no other user: seconds. A guard makes any start
//         of QEMU fail the file that caused it (test/helpers/unit-guard.ts).
//   host  the host's real tools and facts: QEMU binaries (never booting a guest), squashfs tools,
//         zstd, skopeo, a registry on loopback, the guest artifacts, the CLI.
//   vm    everything that bakes or boots a VM.
//   compat the library and the CLI under Node, Bun and Deno (test/compat): the compatibility
//         table of docs/runtimes.md, row by row, on real VMs.
//   browser the serve page in Debian's headless Chromium (test/browser), against a real server
//         and real VMs; screenshots go to test-results/browser/.
// The host and vm tiers run with SUPERMACHINE_HOME at a fresh temporary directory unless the user
// set one (test/helpers/tier-home.ts), so the suite proves it passes with any home.
import { defineConfig } from "vitest/config";

const tier = (name: string, groupOrder: number, setupFiles: string[] = [], globalSetup: string[] = []) => ({
  extends: true as const,
  test: {
    name,
    include: [`test/${name}/**/*.test.ts`],
    globalSetup: ["test/helpers/tier-home.ts", ...globalSetup],
    setupFiles: ["test/helpers/tier-env.ts", ...setupFiles],
    sequence: { groupOrder },
  },
});

export default defineConfig({
  test: {
    // VMs boot under software emulation here: keep concurrency low and timeouts generous.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 180_000,
    reporters: ["default"],
    projects: [tier("unit", 0, ["test/helpers/unit-guard.ts"]), tier("host", 1), tier("vm", 2), tier("compat", 3), tier("browser", 4)],
  },
});
