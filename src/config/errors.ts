import { SupermachineError, type ErrorDetails } from "../errors.js";

export interface ConfigErrorDetails extends ErrorDetails {
  /** Absolute path of the file at fault. */
  file?: string;
  /** The image at fault. */
  image?: string;
}

/**
 * A config file or an image module could not be found, loaded or validated. Codes:
 * CONFIG_NOT_FOUND, CONFIG_LOAD_FAILED, CONFIG_INVALID_MODULE, CONFIG_NO_IMAGES,
 * CONFIG_INVALID_NAME, CONFIG_NAME_MISMATCH, CONFIG_DUPLICATE_IMAGE, CONFIG_UNKNOWN_FROM, and the
 * option codes of a bad value (OPTION_INVALID, OPTION_MISSING, OPTION_UNKNOWN).
 */
export class ConfigError extends SupermachineError {
  /** Absolute path of the config file or image module at fault, when there is one. */
  readonly file: string | undefined;
  /** The image at fault, when there is one. */
  readonly image: string | undefined;

  constructor(code: string, message: string, details: ConfigErrorDetails = {}) {
    super(code, message, details);
    this.file = details.file;
    this.image = details.image;
  }
}
