export { decodeChunkIndex, digestOf } from "../../src/transfer/format.js";
import { keyOf } from "../../src/graph/keys.js";
import type { SnapshotInputs } from "../../src/store/snapshots.js";
export const keyOfConfig = (c: { inputs: SnapshotInputs }): string => keyOf(c.inputs);
