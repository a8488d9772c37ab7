// A static web server image: busybox httpd serving /srv/www (the workload each VM starts).
import { defineImage } from "supermachine/config";
import { installTool } from "@acme/helpers";
import base from "./base";

export default defineImage({
  from: base,
  warmup: async (vm) => {
    await vm.writeFile("/srv/www/index.html", "<h1>acme</h1>\n");
    await installTool(vm, "serve", "exec httpd -f -p 8080 -h /srv/www");
  },
});
