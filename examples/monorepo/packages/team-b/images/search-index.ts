// Team B's index: built on ingest (a chain of three below base).
import { defineImage } from "supermachine/config";
import { stamp, writeJson } from "@acme/helpers";
import ingest from "./search-ingest";

export default defineImage({
  from: ingest,
  warmup: async (vm) => {
    await writeJson(vm, "/srv/search/index.json", { shards: 2 });
    await stamp(vm, "search-index");
  },
});
