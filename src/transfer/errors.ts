import { SupermachineError } from "../errors.js";

/**
 * A snapshot cache (a directory or a registry) could not be read or written, or served content
 * that failed verification.
 *
 * Codes: CACHE_LOCATION_INVALID, CACHE_KEY_INVALID, CACHE_MISSING, CACHE_MANIFEST_INVALID,
 * CACHE_CONFIG_INVALID, CACHE_INDEX_INVALID, CACHE_DIGEST_MISMATCH, CACHE_CHUNK_CORRUPT,
 * CACHE_KEY_MISMATCH, CACHE_ENGINE_MISMATCH, CACHE_TOO_LARGE, CACHE_SNAPSHOT_INVALID.
 */
export class CacheError extends SupermachineError {}
