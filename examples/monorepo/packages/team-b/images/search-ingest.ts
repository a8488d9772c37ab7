// Team B's ingestion image: the shared tools and a data file staged from the repository.
import { defineImage } from "supermachine/config";
import { installTool, stamp } from "@acme/helpers";
import tools from "@acme/base-images/images/tools";

export default defineImage({
  from: tools,
  extraFiles: [{ hostPath: "../files/synonyms.txt", guestPath: "/srv/search/synonyms.txt" }],
  warmup: async (vm) => {
    await installTool(vm, "ingest", 'wc -l < /srv/search/synonyms.txt');
    await stamp(vm, "search-ingest");
  },
});
