/** The snapshot cache's error class lives with the others (src/errors.ts), so a location is checked below the transfer code. */
export { CacheError, CACHE_ERROR_CODES, type CacheErrorCode } from "../errors.js";
