/**
 * Server-sent events read from a fetch body, as the HTML standard parses them
 * (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
 * lines end in CRLF, LF or CR; `data` lines join with "\n"; `id` sets the last event id, which
 * lasts across events; `retry` sets the reconnection delay; comments (`: ping`) are skipped.
 * EventSource itself cannot send an Authorization header, hence this.
 */

export interface SseMessage {
  /** `event:`, or "message" when the event named none. */
  event: string;
  data: string;
  /** The last event id at dispatch (the id of this event or of an earlier one), "" if none yet. */
  id: string;
}

export class SseParser {
  /** The last `id:` seen: what a reconnection sends as Last-Event-ID. */
  lastEventId = "";
  /** The last valid `retry:` (ms), if any. */
  retryMs: number | undefined;
  private partial = "";
  private pendingCR = false;
  private started = false;
  private eventType = "";
  private data: string[] = [];

  /** Feed decoded text; returns the events it completed. */
  push(chunk: string): SseMessage[] {
    const out: SseMessage[] = [];
    let text = chunk;
    if (!this.started && text.length > 0) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    let start = 0;
    if (this.pendingCR && text.charCodeAt(0) === 10) start = 1; // the LF of a CRLF split across chunks
    if (text.length > 0) this.pendingCR = false;
    for (let i = start; i < text.length; i++) {
      const code = text.charCodeAt(i);
      if (code !== 10 && code !== 13) continue;
      const line = this.partial + text.slice(start, i);
      this.partial = "";
      this.line(line, out);
      if (code === 13) {
        if (i + 1 === text.length) this.pendingCR = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this.partial += text.slice(start);
    return out;
  }

  private line(line: string, out: SseMessage[]): void {
    if (line === "") {
      this.dispatch(out);
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.data.push(value);
        break;
      case "id":
        if (!value.includes("\0")) this.lastEventId = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retryMs = Number(value);
        break;
      default:
        break; // unknown fields are ignored
    }
  }

  private dispatch(out: SseMessage[]): void {
    const data = this.data;
    const event = this.eventType || "message";
    this.data = [];
    this.eventType = "";
    if (data.length === 0) return;
    out.push({ event, data: data.join("\n"), id: this.lastEventId });
  }
}

/** The events of a body, as they arrive. An event the stream ends in the middle of is dropped, as
 * the standard says; the reader is released however the iteration ends. */
export async function* readEvents(body: ReadableStream<Uint8Array>, parser: SseParser): AsyncGenerator<SseMessage> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let finished = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    finished = true;
    yield* parser.push(decoder.decode());
  } finally {
    if (!finished) {
      // Stopped early (the caller broke off, or the connection failed): close the connection.
      reader.cancel().catch(() => undefined);
    }
    reader.releaseLock();
  }
}
