/** How every request goes out: the base URL, the API key, the caller's fetch, and a request that
 * got no answer turned into ConnectionError (an abort stays an abort). */

import { ApiError, ConnectionError, errorFromResponse } from "./errors.js";

/** `fetch` or anything shaped like it (Next.js's, undici's, a test's wrapper). */
export type FetchLike = (input: RequestInfo | URL, init?: RequestInit) => Promise<Response>;

export class Transport {
  readonly baseUrl: string;
  private readonly apiKey: string | undefined;
  private readonly fetchImpl: FetchLike;

  constructor(baseUrl: string, apiKey: string | undefined, fetchImpl: FetchLike | undefined) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.apiKey = apiKey;
    // Looked up at each call, and never called as a method of another object: a detached
    // `window.fetch` throws "Illegal invocation" in browsers.
    this.fetchImpl = fetchImpl ?? ((input, init) => globalThis.fetch(input, init));
  }

  url(path: string): string {
    return `${this.baseUrl}${path}`;
  }

  /** The Authorization header, or none without a key (a same-origin proxy adds it). */
  get authHeaders(): Record<string, string> {
    return this.apiKey === undefined ? {} : { Authorization: `Bearer ${this.apiKey}` };
  }

  /** A request to the API with the key; any status comes back, only "no answer" throws. */
  send(path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    for (const [name, value] of Object.entries(this.authHeaders)) headers.set(name, value);
    return this.fetch(this.url(path), { ...init, headers });
  }

  /** Like `send`, and a status other than 2xx throws its ApiError. */
  async expectOk(path: string, init: RequestInit = {}): Promise<Response> {
    const response = await this.send(path, init);
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }

  /** A request as given (no key: for presigned links); only "no answer" throws. */
  async fetch(input: RequestInfo | URL, init: RequestInit = {}): Promise<Response> {
    try {
      return await this.fetchImpl(input, init);
    } catch (error) {
      throw asConnectionError(error, urlOf(input), init.signal);
    }
  }

  /** The `fetch` for openapi-fetch, which hands over a Request. */
  readonly requestFetch = (request: Request): Promise<Response> => this.fetchImpl(request);
}

/** What a failed fetch becomes: the abort itself when the caller aborted, else ConnectionError. */
export function asConnectionError(error: unknown, url: string, signal?: AbortSignal | null): unknown {
  if (signal?.aborted || isAbort(error) || error instanceof ConnectionError || error instanceof ApiError) {
    return error;
  }
  return new ConnectionError(url, error);
}

export function isAbort(error: unknown): boolean {
  return typeof error === "object" && error !== null && "name" in error && error.name === "AbortError";
}

function urlOf(input: RequestInfo | URL): string {
  if (typeof input === "string") return input;
  if (input instanceof URL) return input.href;
  return input.url;
}

/** Resolves after `ms`, or rejects with the signal's reason as soon as it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** A controller that aborts when `parent` does; `release` stops listening to the parent.
 * (AbortSignal.any would do, but older Safari and Node 20.0-20.2 lack it.) */
export function childController(parent?: AbortSignal): { controller: AbortController; release: () => void } {
  const controller = new AbortController();
  if (!parent) return { controller, release: () => undefined };
  if (parent.aborted) {
    controller.abort(parent.reason);
    return { controller, release: () => undefined };
  }
  const onAbort = (): void => controller.abort(parent.reason);
  parent.addEventListener("abort", onAbort, { once: true });
  return { controller, release: () => parent.removeEventListener("abort", onAbort) };
}
