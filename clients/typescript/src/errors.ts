/**
 * One tree of errors, like httpx's: catch `BunchError` for everything the client raises, `ApiError`
 * for every answer of the API that is not a success, or one kind by its class.
 *
 *     BunchError
 *     ├── ApiError                    status, detail, body, retryAfter
 *     │   ├── BadRequestError            400  the body could not be read
 *     │   ├── AuthenticationError        401  missing or unknown API key
 *     │   ├── OverBudgetError            402  figures: the quote and the budget's standing
 *     │   ├── PermissionError            403
 *     │   ├── NotFoundError              404  not in the caller's project
 *     │   ├── ConflictError              409  the current state forbids it
 *     │   ├── PayloadTooLargeError       413  a file, a body, too many files
 *     │   ├── UnsupportedMediaTypeError  415  not a supported image
 *     │   ├── ValidationError            422  errors: per field
 *     │   ├── RateLimitError             429  a quota; see retryAfter
 *     │   └── ServerError                5xx
 *     ├── ConnectionError             the request got no answer (network, DNS, refused)
 *     └── TimeoutError                waitForJob's time ran out
 */

import type { BudgetFigures, FieldError } from "./types.js";

export class BunchError extends Error {
  override name = "BunchError";
}

export interface ApiErrorInit {
  status: number;
  detail: string;
  /** The parsed JSON body (a problem document), or its text when it was not JSON. */
  body: unknown;
  headers: Headers;
  url: string;
}

/** An answer of the API that is not a success. */
export class ApiError extends BunchError {
  override name = "ApiError";
  readonly status: number;
  /** What went wrong, for a person: the body's `detail`. */
  readonly detail: string;
  readonly body: unknown;
  readonly headers: Headers;
  readonly url: string;
  /** Seconds to wait before trying again, when the answer says (`Retry-After`). */
  readonly retryAfter: number | undefined;

  constructor(init: ApiErrorInit) {
    super(`${init.detail} (HTTP ${init.status})`);
    this.status = init.status;
    this.detail = init.detail;
    this.body = init.body;
    this.headers = init.headers;
    this.url = init.url;
    this.retryAfter = parseRetryAfter(init.headers.get("Retry-After"));
  }
}

export class BadRequestError extends ApiError {
  override name = "BadRequestError";
}

export class AuthenticationError extends ApiError {
  override name = "AuthenticationError";
}

/** 402: the job would cost more than the project's budget has left this period; nothing was stored. */
export class OverBudgetError extends ApiError {
  override name = "OverBudgetError";
  /** The quote and the budget's standing, in USD (absent only if the body did not carry them). */
  readonly figures: BudgetFigures | undefined;

  constructor(init: ApiErrorInit) {
    super(init);
    this.figures =
      isRecord(init.body) && typeof init.body["quote_usd"] === "number"
        ? (init.body as unknown as BudgetFigures)
        : undefined;
  }
}

export class PermissionError extends ApiError {
  override name = "PermissionError";
}

export class NotFoundError extends ApiError {
  override name = "NotFoundError";
}

export class ConflictError extends ApiError {
  override name = "ConflictError";
}

export class PayloadTooLargeError extends ApiError {
  override name = "PayloadTooLargeError";
}

export class UnsupportedMediaTypeError extends ApiError {
  override name = "UnsupportedMediaTypeError";
}

/** 422: the request is wrong; `errors` lists the problems per field when they are per field. */
export class ValidationError extends ApiError {
  override name = "ValidationError";
  readonly errors: FieldError[];

  constructor(init: ApiErrorInit) {
    super(init);
    const errors = isRecord(init.body) ? init.body["errors"] : undefined;
    this.errors = Array.isArray(errors) ? (errors as FieldError[]) : [];
  }
}

export class RateLimitError extends ApiError {
  override name = "RateLimitError";
}

export class ServerError extends ApiError {
  override name = "ServerError";
}

/** The request got no answer: the network, DNS, a refused connection, or a connection cut mid-answer. */
export class ConnectionError extends BunchError {
  override name = "ConnectionError";
  readonly url: string;

  constructor(url: string, cause: unknown) {
    super(`No answer from ${url}: ${describe(cause)}`, { cause });
    this.url = url;
  }
}

/** waitForJob's time ran out before the job ended (the job itself goes on). */
export class TimeoutError extends BunchError {
  override name = "TimeoutError";
  readonly timeoutMs: number;

  constructor(message: string, timeoutMs: number) {
    super(message);
    this.timeoutMs = timeoutMs;
  }
}

const BY_STATUS: Record<number, new (init: ApiErrorInit) => ApiError> = {
  400: BadRequestError,
  401: AuthenticationError,
  402: OverBudgetError,
  403: PermissionError,
  404: NotFoundError,
  409: ConflictError,
  413: PayloadTooLargeError,
  415: UnsupportedMediaTypeError,
  422: ValidationError,
  429: RateLimitError,
};

/** The error of an answer whose body has been read already (`body`: parsed JSON, or text). */
export function apiError(response: Response, body: unknown): ApiError {
  const init: ApiErrorInit = {
    status: response.status,
    detail: detailOf(body, response),
    body,
    headers: response.headers,
    url: response.url,
  };
  const kind = BY_STATUS[response.status] ?? (response.status >= 500 ? ServerError : ApiError);
  return new kind(init);
}

/** Reads the answer's body and returns its error. */
export async function errorFromResponse(response: Response): Promise<ApiError> {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // A body cut off mid-way: the status still says what happened.
  }
  return apiError(response, parseJson(text));
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function detailOf(body: unknown, response: Response): string {
  if (isRecord(body)) {
    // Bunch's own style says `detail`; the style of the compatible documents says `error`.
    const said = body["detail"] ?? body["error"];
    if (typeof said === "string") return said;
    if (said !== undefined) return JSON.stringify(said);
  }
  if (typeof body === "string" && body.trim()) return body.trim().slice(0, 500);
  return response.statusText || `HTTP ${response.status}`;
}

/** Seconds, from delta-seconds or an HTTP date; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | null): number | undefined {
  if (value === null || !value.trim()) return undefined;
  if (/^\s*\d+\s*$/.test(value)) return Number(value);
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function describe(cause: unknown): string {
  if (cause instanceof Error) {
    // Node's fetch says "fetch failed" and keeps the reason (ECONNREFUSED, ...) in its cause.
    const inner = cause.cause instanceof Error ? `: ${cause.cause.message}` : "";
    return `${cause.message}${inner}`;
  }
  return String(cause);
}
