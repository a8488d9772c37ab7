// Team B's reports: the shared tools; no shared helper beyond them.
import { defineImage } from "supermachine/config";
import tools from "@acme/base-images/images/tools";

export default defineImage({
  from: tools,
  env: { REPORTS: "/srv/reports" },
  warmup: async (vm) => {
    await vm.exec({ argv: ["mkdir", "-p", "/srv/reports"] });
  },
});
