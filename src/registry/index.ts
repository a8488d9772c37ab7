/** OCI distribution API v2 client: pull images from registries into the blob store. */
export { RegistryError } from "./errors.js";
export {
  pullImage,
  resolveDigest,
  selectPlatform,
  platformString,
  RegistryClient,
  type Platform,
  type PullOptions,
  type PullProgress,
  type PullResult,
  type PulledLayer,
  type RegistryOptions,
} from "./client.js";
export {
  parseWwwAuthenticate,
  parseDockerConfig,
  dockerConfigPath,
  resolveCredentials,
  runCredentialHelper,
  authEntryFor,
  helperFor,
  normalizeAuthKey,
  serverUrlFor,
  clearTokenCache,
  DOCKER_HUB_AUTH_KEY,
  type Challenge,
  type Credentials,
  type CredentialOptions,
  type DockerConfig,
  type DockerAuthEntry,
} from "./auth.js";
export { Transport, isLoopback, type RetryPolicy, type TransportOptions } from "./http.js";
export { PushClient } from "./push.js";
