/**
 * The SSE parser on what the gateway never sends but a proxy or another server may: CRLF and CR
 * line ends, a line end split across chunks, multi-line data, a BOM, comments, `retry`, an id
 * without an event, an unfinished event at the end. Exits 0 when every case holds.
 */

import { deepStrictEqual } from "node:assert/strict";

import { SseParser, type SseMessage } from "@bunch/client";

function parse(chunks: string[]): { messages: SseMessage[]; parser: SseParser } {
  const parser = new SseParser();
  const messages = chunks.flatMap((chunk) => parser.push(chunk));
  return { messages, parser };
}

const cases: [string, () => void][] = [
  [
    "fields, multi-line data, default event type, last id kept across events",
    () => {
      const { messages, parser } = parse(['id: 1-0\nevent: status\ndata: {"a":1}\n\n', "data: x\ndata: y\n\n"]);
      deepStrictEqual(messages, [
        { event: "status", data: '{"a":1}', id: "1-0" },
        { event: "message", data: "x\ny", id: "1-0" },
      ]);
      deepStrictEqual(parser.lastEventId, "1-0");
    },
  ],
  [
    "CRLF and CR line ends, CRLF split between chunks",
    () => {
      const { messages } = parse(["event: a\r\ndata: 1\r", "\n\r\n", "event: b\rdata: 2\r\r"]);
      deepStrictEqual(messages, [
        { event: "a", data: "1", id: "" },
        { event: "b", data: "2", id: "" },
      ]);
    },
  ],
  [
    "a line and a multi-byte character split across chunks",
    () => {
      const bytes = new TextEncoder().encode("data: caf\u00e9\n\n");
      const decoder = new TextDecoder();
      const parser = new SseParser();
      const messages = [
        ...parser.push(decoder.decode(bytes.subarray(0, 9), { stream: true })),
        ...parser.push(decoder.decode(bytes.subarray(9), { stream: true })),
      ];
      deepStrictEqual(messages, [{ event: "message", data: "caf\u00e9", id: "" }]);
    },
  ],
  [
    "BOM, comments, retry, no space after the colon, a field without a colon",
    () => {
      const { messages, parser } = parse(["\ufeff: ping\nretry: 1500\nretry: soon\ndata:x\ndata\n\n"]);
      deepStrictEqual(messages, [{ event: "message", data: "x\n", id: "" }]);
      deepStrictEqual(parser.retryMs, 1500);
    },
  ],
  [
    "an id alone moves the last id without an event; an id with NUL is ignored; data alone needed",
    () => {
      const { messages, parser } = parse(["id: 5-0\n\n", "id: 6\u00000\nevent: x\n\n"]);
      deepStrictEqual(messages, []);
      deepStrictEqual(parser.lastEventId, "5-0");
    },
  ],
  [
    "an event the stream ends in the middle of is not dispatched",
    () => {
      deepStrictEqual(parse(["data: complete\n\ndata: cut off"]).messages, [
        { event: "message", data: "complete", id: "" },
      ]);
    },
  ],
];

let failed = 0;
for (const [name, run] of cases) {
  try {
    run();
    console.log(`ok    ${name}`);
  } catch (error) {
    failed += 1;
    console.log(`FAIL  ${name}: ${error instanceof Error ? error.message : String(error)}`);
  }
}
console.log(failed === 0 ? "all cases passed" : `${failed} case(s) failed`);
process.exitCode = failed === 0 ? 0 : 1;
