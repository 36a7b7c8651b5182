/** Idempotency keys, and the backoff between attempts of a request that carries one. */

import { BunchError } from "./errors.js";

const VISIBLE_ASCII = /^[\x21-\x7e]{1,255}$/;

/** A fresh key: a random UUID (crypto.randomUUID where there is one: Node, secure browser
 * contexts; else built from crypto.getRandomValues, which every browser has). */
export function newIdempotencyKey(): string {
  const crypto = globalThis.crypto as Crypto | undefined;
  if (typeof crypto?.randomUUID === "function") return crypto.randomUUID();
  if (typeof crypto?.getRandomValues !== "function") {
    throw new BunchError("No crypto.getRandomValues in this runtime: pass an idempotencyKey yourself.");
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = ((bytes[6] ?? 0) & 0x0f) | 0x40; // version 4
  bytes[8] = ((bytes[8] ?? 0) & 0x3f) | 0x80; // RFC 9562 variant
  const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The server takes 1-255 visible ASCII characters; anything else would not even fit a header. */
export function checkIdempotencyKey(key: string): string {
  if (!VISIBLE_ASCII.test(key)) {
    throw new BunchError("An idempotency key is 1 to 255 visible ASCII characters (no spaces).");
  }
  return key;
}

const MIN_DELAY_MS = 200;
const BASE_DELAY_MS = 500;
const MAX_DELAY_MS = 8_000;
const MAX_RETRY_AFTER_MS = 30_000;

/** How long to wait before attempt `attempt + 1`: what the server asked for (Retry-After), else
 * exponential from 0.5 s with jitter, so clients that failed together do not retry together. */
export function backoffMs(attempt: number, retryAfterSeconds?: number): number {
  if (retryAfterSeconds !== undefined) {
    return Math.min(Math.max(retryAfterSeconds * 1000, MIN_DELAY_MS), MAX_RETRY_AFTER_MS);
  }
  const ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** attempt);
  return ceiling / 2 + Math.random() * (ceiling / 2);
}
