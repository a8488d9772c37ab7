/**
 * What every registry call takes: the platform to pick from an index, the transport (TLS, plain
 * HTTP registries, timeouts) and the credentials. Types only, so that callers' declarations need
 * nothing else of the registry client.
 */
import type { CredentialOptions } from "./auth.js";
import type { TransportOptions } from "./http.js";

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

export interface RegistryOptions extends TransportOptions, CredentialOptions {
  /** Platform to pick from an index (default: linux and the host's architecture). */
  platform?: Platform;
}
