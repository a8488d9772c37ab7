// Team A's docs site, on the shared httpd image.
import { defineImage } from "supermachine/config";
import { stamp } from "@acme/helpers";
import httpd from "@acme/base-images/images/httpd";

export default defineImage({
  from: httpd,
  warmup: async (vm) => {
    await vm.writeFile("/srv/www/checkout.html", "<h1>checkout docs</h1>\n");
    await stamp(vm, "checkout-docs");
  },
});
