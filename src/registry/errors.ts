import { SupermachineError } from "../errors.js";

export const REGISTRY_ERROR_CODES = [
  "REGISTRY_ABORTED", "REGISTRY_BLOB_UNKNOWN", "REGISTRY_CREDENTIALS_ERROR", "REGISTRY_HTTP_ERROR", "REGISTRY_MANIFEST_INVALID",
  "REGISTRY_MANIFEST_TOO_LARGE", "REGISTRY_MANIFEST_UNKNOWN", "REGISTRY_PLATFORM_UNAVAILABLE", "REGISTRY_SCHEMA1_UNSUPPORTED",
  "REGISTRY_TLS_ERROR", "REGISTRY_TOKEN_ERROR", "REGISTRY_TOO_MANY_REDIRECTS", "REGISTRY_UNAUTHORIZED", "REGISTRY_UNREACHABLE",
] as const;
export type RegistryErrorCode = (typeof REGISTRY_ERROR_CODES)[number];

/** A registry could not be reached, refused us, or answered something we cannot use. */
export class RegistryError extends SupermachineError<RegistryErrorCode> {}
