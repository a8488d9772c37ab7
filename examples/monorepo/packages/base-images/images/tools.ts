// Shared command-line tools, on top of base.
import { defineImage } from "supermachine/config";
import { installTool, stamp } from "@acme/helpers";
import base from "./base";

export default defineImage({
  from: base,
  warmup: async (vm) => {
    await installTool(vm, "acme-info", 'echo "acme: $(tr "\\n" " " < /etc/acme/images)"');
    await stamp(vm, "tools");
  },
});
