/**
 * Following one job over GET /api/jobs/{id}/events (services/gateway/routes/events.py).
 *
 * The stream opens with a `snapshot` of the job (or, after Last-Event-ID, with every entry after
 * that id), then sends `status` and `progress` events; it ends after the job's final status
 * (completed, failed, canceled). A stream that ends or breaks before that is opened again after
 * the server's `retry:` delay with Last-Event-ID, the last id seen, so nothing is missed or
 * repeated; 204 means the job is finished and nothing after that id is left.
 */

import { ApiError, ConnectionError, errorFromResponse, RateLimitError, ServerError } from "./errors.js";
import { readEvents, SseParser } from "./sse.js";
import { childController, sleep, type Transport } from "./transport.js";
import { isFinalStatus, type JobStatus } from "./types.js";

export interface JobCounts {
  images_total: number;
  images_succeeded: number;
  images_failed: number;
  runs_total: number;
  runs_done: number;
}

/** A `status` or `progress` event: the job's status and counters after the change. */
export interface JobUpdate extends JobCounts {
  type: "status" | "progress";
  job_id: string;
  project: string;
  status: JobStatus;
}

/** The job as it stands when a stream opens without Last-Event-ID. */
export interface JobSnapshot extends Partial<JobCounts> {
  type: "snapshot";
  job_id: string;
  project?: string;
  status?: JobStatus;
  mode?: string | null;
  group?: string | null;
  priority?: number;
  error?: string | null;
}

export type JobEvent =
  | { event: "snapshot"; id: string; data: JobSnapshot }
  | { event: "status"; id: string; data: JobUpdate }
  | { event: "progress"; id: string; data: JobUpdate };

/** Whether the job changes no more after this event. */
export function isFinalEvent(event: JobEvent): boolean {
  return event.event !== "progress" && isFinalStatus(event.data.status);
}

export interface WatchOptions {
  /** Resume after this event id (an id of an earlier event of this job). */
  lastEventId?: string;
  signal?: AbortSignal;
  /** Reconnections in a row without an event before the last failure is thrown (default 10). */
  maxReconnects?: number;
}

const DEFAULT_RETRY_MS = 3000; // EventSource's usual default, until the server says (it sends retry: first)
const KINDS: ReadonlySet<string> = new Set(["snapshot", "status", "progress"]);

export async function* watchJob(
  transport: Transport,
  jobId: string,
  options: WatchOptions = {},
): AsyncGenerator<JobEvent, void, undefined> {
  const { signal } = options;
  const maxReconnects = options.maxReconnects ?? 10;
  const path = `/api/jobs/${encodeURIComponent(jobId)}/events`;
  let lastEventId = options.lastEventId ?? "";
  let retryMs = DEFAULT_RETRY_MS;
  let failures = 0;
  for (;;) {
    signal?.throwIfAborted();
    const { controller, release } = childController(signal);
    let failure: unknown;
    let received = false;
    try {
      const headers: Record<string, string> = { Accept: "text/event-stream" };
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      const response = await transport.send(path, { headers, signal: controller.signal, cache: "no-store" });
      if (response.status === 204) return; // finished, and nothing after lastEventId is left to send
      if (!response.ok || response.body === null) throw await errorFromResponse(response);
      const parser = new SseParser();
      try {
        for await (const message of readEvents(response.body, parser)) {
          received = true;
          lastEventId = parser.lastEventId || lastEventId;
          const event = jobEvent(message.event, message.data, message.id);
          if (event === undefined) continue;
          yield event;
          if (isFinalEvent(event)) return;
        }
      } finally {
        retryMs = parser.retryMs ?? retryMs;
        lastEventId = parser.lastEventId || lastEventId;
      }
      // The stream ended before the job did (the server was cut off, restarted, or shed us).
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      if (!retryable(error)) throw error;
      failure =
        error instanceof ApiError || error instanceof ConnectionError
          ? error
          : new ConnectionError(transport.url(path), error);
    } finally {
      controller.abort(); // closes the connection whichever way the stream was left
      release();
    }
    failures = received ? 0 : failures + 1;
    if (failures > maxReconnects) {
      throw (
        failure ?? new ConnectionError(transport.url(path), new Error("the event stream keeps ending without events"))
      );
    }
    const asked = failure instanceof ApiError && failure.retryAfter !== undefined ? failure.retryAfter * 1000 : 0;
    await sleep(Math.max(retryMs, asked), signal);
  }
}

/** Worth another connection: no answer, a broken stream, or the server failing for now. A 4xx
 * (wrong key, unknown job, too many streams) would only be answered the same again. */
function retryable(error: unknown): boolean {
  if (error instanceof RateLimitError) return false;
  if (error instanceof ApiError) return error instanceof ServerError;
  return true; // ConnectionError, or a body read that failed mid-way (a TypeError in most runtimes)
}

function jobEvent(kind: string, data: string, id: string): JobEvent | undefined {
  if (!KINDS.has(kind)) return undefined; // a kind this client does not know yet
  let parsed: unknown;
  try {
    parsed = JSON.parse(data);
  } catch {
    return undefined;
  }
  if (typeof parsed !== "object" || parsed === null) return undefined;
  return { event: kind, id, data: parsed } as JobEvent;
}
