/** @bunch/client: a typed client of the Bunch API for Node 20+ and browsers. */

export {
  createBunchClient,
  unwrap,
  type BunchClient,
  type BunchClientOptions,
  type RequestOptions,
  type SubmitOptions,
  type SubmitResult,
  type UploadFile,
  type UploadOptions,
  type WaitOptions,
} from "./client.js";
export {
  ApiError,
  AuthenticationError,
  BadRequestError,
  BunchError,
  ConflictError,
  ConnectionError,
  NotFoundError,
  OverBudgetError,
  PayloadTooLargeError,
  PermissionError,
  RateLimitError,
  ServerError,
  TimeoutError,
  UnsupportedMediaTypeError,
  ValidationError,
  type ApiErrorInit,
} from "./errors.js";
export { newIdempotencyKey } from "./idempotency.js";
export { SseParser, type SseMessage } from "./sse.js";
export type { FetchLike } from "./transport.js";
export * from "./types.js";
export {
  isFinalEvent,
  type JobCounts,
  type JobEvent,
  type JobSnapshot,
  type JobUpdate,
  type WatchOptions,
} from "./watch.js";
export type { components, operations, paths } from "./generated/schema.js";
