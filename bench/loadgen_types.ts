/**
 * Messages between the load generator's coordinator ({@linkcode ./loadgen.ts}) and its
 * worker processes ({@linkcode ./loadgen_worker.ts}): one JSON object per line, commands on
 * the worker's stdin, replies on its stdout.
 *
 * @module
 */

import type { HistogramJson } from "./hist.ts";

/** How REGISTERs travel: the paper's four transport modes. */
export type TransportMode = "udp" | "tcp_persistent" | "tcp_with_open" | "tcp_per_transaction";

/** All transport modes, in the paper's order of cost (cheapest last). */
export const TRANSPORT_MODES: readonly TransportMode[] = [
  "udp",
  "tcp_persistent",
  "tcp_with_open",
  "tcp_per_transaction",
];

/** One REGISTER load run, as seen by one worker. */
export interface RunSpec {
  /** Transport mode. */
  mode: TransportMode;
  /** Server address. */
  host: string;
  /** Server port. */
  port: number;
  /** `closed`: keep `outstanding` requests in flight; `open`: send at `rate` per second. */
  loop: "closed" | "open";
  /** Requests in flight (closed loop). */
  outstanding: number;
  /** Requests per second (open loop). */
  rate: number;
  /** Time spent sending before measuring starts, ms (JIT and cache warm-up). */
  warmupMs: number;
  /** Time spent sending while measuring, ms. */
  durationMs: number;
  /** Upper bound on requests sent (including warm-up). */
  maxRequests: number;
  /** A request unanswered after this long is a failure, ms. */
  timeoutMs: number;
  /** First user number of this worker's slice. */
  userBase: number;
  /** Users in this worker's slice (requests cycle through them). */
  userCount: number;
  /** TCP persistent: connections this worker opens. */
  connections: number;
  /** TCP with open: connections held open at most; the oldest is closed beyond it. */
  holdMax: number;
  /** Source addresses to bind connections to (round robin); empty: let the kernel choose. */
  sourceAddrs: string[];
  /** UDP: retransmit per RFC 3261 timer E (T1 = 500 ms, doubling to T2 = 4 s). */
  retransmit: boolean;
  /** Open loop: requests in flight at most; beyond it a due request is skipped and counted. */
  maxOutstanding: number;
}

/** Counters and latencies of one run (one worker, or merged). */
export interface RunResult {
  /** Requests sent while measuring (first transmissions). */
  sent: number;
  /** 2xx responses. */
  ok: number;
  /** 503 responses. */
  rejected503: number;
  /** Other final responses (>= 300 except 503). */
  failed: number;
  /** Requests with no final response within the timeout. */
  timeouts: number;
  /** Connections that could not be opened or broke with requests in flight. */
  connectErrors: number;
  /** UDP retransmissions. */
  retransmits: number;
  /** Open loop: due requests not sent because `maxOutstanding` was reached. */
  skipped: number;
  /**
   * Measuring window: from the end of warm-up to the end of sending, ms. Rates divide by it;
   * answers that arrive after it (within the time limit) still count for their requests.
   */
  measuredMs: number;
  /** Latency of 2xx responses (from first send, or from connect for per-connection modes). */
  latency: HistogramJson;
  /** Latency of 503 responses. */
  latency503: HistogramJson;
  /** Count of final responses by status code. */
  statuses: Record<string, number>;
  /** Generator CPU time spent in user mode during the command, ms (summed over workers). */
  cpuUserMs: number;
  /** Generator CPU time spent in the kernel during the command, ms. */
  cpuSystemMs: number;
  /** Wall time of the command, ms (the longest worker when merged). */
  wallMs: number;
  /**
   * Event-loop lag of the generator: how late a 10 ms timer fired. A high p99 means the
   * generator itself was saturated and its latencies and rates are not the server's.
   */
  loopLag: HistogramJson;
}

/** Open (and register, or echo on) `count` connections and hold them. */
export interface OpenSpec {
  /** Server address. */
  host: string;
  /** Server port. */
  port: number;
  /** `sip`: REGISTER a distinct user on each; `echo`: send a line and wait for it back. */
  proto: "sip" | "echo";
  /** Connections to add to those already held. */
  count: number;
  /** Connections being set up at once. */
  concurrency: number;
  /** Source addresses (round robin). */
  sourceAddrs: string[];
  /** User number of the first new flow. */
  userBase: number;
  /** Per-connection time limit for connect + first exchange, ms. */
  timeoutMs: number;
  /** Stop opening once this many have failed (the server is full; waiting is pointless). */
  maxFailures: number;
}

/** Outcome of an {@linkcode OpenSpec}. */
export interface OpenResult {
  /** Connections opened and answered. */
  opened: number;
  /** Connections that failed (connect error, timeout, non-2xx). */
  failed: number;
  /** Flows held by this worker after the command. */
  held: number;
  /** First error message seen, if any. */
  firstError: string | null;
  /** Time from connect() to the connection being established. */
  setup: HistogramJson;
  /** Time from sending the first request to its answer. */
  firstExchange: HistogramJson;
  /** Wall time, ms. */
  wallMs: number;
  /** Generator CPU in user mode, ms. */
  cpuUserMs: number;
  /** Generator CPU in the kernel, ms. */
  cpuSystemMs: number;
}

/** Send requests over the held flows (round robin) at `rate` per second for `durationMs`. */
export interface RefreshSpec {
  /** Requests per second for this worker. */
  rate: number;
  /** Sending time, ms. */
  durationMs: number;
  /** Per-request time limit, ms. */
  timeoutMs: number;
}

/** A command to a worker. */
export type Command =
  | { op: "run"; id: number; worker: number; spec: RunSpec }
  | { op: "open"; id: number; worker: number; spec: OpenSpec }
  | { op: "refresh"; id: number; worker: number; spec: RefreshSpec }
  | { op: "close"; id: number }
  | { op: "exit"; id: number };

/** A worker's reply, tagged with the command id. */
export type Reply =
  | { id: number; ok: true; run: RunResult }
  | { id: number; ok: true; open: OpenResult }
  | { id: number; ok: true; closed: number }
  | { id: number; ok: false; error: string };
