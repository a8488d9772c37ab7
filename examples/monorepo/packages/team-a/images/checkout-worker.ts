// Team A's checkout-worker: the shared tools plus its own config.
import { defineImage } from "supermachine/config";
import { stamp, writeJson } from "@acme/helpers";
import tools from "@acme/base-images/images/tools";

export default defineImage({
  from: tools,
  env: { SERVICE: "checkout-worker" },
  warmup: async (vm) => {
    await writeJson(vm, "/etc/acme/checkout-worker.json", { service: "checkout-worker", team: "a" });
    await stamp(vm, "checkout-worker");
  },
});
