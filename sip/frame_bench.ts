/**
 * Micro-benchmarks of the TCP stream framer: `deno bench --allow-all sip/`.
 *
 * @module
 */

import { StreamFramer } from "./frame.ts";
import { TYPICAL_REGISTER } from "./_bench_data.ts";

function repeat(bytes: Uint8Array, times: number): Uint8Array {
  const out = new Uint8Array(bytes.length * times);
  for (let i = 0; i < times; i++) out.set(bytes, i * bytes.length);
  return out;
}

const ONE = TYPICAL_REGISTER;
const TEN = repeat(TYPICAL_REGISTER, 10);
const HALF = ONE.length >> 1;
const A = ONE.subarray(0, HALF);
const B = ONE.subarray(HALF);
const PING = new TextEncoder().encode("\r\n\r\n");

const framer = new StreamFramer();

Deno.bench({
  name: "1 message per chunk",
  group: "frame",
  baseline: true,
  fn() {
    framer.push(ONE);
  },
});

Deno.bench({
  name: "10 messages per chunk (per chunk)",
  group: "frame",
  fn() {
    framer.push(TEN);
  },
});

Deno.bench({
  name: "1 message split over 2 chunks",
  group: "frame",
  fn() {
    framer.push(A);
    framer.push(B);
  },
});

Deno.bench({
  name: "keep-alive ping",
  group: "frame",
  fn() {
    framer.push(PING);
  },
});

Deno.bench({
  name: "new StreamFramer (per-flow cost)",
  group: "frame",
  fn() {
    new StreamFramer();
  },
});
