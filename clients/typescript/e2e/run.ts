/**
 * The client against a real Bunch stack (tests/test_typescript_client.py starts one): upload,
 * idempotent submits, SSE watch and resume, download, and one typed error of each kind.
 *
 *   BUNCH_URL                  the gateway
 *   BUNCH_API_KEY              a project's key
 *   BUNCH_POOR_API_KEY         a key of a project whose budget no job fits (BUNCH_PROJECT_BUDGETS)
 *   BUNCH_QUEUED_IMAGES_QUOTA  the stack's BUNCH_PROJECT_MAX_QUEUED_IMAGES (a job over it gets 429)
 *
 * Prints each step; exits 0 only when every step passed.
 */

import { createServer } from "node:net";
import { performance } from "node:perf_hooks";

import {
  ApiError,
  AuthenticationError,
  BadRequestError,
  ConflictError,
  ConnectionError,
  createBunchClient,
  NotFoundError,
  OverBudgetError,
  PayloadTooLargeError,
  PermissionError,
  RateLimitError,
  TimeoutError,
  UnsupportedMediaTypeError,
  unwrap,
  ValidationError,
  type BunchClient,
  type FetchLike,
  type JobAccepted,
  type JobEvent,
  type SemiAutoJobRequest,
} from "@bunch/client";

import { png } from "./png.js";
import { zipEntryNames } from "./zip.js";

const baseUrl = required("BUNCH_URL");
const apiKey = required("BUNCH_API_KEY");
const poorKey = required("BUNCH_POOR_API_KEY");
const queuedImagesQuota = Number(required("BUNCH_QUEUED_IMAGES_QUOTA"));

const PROMPTS = ["a paper boat", "a glass lighthouse"];
const IMAGES_PER_PROMPT = 3;
const IMAGES = PROMPTS.length * IMAGES_PER_PROMPT;
const UNKNOWN_JOB = "0".repeat(32);

const client = createBunchClient({ baseUrl, apiKey });
let failures = 0;

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    console.error(`Set ${name} (see the top of e2e/run.ts).`);
    process.exit(2);
  }
  return value;
}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(message);
}

async function step(name: string, body: () => Promise<string | void>): Promise<void> {
  const started = performance.now();
  try {
    const note = await body();
    const ms = Math.round(performance.now() - started);
    console.log(`ok    ${name} (${ms} ms)${note ? `: ${note}` : ""}`);
  } catch (error) {
    failures += 1;
    console.log(`FAIL  ${name}: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  }
}

/** Runs `call`, expects it to throw `kind`, and returns the error. */
async function expectError<E extends Error>(
  kind: abstract new (...args: never[]) => E,
  call: () => Promise<unknown>,
): Promise<E> {
  try {
    await call();
  } catch (error) {
    if (error instanceof kind) return error;
    const shown = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
    throw new Error(`expected ${kind.name}, got ${shown}`);
  }
  throw new Error(`expected ${kind.name}, but the call succeeded`);
}

function statusError(error: ApiError, status: number): string {
  check(error.status === status, `status ${error.status}, expected ${status}`);
  check(error.detail.length > 0, "an error without a detail");
  return `${error.status} ${error.detail}`;
}

function semiAuto(referenceId: string, overrides: Partial<SemiAutoJobRequest> = {}): SemiAutoJobRequest {
  return {
    mode: "semi_auto",
    group: "typescript-e2e",
    prompts: PROMPTS,
    reference_ids: [referenceId],
    images_per_prompt: IMAGES_PER_PROMPT,
    ...overrides,
  };
}

function urlOf(input: RequestInfo | URL): URL {
  return new URL(typeof input === "string" ? input : input instanceof URL ? input.href : input.url);
}

/** A body that passes the stream through up to the end of its first event, then fails the way a
 * dropped connection does. */
function cutAfterFirstEvent(body: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let seen = "";
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { done, value } = await reader.read();
      if (done) {
        controller.close();
        return;
      }
      seen += decoder.decode(value, { stream: true });
      const first = /^data:.*\n\n/m.exec(seen);
      if (first === null) {
        controller.enqueue(value);
        return;
      }
      const before = seen.length - decoder.decode(value).length; // (value is ASCII: SSE of JSON)
      controller.enqueue(new TextEncoder().encode(seen.slice(before, first.index + first[0].length)));
      await reader.cancel();
      controller.error(new TypeError("terminated (the connection was dropped)"));
    },
    cancel: (reason) => reader.cancel(reason),
  });
}

async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

async function collect(events: AsyncIterable<JobEvent>): Promise<JobEvent[]> {
  const out: JobEvent[] = [];
  for await (const event of events) out.push(event);
  return out;
}

function increasing(events: JobEvent[]): boolean {
  const key = (id: string): [number, number] => {
    const [ms, seq] = id.split("-");
    return [Number(ms), Number(seq ?? 0)];
  };
  return events.every((event, i) => {
    if (i === 0) return true;
    const [a, b] = [key(events[i - 1]?.id ?? ""), key(event.id)];
    return b[0] > a[0] || (b[0] === a[0] && b[1] > a[1]);
  });
}

async function main(): Promise<void> {
  console.log(`@bunch/client end to end against ${baseUrl}`);
  let referenceId = "";
  let jobId = "";
  let key = "";
  let zipBytes = new Uint8Array();
  let finalEventId = "";
  const smallJobs: string[] = []; // waited for before the quota is filled

  await step("upload an 8x8 PNG", async () => {
    const created = await client.upload([new Blob([png(8, 8, [200, 40, 40])], { type: "image/png" })]);
    const upload = created.uploads[0];
    check(created.uploads.length === 1 && upload !== undefined, "one upload expected");
    check(upload.width === 8 && upload.height === 8 && upload.format === "png", JSON.stringify(upload));
    referenceId = upload.id;
    return `upload ${referenceId}`;
  });

  // Paused until the watch below is open, so that it sees the job's changes live.
  await step("pause the project's queue", async () => {
    await unwrap(client.api.POST("/api/queue/pause"));
  });

  await step("submit a semi-automatic job with an explicit idempotency key", async () => {
    key = `e2e-${crypto.randomUUID()}`;
    const result = await client.submit(semiAuto(referenceId), { idempotencyKey: key });
    check(result.idempotencyKey === key, "the key used is returned");
    check(!result.replayed, "the first submit is not a replay");
    check(result.job.status === "queued", `status ${result.job.status}`);
    jobId = result.job.id;
    return `job ${jobId}`;
  });

  await step("submit again with the same key: the same job, replayed", async () => {
    const again = await client.submit(semiAuto(referenceId), { idempotencyKey: key });
    check(again.job.id === jobId, `a second job ${again.job.id}`);
    check(again.replayed, "Idempotent-Replayed: true expected");
  });

  await step("a submit without a key gets a fresh one", async () => {
    const result = await client.submit(semiAuto(referenceId, { images_per_prompt: 1, prompts: ["one"] }));
    check(/^[0-9a-f-]{36}$/.test(result.idempotencyKey), `key ${result.idempotencyKey}`);
    check(result.job.id !== jobId && !result.replayed, "a new job expected");
    smallJobs.push(result.job.id);
    return `key ${result.idempotencyKey}`;
  });

  await step("8 concurrent submits with one key create one job", async () => {
    const shared = `e2e-concurrent-${crypto.randomUUID()}`;
    const body = semiAuto(referenceId, { images_per_prompt: 1, prompts: ["concurrent"] });
    const results = await Promise.all(Array.from({ length: 8 }, () => client.submit(body, { idempotencyKey: shared })));
    const ids = new Set(results.map((result) => result.job.id));
    check(ids.size === 1, `${ids.size} jobs: ${[...ids].join(", ")}`);
    check(results.filter((result) => !result.replayed).length === 1, "exactly one first answer expected");
    smallJobs.push(...ids);
  });

  await step("an answer lost on the network is retried with the same key: one job", async () => {
    const keys: (string | null)[] = [];
    let lostJobId = "";
    const lossy: FetchLike = async (input, init) => {
      const request = new Request(input, init);
      const response = await fetch(request);
      if (request.method === "POST" && urlOf(request.url).pathname === "/api/jobs") {
        keys.push(request.headers.get("Idempotency-Key"));
        if (keys.length === 1) {
          lostJobId = ((await response.json()) as JobAccepted).id;
          throw new TypeError("fetch failed (the answer was lost on its way back)");
        }
      }
      return response;
    };
    const lossyClient = createBunchClient({ baseUrl, apiKey, fetch: lossy });
    const result = await lossyClient.submit(semiAuto(referenceId, { images_per_prompt: 1, prompts: ["lost"] }));
    check(keys.length === 2 && keys[0] === keys[1] && keys[0] === result.idempotencyKey, `keys ${keys.join(", ")}`);
    check(result.job.id === lostJobId, `the retry made job ${result.job.id}, the lost answer was ${lostJobId}`);
    check(result.replayed, "the retry's answer is the replay of the first");
    smallJobs.push(result.job.id);
  });

  await step("watch the job over SSE: a snapshot, then its changes live until it completes", async () => {
    const watching = client.watch(jobId);
    const first = await watching.next();
    check(!first.done && first.value.event === "snapshot", `first event ${JSON.stringify(first.value)}`);
    check(first.value.data.job_id === jobId && first.value.data.status === "queued", JSON.stringify(first.value.data));
    await unwrap(client.api.POST("/api/queue/resume"));
    const events = [first.value, ...(await collect({ [Symbol.asyncIterator]: () => watching }))];
    const last = events.at(-1);
    check(last?.event === "status" && last.data.status === "completed", `last event ${JSON.stringify(last)}`);
    const statuses = events.filter((event) => event.event === "status").map((event) => event.data.status);
    check(statuses.includes("processing"), `statuses ${statuses.join(", ")}`);
    check(increasing(events), "event ids must increase");
    finalEventId = last.id;
    return events.map((event) => `${event.event}:${event.data.status ?? ""}`).join(" ");
  });

  await step("waitForJob returns the final status", async () => {
    const seen: string[] = [];
    const view = await client.waitForJob(jobId, { timeoutMs: 60_000, onEvent: (event) => seen.push(event.event) });
    check(view.status === "completed", `status ${view.status}`);
    check(view.progress.images_succeeded === IMAGES, `${view.progress.images_succeeded} of ${IMAGES} images`);
    check(view.zip.ready, "the ZIP is ready");
    return `${view.progress.images_succeeded} images, events ${seen.join(" ")}`;
  });

  await step("a dropped stream resumes with Last-Event-ID, nothing missed or repeated", async () => {
    const sent: (string | null)[] = [];
    const cutting: FetchLike = async (input, init) => {
      const response = await fetch(input, init);
      if (!urlOf(input).pathname.endsWith("/events")) return response;
      sent.push(new Headers(init?.headers).get("Last-Event-ID"));
      if (sent.length > 1 || response.body === null) return response;
      return new Response(cutAfterFirstEvent(response.body), { status: response.status, headers: response.headers });
    };
    const cuttingClient = createBunchClient({ baseUrl, apiKey, fetch: cutting });
    // From the start of the stream: every event of the job, cut after the first one.
    const events = await collect(cuttingClient.watch(jobId, { lastEventId: "0" }));
    check(sent.length === 2, `${sent.length} connections`);
    check(sent[0] === "0" && sent[1] === events[0]?.id, `Last-Event-ID sent: ${sent.join(", ")}`);
    check(events.length >= 2 && increasing(events), `events ${events.map((event) => event.id).join(", ")}`);
    const last = events.at(-1);
    check(last?.event === "status" && last.data.status === "completed", `the final event ${JSON.stringify(last)}`);
    return `${events.length} events over 2 connections`;
  });

  await step("resuming after the final event ends at once (204)", async () => {
    const events = await collect(client.watch(jobId, { lastEventId: finalEventId }));
    check(events.length === 0, `${events.length} events`);
  });

  await step("download the ZIP, streamed", async () => {
    const response = await client.download(jobId);
    check(response.body !== null, "a body");
    const parts: Uint8Array[] = [];
    const reader = response.body.getReader();
    for (let read = await reader.read(); !read.done; read = await reader.read()) parts.push(read.value);
    zipBytes = new Uint8Array(Buffer.concat(parts));
    const names = zipEntryNames(zipBytes);
    const images = names.filter((name) => name.endsWith(".png"));
    check(images.length === IMAGES, `${images.length} images in the ZIP, expected ${IMAGES}: ${names.join(", ")}`);
    check(
      names.some((name) => name.endsWith("manifest.json")),
      "a manifest.json",
    );
    return `${zipBytes.length} bytes, ${names.length} entries`;
  });

  await step("the link a browser gets (from the status, as a manual redirect hides Location)", async () => {
    const opaque: FetchLike = async (input, init) => {
      const response = await fetch(input, init);
      if (init?.redirect !== "manual" || response.status < 300 || response.status >= 400) return response;
      return new Response(null, { status: response.status }); // no Location, as in a browser
    };
    const browserLike = createBunchClient({ baseUrl, apiKey, fetch: opaque });
    const url = await browserLike.downloadUrl(jobId);
    const bytes = new Uint8Array(await (await browserLike.download(jobId)).arrayBuffer());
    check(Buffer.from(bytes).equals(Buffer.from(zipBytes)), "the same ZIP");
    return new URL(url).host;
  });

  // --- one typed error of each kind ---

  await step("400 BadRequestError: a body nested too deep", async () => {
    const error = await expectError(BadRequestError, () =>
      unwrap(
        client.api.POST("/api/jobs", {
          body: semiAuto(referenceId),
          bodySerializer: () => `${"[".repeat(40)}${"]".repeat(40)}`,
        }),
      ),
    );
    return statusError(error, 400);
  });

  await step("401 AuthenticationError: an unknown key", async () => {
    const stranger = createBunchClient({ baseUrl, apiKey: "not-a-key-of-this-stack" });
    return statusError(await expectError(AuthenticationError, () => stranger.status(jobId)), 401);
  });

  await step("402 OverBudgetError: a project whose budget no job fits", async () => {
    const poor = createBunchClient({ baseUrl, apiKey: poorKey });
    const upload = await poor.upload([{ name: "ref.png", data: png(8, 8, [10, 120, 200]), type: "image/png" }]);
    const id = upload.uploads[0]?.id ?? "";
    const error = await expectError(OverBudgetError, () => poor.submit(semiAuto(id)));
    const figures = error.figures;
    check(figures !== undefined, "the budget figures");
    check(figures.quote_usd > figures.remaining_usd, JSON.stringify(figures));
    return `${statusError(error, 402)} (quote $${figures.quote_usd}, left $${figures.remaining_usd}/${figures.period})`;
  });

  await step("403 PermissionError: a webhook token Bunch did not issue", async () => {
    const error = await expectError(PermissionError, () =>
      unwrap(client.api.POST("/internal/runpod/webhook", { params: { query: { token: "forged" } } })),
    );
    return statusError(error, 403);
  });

  await step("404 NotFoundError: an unknown job", async () =>
    statusError(await expectError(NotFoundError, () => client.status(UNKNOWN_JOB)), 404),
  );

  await step("409 ConflictError: canceling a completed job", async () => {
    const error = await expectError(ConflictError, () =>
      unwrap(client.api.POST("/api/jobs/{job_id}/cancel", { params: { path: { job_id: jobId } } })),
    );
    return statusError(error, 409);
  });

  await step("413 PayloadTooLargeError: 101 files in one upload", async () => {
    const files = Array.from({ length: 101 }, (_, i) => ({ name: `${i}.png`, data: png(1, 1, [i, i, i]) }));
    return statusError(await expectError(PayloadTooLargeError, () => client.upload(files)), 413);
  });

  await step("415 UnsupportedMediaTypeError: a text file as an image", async () => {
    const text = new Blob(["not an image"], { type: "text/plain" });
    return statusError(await expectError(UnsupportedMediaTypeError, () => client.upload([text])), 415);
  });

  await step("422 ValidationError: an invalid body, with its errors per field", async () => {
    const invalid = { ...semiAuto(referenceId), images_per_prompt: 0 };
    const error = await expectError(ValidationError, () => client.submit(invalid));
    check(
      error.errors.some((field) => field.loc.includes("images_per_prompt")),
      `errors ${JSON.stringify(error.errors)}`,
    );
    return statusError(error, 422);
  });

  await step("422 ValidationError: the same key with a different body", async () => {
    const other = semiAuto(referenceId, { prompts: ["something else"] });
    return statusError(await expectError(ValidationError, () => client.submit(other, { idempotencyKey: key })), 422);
  });

  await step("ConnectionError: nothing listens there (submit retried, then given up)", async () => {
    const nowhere = createBunchClient({ baseUrl: `http://127.0.0.1:${await closedPort()}`, apiKey });
    await expectError(ConnectionError, () => nowhere.status(jobId));
    const error = await expectError(ConnectionError, () => nowhere.submit(semiAuto(referenceId), { retries: 1 }));
    return error.message;
  });

  // The project's queue paused, one job takes the whole images quota and stays queued.
  await step("the other jobs end, the queue is paused", async () => {
    for (const id of smallJobs) check((await client.waitForJob(id, { timeoutMs: 60_000 })).status === "completed", id);
    await unwrap(client.api.POST("/api/queue/pause"));
    return `${smallJobs.length} jobs completed`;
  });
  let heldJobId = "";
  await step("a job as large as the images quota is queued", async () => {
    const held = await client.submit(
      semiAuto(referenceId, { prompts: ["held"], images_per_prompt: queuedImagesQuota }),
    );
    heldJobId = held.job.id;
    return `job ${heldJobId}`;
  });

  await step("429 RateLimitError: one image more than the project's quota", async () => {
    const more = semiAuto(referenceId, { prompts: ["one more"], images_per_prompt: 1 });
    const error = await expectError(RateLimitError, () => client.submit(more));
    check(typeof error.retryAfter === "number", "Retry-After expected");
    return `${statusError(error, 429)} (retry after ${error.retryAfter} s)`;
  });

  await step("TimeoutError: waitForJob on the job of the paused queue", async () => {
    const error = await expectError(TimeoutError, () => client.waitForJob(heldJobId, { timeoutMs: 500 }));
    return error.message;
  });

  await step("the held job is canceled, the queue resumed", async () => {
    const canceled = await unwrap(
      client.api.POST("/api/jobs/{job_id}/cancel", { params: { path: { job_id: heldJobId } } }),
    );
    check(canceled.status === "canceled", `status ${canceled.status}`);
    await unwrap(client.api.POST("/api/queue/resume"));
  });

  console.log(failures === 0 ? "all steps passed" : `${failures} step(s) failed`);
  process.exitCode = failures === 0 ? 0 : 1;
}

void main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
