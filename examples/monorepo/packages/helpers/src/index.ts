// Warmup helpers shared by every team's images, imported as "@acme/helpers". A workspace package:
// its sources count in the keys of the images that use them, file by file.
export { stamp } from "./stamp";
export { installTool } from "./tools";
export { writeJson } from "./files";
