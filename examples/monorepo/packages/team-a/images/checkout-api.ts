// Team A's checkout-api: the shared tools plus its own config.
import { defineImage } from "supermachine/config";
import { stamp, writeJson } from "@acme/helpers";
import tools from "@acme/base-images/images/tools";

export default defineImage({
  from: tools,
  env: { SERVICE: "checkout-api" },
  warmup: async (vm) => {
    await writeJson(vm, "/etc/acme/checkout-api.json", { service: "checkout-api", team: "a" });
    await stamp(vm, "checkout-api");
  },
});
