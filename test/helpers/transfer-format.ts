export { decodeChunkIndex, digestOf } from "../../src/transfer/format.js";
import { keyOf, type SnapshotInputs } from "../../src/schema/key.js";
export const keyOfConfig = (c: { inputs: SnapshotInputs }): string => keyOf(c.inputs);
