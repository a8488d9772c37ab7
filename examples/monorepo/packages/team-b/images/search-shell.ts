// A debugging shell on the bare base image: no warmup of its own, only an environment.
import { defineImage } from "supermachine/config";
import base from "@acme/base-images/images/base";

export default defineImage({ from: base, env: { PS1: "search$ " } });
