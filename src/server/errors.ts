/**
 * Errors of `supermachine serve` and its clients: authentication, limits, unknown sandboxes or
 * pools, bad requests, a draining server, the key file. The HTTP layer maps each code to a status
 * (see `statusOf` in app.ts); the body carries the code, so a client can switch on it as on the
 * library's own. The class is defined in src/errors.ts (the remote client raises it too, and must
 * not load the server); this module keeps the server's imports where they were.
 */
export { ServerError, SERVER_ERROR_CODES, type ServerErrorCode } from "../errors.js";
