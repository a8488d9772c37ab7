// Team A's checkout-cron: the shared tools plus its own config.
import { defineImage } from "supermachine/config";
import { stamp, writeJson } from "@acme/helpers";
import tools from "@acme/base-images/images/tools";

export default defineImage({
  from: tools,
  env: { SERVICE: "checkout-cron" },
  warmup: async (vm) => {
    await writeJson(vm, "/etc/acme/checkout-cron.json", { service: "checkout-cron", team: "a" });
    await stamp(vm, "checkout-cron");
  },
});
