/**
 * `npm run bench [-- --json] [-- --quick] [-- --only <text>]`: every benchmark group on real
 * microVMs, reported as the project's bench contract says (one JSON object on stdout with --json;
 * progress on stderr). The groups are in bench/groups/, the harness in bench/harness.ts; the bench
 * exits non-zero when a metric could not be measured, listing it under `failed`.
 */
import { parseArgs } from "node:util";
import { chooseAccel } from "../src/engine/accel.js";
import { Image } from "../src/runtime/image.js";
import { GROUPS } from "./groups/index.js";
import { formatReport, runGroups } from "./harness.js";

const { values } = parseArgs({ options: { json: { type: "boolean" }, quick: { type: "boolean" }, only: { type: "string" } } });
const busybox = () => Image.build({ ref: "builtin:busybox" });
const { report, status } = await runGroups(GROUPS, {
  quick: values.quick ?? false,
  only: values.only,
  busybox,
  sharedVm: async () => {
    const pool = await (await busybox()).pool({ min: 1, max: 1 });
    const vm = await pool.acquire();
    return {
      vm,
      close: async () => {
        await vm.release();
        await pool.shutdown();
      },
    };
  },
  accel: () => chooseAccel().accel,
});
process.stdout.write(values.json ? JSON.stringify(report, null, 2) + "\n" : formatReport(report));
process.exitCode = status;
