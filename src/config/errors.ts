import { NETWORK_ERROR_CODES, OPTION_ERROR_CODES, SupermachineError, type ErrorDetails } from "../errors.js";

export const CONFIG_ERROR_CODES = [
  "CONFIG_DUPLICATE_IMAGE", "CONFIG_INVALID_MODULE", "CONFIG_INVALID_NAME", "CONFIG_LOAD_FAILED", "CONFIG_LOCK_INVALID", "CONFIG_LOCK_WRITE_FAILED", "CONFIG_NAME_MISMATCH",
  "CONFIG_NOT_FOUND", "CONFIG_NO_IMAGES", "CONFIG_UNKNOWN_FROM",
  // A bad value in a config file: the option's own code, as Image.build or image.pool would give it.
  ...OPTION_ERROR_CODES,
  ...NETWORK_ERROR_CODES,
] as const;
export type ConfigErrorCode = (typeof CONFIG_ERROR_CODES)[number];

export interface ConfigErrorDetails extends ErrorDetails {
  /** Absolute path of the file at fault. */
  file?: string;
  /** The image at fault. */
  image?: string;
}

/** A config file or an image module could not be found, loaded or validated (CONFIG_ERROR_CODES). */
export class ConfigError extends SupermachineError<ConfigErrorCode> {
  /** Absolute path of the config file or image module at fault, when there is one. */
  readonly file: string | undefined;
  /** The image at fault, when there is one. */
  readonly image: string | undefined;

  constructor(code: ConfigErrorCode, message: string, details: ConfigErrorDetails = {}) {
    super(code, message, details);
    this.file = details.file;
    this.image = details.image;
  }
}
