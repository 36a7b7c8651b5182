/** createBunchClient: the generated, typed client of every route, and the few calls that need more
 * than one request or more than a request (submit, watch, waitForJob, download). */

import createClient, { type Client } from "openapi-fetch";

import {
  ApiError,
  BunchError,
  ConflictError,
  ConnectionError,
  errorFromResponse,
  ServerError,
  TimeoutError,
  apiError,
} from "./errors.js";
import type { paths } from "./generated/schema.js";
import { backoffMs, checkIdempotencyKey, newIdempotencyKey } from "./idempotency.js";
import { asConnectionError, childController, sleep, Transport, type FetchLike } from "./transport.js";
import { isFinalStatus, type JobAccepted, type JobRequest, type JobStatusView, type UploadsCreated } from "./types.js";
import { watchJob, type JobEvent, type WatchOptions } from "./watch.js";

export interface BunchClientOptions {
  /** The gateway's URL, like "https://bunch.example.com" ("" for the page's own origin). */
  baseUrl: string;
  /** A project's API key, sent as `Authorization: Bearer`. Keep it on the server side; leave it
   * out in a browser that calls Bunch through a same-origin proxy which adds it. */
  apiKey?: string;
  /** The fetch to use (default: the global one, looked up at each call). */
  fetch?: FetchLike;
}

export interface RequestOptions {
  signal?: AbortSignal;
}

/** A file for upload: a Blob or File, or bytes with a name. */
export type UploadFile = Blob | { name: string; data: Blob | ArrayBuffer | Uint8Array; type?: string };

export interface UploadOptions extends RequestOptions {
  /** Sent as Idempotency-Key when given (uploads are stored by content, so a repeat is harmless). */
  idempotencyKey?: string;
}

export interface SubmitOptions extends RequestOptions {
  /** The key of this submit; a new random one when not given. Reuse it to repeat this submit. */
  idempotencyKey?: string;
  /** Attempts after the first, on no answer, a 5xx or a 409 (the same key still being answered). Default 3. */
  retries?: number;
}

export interface SubmitResult {
  job: JobAccepted;
  /** The key the job was submitted with: submitting again with it returns this job. */
  idempotencyKey: string;
  /** The answer is the replay of an earlier submit with this key (Idempotent-Replayed). */
  replayed: boolean;
}

export interface WaitOptions extends RequestOptions {
  /** Give up (TimeoutError) after this long; the job itself goes on. */
  timeoutMs?: number;
  /** Called with each event while waiting (progress bars). */
  onEvent?: (event: JobEvent) => void;
}

export interface BunchClient {
  /** The generated client (openapi-fetch): every route, typed by path. Pass a call to `unwrap`
   * to get its data or a typed error. */
  readonly api: Client<paths>;
  readonly baseUrl: string;
  /** POST /api/uploads: reference or input images (PNG, JPEG, WEBP, HEIC/HEIF), at most 100. */
  upload(files: readonly UploadFile[], options?: UploadOptions): Promise<UploadsCreated>;
  /** POST /api/jobs with an Idempotency-Key, retried with the same key until answered. */
  submit(body: JobRequest, options?: SubmitOptions): Promise<SubmitResult>;
  /** GET /api/jobs/{id}/status. */
  status(jobId: string, options?: RequestOptions): Promise<JobStatusView>;
  /** The job's events until its final status, over SSE, resumed after dropped connections. */
  watch(jobId: string, options?: WatchOptions): AsyncGenerator<JobEvent, void, undefined>;
  /** Waits for the job to end (over SSE) and returns its final status. */
  waitForJob(jobId: string, options?: WaitOptions): Promise<JobStatusView>;
  /** The presigned link of the job's ZIP (valid for an hour by default; needs no key). */
  downloadUrl(jobId: string, options?: RequestOptions): Promise<string>;
  /** The job's ZIP: a Response to stream (`.body`) or read whole (`.arrayBuffer()`, `.blob()`). */
  download(jobId: string, options?: RequestOptions): Promise<Response>;
}

export function createBunchClient(options: BunchClientOptions): BunchClient {
  const transport = new Transport(options.baseUrl, options.apiKey, options.fetch);
  const api = createClient<paths>({
    baseUrl: transport.baseUrl,
    headers: transport.authHeaders,
    fetch: transport.requestFetch,
  });
  api.use({
    onError({ error, request }) {
      // No answer becomes ConnectionError; an abort is thrown as it came (returning nothing).
      const mapped = asConnectionError(error, request.url, request.signal);
      return mapped instanceof Error ? mapped : undefined;
    },
  });

  async function status(jobId: string, { signal }: RequestOptions = {}): Promise<JobStatusView> {
    return unwrap(api.GET("/api/jobs/{job_id}/status", { params: { path: { job_id: jobId } }, signal }));
  }

  async function upload(files: readonly UploadFile[], { signal, idempotencyKey }: UploadOptions = {}) {
    const form = new FormData();
    files.forEach((file, index) => {
      if (file instanceof Blob) {
        const name = "name" in file && typeof file.name === "string" ? file.name : `file-${index}`;
        form.append("files", file, name);
      } else {
        const blob =
          file.data instanceof Blob ? file.data : new Blob([toBlobPart(file.data)], { type: file.type ?? "" });
        form.append("files", blob, file.name);
      }
    });
    const headers: Record<string, string> = {};
    if (idempotencyKey !== undefined) headers["Idempotency-Key"] = checkIdempotencyKey(idempotencyKey);
    const response = await transport.expectOk("/api/uploads", { method: "POST", body: form, headers, signal });
    return (await response.json()) as UploadsCreated;
  }

  async function submitOnce(payload: string, idempotencyKey: string, signal?: AbortSignal): Promise<SubmitResult> {
    const response = await transport.expectOk("/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
      body: payload,
      signal,
    });
    const job = (await response.json()) as JobAccepted;
    return { job, idempotencyKey, replayed: response.headers.get("Idempotent-Replayed") === "true" };
  }

  async function submit(body: JobRequest, options: SubmitOptions = {}): Promise<SubmitResult> {
    const { signal } = options;
    const idempotencyKey = checkIdempotencyKey(options.idempotencyKey ?? newIdempotencyKey());
    const retries = options.retries ?? 3;
    const payload = JSON.stringify(body);
    for (let attempt = 0; ; attempt++) {
      try {
        return await submitOnce(payload, idempotencyKey, signal);
      } catch (error) {
        if (signal?.aborted) throw signal.reason;
        const failure = retryableSubmitFailure(error, transport.url("/api/jobs"));
        if (failure === undefined || attempt >= retries) throw failure ?? error;
        await sleep(backoffMs(attempt, failure instanceof ApiError ? failure.retryAfter : undefined), signal);
      }
    }
  }

  async function waitForJob(jobId: string, options: WaitOptions = {}): Promise<JobStatusView> {
    const { timeoutMs, onEvent } = options;
    const { controller, release } = childController(options.signal);
    let timedOut = false;
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            controller.abort();
          }, timeoutMs);
    try {
      for (;;) {
        for await (const event of watchJob(transport, jobId, { signal: controller.signal })) onEvent?.(event);
        const view = await status(jobId, { signal: controller.signal });
        if (isFinalStatus(view.status)) return view;
      }
    } catch (error) {
      if (timedOut) throw new TimeoutError(`Job ${jobId} did not end within ${timeoutMs} ms.`, timeoutMs ?? 0);
      throw error;
    } finally {
      clearTimeout(timer);
      release();
    }
  }

  async function downloadUrl(jobId: string, { signal }: RequestOptions = {}): Promise<string> {
    const path = `/api/jobs/${encodeURIComponent(jobId)}/download`;
    // Not followed: the link is presigned, and must be fetched without the API key.
    const response = await transport.send(path, { redirect: "manual", signal });
    if (response.status >= 300 && response.status < 400) {
      const location = response.headers.get("Location");
      if (location) return new URL(location, response.url || transport.url(path)).href;
    }
    if (response.type === "opaqueredirect" || (response.status >= 300 && response.status < 400)) {
      // A browser hides a manual redirect's Location; the status view carries the same link.
      const view = await status(jobId, { signal });
      if (view.zip.ready && view.zip.url) return view.zip.url;
      throw new BunchError(`The ZIP of job ${jobId} was ready a moment ago and is not any more.`);
    }
    if (!response.ok) throw await errorFromResponse(response);
    throw new BunchError(`GET ${path} answered ${response.status} instead of a redirect to the ZIP.`);
  }

  async function download(jobId: string, options: RequestOptions = {}): Promise<Response> {
    const url = await downloadUrl(jobId, options);
    const response = await transport.fetch(url, { signal: options.signal });
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }

  return {
    api,
    baseUrl: transport.baseUrl,
    upload,
    submit,
    status,
    watch: (jobId, options) => watchJob(transport, jobId, options),
    waitForJob,
    downloadUrl,
    download,
  };
}

/** The data of a call of the generated client, or its typed error (ApiError and subclasses). */
export async function unwrap<Result extends { data?: unknown; error?: unknown; response: Response }>(
  call: Promise<Result> | Result,
): Promise<Exclude<Result["data"], undefined>> {
  const result = await call;
  if (!result.response.ok) throw apiError(result.response, result.error);
  return result.data as Exclude<Result["data"], undefined>;
}

/** What a failed submit attempt is when trying again with the same key may help: no answer (or one
 * cut off mid-body: the job may exist, and the key will tell), a 5xx, or a 409 (on this route: a
 * request with this key is still being answered). Undefined for a final answer (402, 422, ...). */
function retryableSubmitFailure(error: unknown, url: string): ApiError | ConnectionError | undefined {
  if (error instanceof ServerError || error instanceof ConflictError) return error;
  if (error instanceof BunchError) return error instanceof ConnectionError ? error : undefined;
  return new ConnectionError(url, error);
}

function toBlobPart(data: ArrayBuffer | Uint8Array): BlobPart {
  // A view of a SharedArrayBuffer is no BlobPart; copying makes any view one.
  return data instanceof Uint8Array ? new Uint8Array(data) : data;
}
