// Team B's search page, on the shared httpd image.
import { defineImage } from "supermachine/config";
import { stamp } from "@acme/helpers";
import httpd from "@acme/base-images/images/httpd";

export default defineImage({
  from: httpd,
  warmup: async (vm) => {
    await vm.writeFile("/srv/www/search.html", "<h1>search</h1>\n");
    await stamp(vm, "search-site");
  },
});
