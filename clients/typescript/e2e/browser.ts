/**
 * The client in a browser page of another origin than the gateway's (tests/test_typescript_client.py
 * serves e2e/browser.html and drives it in Chromium): what differs from Node is CORS, File and
 * canvas-made images, crypto.randomUUID of a secure context, and a manual redirect whose Location
 * the page may not read (download falls back to the status view's link).
 */

import { createBunchClient, NotFoundError, ValidationError } from "@bunch/client";

export interface BrowserReport {
  lines: string[];
  failures: number;
}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(message);
}

async function canvasPng(): Promise<File> {
  const canvas = document.createElement("canvas");
  canvas.width = 8;
  canvas.height = 8;
  const context = canvas.getContext("2d");
  check(context !== null, "no 2d context");
  context.fillStyle = "#3a7";
  context.fillRect(0, 0, 8, 8);
  const blob = await new Promise<Blob | null>((resolve) => canvas.toBlob(resolve, "image/png"));
  check(blob !== null, "no PNG from the canvas");
  return new File([blob], "canvas.png", { type: "image/png" });
}

export async function run(baseUrl: string, apiKey: string): Promise<BrowserReport> {
  const client = createBunchClient({ baseUrl, apiKey });
  const report: BrowserReport = { lines: [], failures: 0 };
  const step = async (name: string, body: () => Promise<string | void>): Promise<void> => {
    try {
      const note = await body();
      report.lines.push(`ok    ${name}${note ? `: ${note}` : ""}`);
    } catch (error) {
      report.failures += 1;
      report.lines.push(`FAIL  ${name}: ${error instanceof Error ? `${error.name}: ${error.message}` : String(error)}`);
    }
  };
  let referenceId = "";
  let jobId = "";
  const body = () => ({
    mode: "semi_auto" as const,
    group: "browser",
    prompts: ["a canvas"],
    reference_ids: [referenceId],
    images_per_prompt: 2,
  });

  await step("upload a File made on a canvas", async () => {
    const created = await client.upload([await canvasPng()]);
    referenceId = created.uploads[0]?.id ?? "";
    check(referenceId, "an upload id");
  });
  await step("submit twice with one key: one job, the replay header readable across origins", async () => {
    const first = await client.submit(body(), { idempotencyKey: `browser-${crypto.randomUUID()}` });
    const again = await client.submit(body(), { idempotencyKey: first.idempotencyKey });
    check(again.job.id === first.job.id && again.replayed && !first.replayed, JSON.stringify([first, again]));
    jobId = first.job.id;
  });
  await step("a key is made when none is given", async () => {
    const result = await client.submit({ ...body(), images_per_prompt: 1 });
    check(/^[0-9a-f-]{36}$/.test(result.idempotencyKey), result.idempotencyKey);
    await client.waitForJob(result.job.id, { timeoutMs: 60_000 });
  });
  await step("the same key with another body: ValidationError", async () => {
    const key = `browser-reused-${crypto.randomUUID()}`;
    await client.submit({ ...body(), prompts: ["other"] }, { idempotencyKey: key });
    try {
      await client.submit(body(), { idempotencyKey: key });
    } catch (error) {
      check(error instanceof ValidationError, `got ${String(error)}`);
      return;
    }
    throw new Error("no error");
  });
  await step("watch over SSE until the job completes", async () => {
    const seen: string[] = [];
    for await (const event of client.watch(jobId)) seen.push(`${event.event}:${event.data.status ?? ""}`);
    check(seen.at(-1)?.endsWith(":completed"), seen.join(" "));
    return seen.join(" ");
  });
  await step("waitForJob returns the final status", async () => {
    const view = await client.waitForJob(jobId, { timeoutMs: 60_000 });
    check(view.status === "completed" && view.progress.images_succeeded === 2, JSON.stringify(view.progress));
  });
  await step("an unknown job: NotFoundError", async () => {
    try {
      await client.status("0".repeat(32));
    } catch (error) {
      check(error instanceof NotFoundError, `got ${String(error)}`);
      return;
    }
    throw new Error("no error");
  });
  await step("the ZIP's link, though the redirect's Location is hidden from the page", async () => {
    const url = new URL(await client.downloadUrl(jobId));
    check(url.origin !== new URL(baseUrl).origin, `a link to the gateway itself: ${url.href}`);
    const zip = new Uint8Array(await (await client.download(jobId)).arrayBuffer());
    check(zip[0] === 0x50 && zip[1] === 0x4b, "not a ZIP");
    return `${zip.length} bytes from ${url.origin}`;
  });
  return report;
}
