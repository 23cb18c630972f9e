/**
 * The classify stage: reads only the first line of a framed message and decides, before any full parse,
 * what it is and whether there is room for it (the paper's §7.1; SEDA admission control).
 *
 * Priority classes, highest first:
 * - 0 responses: we run no client transactions yet, so they match none; dropped and counted
 *   (RFC 3261 §18.1.2: a response matching no transaction is discarded).
 * - 1 ACK, CANCEL, BYE: work that ends work. ACK is absorbed (no INVITE transactions here); CANCEL and
 *   BYE pass admission while the registrar's queue has room at all.
 * - 2 REGISTER, and 3 other new requests: admitted only while the registrar's measured queue delay is
 *   under the target (class 3 under half of it), its queue has room, and the TCP flow they came on
 *   has fewer than `FLOW_MAX_IN_SERVICE` requests in service; otherwise answered with 503 +
 *   Retry-After built by a minimal line scan (`quickResponse`), never a full parse.
 *
 * TCP flows are always read (the paper's §7.1: reading stays ahead of parsing): a flow sending faster
 * than it is served gets 503s for its surplus, and its BYEs and responses are never stuck behind it.
 *
 * @module
 */
import { scanFirstLine } from "../sip/first_line.ts";
import { type QuickParts, quickParts, quickReply } from "../sip/serialize.ts";
import type { Inbound, Reply } from "./items.ts";
import type { SourceRateLimiter } from "./limits.ts";
import { localTag } from "./respond.ts";
import { MIN_BACKLOG, Stage } from "./runtime.ts";

/** Queue and worker settings: classification is a few byte comparisons, run inline. */
export const CLASSIFY_SETTINGS = { capacity: 1024, concurrency: 1, mode: "inline" } as const;

/** What classify needs to know about the stage after it. */
export interface ClassifyOptions {
  /** The registrar stage: its free capacity and measured delay drive admission. */
  readonly registrar: Stage<Inbound>;
  /** Queue delay (ms) above which new requests are refused. */
  readonly admissionDelayMs: number;
  /** Per-source REGISTER limiter, or null for none. */
  readonly registerLimit: SourceRateLimiter | null;
  /** Over the limit: answer 503 + Retry-After, or drop silently. */
  readonly limitAction: "503" | "drop";
  /**
   * How many 503s one source over its limit gets per second; the rest are dropped silently, so a
   * flood (perhaps with a forged source) is not answered datagram for datagram.
   */
  readonly limitReplies: SourceRateLimiter | null;
  /** The respond stage, for 503s and 400s built here. */
  readonly respond: (reply: Reply) => void;
  readonly onError: (error: unknown, stage: string) => void;
}

/** Queue length below which admission never refuses on delay alone (the runtime's, see there). */
export { MIN_BACKLOG };
/** Outside overload (the queue not standing), the expected delay refused is this many targets. */
export const BURST_TARGETS = 4;

/** The priority class of a first line: 0 response, 1 ACK/CANCEL/BYE, 2 REGISTER, 3 other, -1 invalid. */
export function priorityOf(bytes: Uint8Array): { cls: -1 | 0 | 1 | 2 | 3; method: string } {
  const line = scanFirstLine(bytes);
  if (line.kind === "response") return { cls: 0, method: "" };
  if (line.kind === "invalid") return { cls: -1, method: "" };
  const m = line.method;
  if (m === "REGISTER") return { cls: 2, method: m };
  if (m === "ACK" || m === "CANCEL" || m === "BYE") return { cls: 1, method: m };
  return { cls: 3, method: m };
}

const BAD_REQUEST_LINE = quickParts(400, "Bad Request Line");
/** The fixed parts of `503` + `Retry-After: n`, by n (1..60): no text is built per refusal. */
const unavailable: QuickParts[] = Array.from(
  { length: 61 },
  (_, n) => quickParts(503, "Service Unavailable", [["Retry-After", String(n)]]),
);

/** Retry-After (s) for a refusal: the time the backlog needs, at least 1 s (RFC 3261 §21.5.4). */
export function retryAfterFor(delayMs: number, targetMs: number): number {
  return Math.min(60, Math.max(1, Math.ceil(delayMs / targetMs)));
}

/**
 * A 503 + Retry-After for an overload refusal, built by a line scan of the raw request (no parse),
 * or null when the request carries too little to address an answer (no Via or CSeq).
 */
export function overloadReply(inbound: Inbound, retryAfter: number): Reply | null {
  const bytes = quickReply(inbound.bytes, unavailable[Math.min(60, retryAfter)]!, localTag());
  if (bytes === null) return null;
  return { inbound, request: null, status: 503, reason: "Service Unavailable", headers: [], bytes };
}

/** Builds the classify stage. */
export function createClassifyStage(options: ClassifyOptions): Stage<Inbound> {
  const { registrar } = options;
  const reply = (inbound: Inbound, status: number, reason: string, bytes: Uint8Array): void =>
    options.respond({ inbound, request: null, status, reason, headers: [], bytes });

  const stage: Stage<Inbound> = new Stage<Inbound>({
    name: "classify",
    ...CLASSIFY_SETTINGS,
    onError: options.onError,
    handler(inbound) {
      const { cls, method } = priorityOf(inbound.bytes);
      if (cls === 0) return stage.drop("stray-response");
      if (cls === -1) {
        // Not a SIP start line: answer 400 if the message carries enough to address one, else drop.
        const bytes = quickReply(inbound.bytes, BAD_REQUEST_LINE, localTag());
        if (bytes === null) return stage.drop("invalid");
        stage.drop("bad-request-line");
        return reply(inbound, 400, "Bad Request Line", bytes);
      }
      if (method === "ACK") return stage.drop("ack-absorbed");
      if (
        cls === 2 && options.registerLimit !== null &&
        !options.registerLimit.allow(inbound.source.address, Date.now())
      ) {
        // A pike-like limit per source IP: one flooding source cannot crowd out the others.
        if (
          options.limitAction === "drop" ||
          (options.limitReplies !== null &&
            !options.limitReplies.allow(inbound.source.address, Date.now()))
        ) {
          return stage.drop("rate-limited");
        }
        return refuse(inbound, options.admissionDelayMs, "rate-limited-503");
      }
      if (cls >= 2) {
        const delay = registrar.queueDelayMs();
        const target = cls === 2 ? options.admissionDelayMs : options.admissionDelayMs / 2;
        if (overloaded(delay, target) || registrar.free === 0) {
          return refuse(inbound, delay, "overload-503");
        }
        if (inbound.flow?.saturated) return refuse(inbound, delay, "flow-overload-503");
      }
      // A datagram or a TCP read may be a view of the transport's receive buffer: the queue keeps
      // a copy (the refused never need one).
      inbound = {
        bytes: inbound.bytes.slice(),
        source: inbound.source,
        flow: inbound.flow,
        udp: inbound.udp,
      };
      inbound.flow?.requestStarted();
      if (!registrar.offer(inbound, cls === 1)) {
        inbound.flow?.requestDone();
        refuse(inbound, registrar.queueDelayMs(), "overload-503");
      }
    },
  });

  /**
   * Whether new work is refused for the registrar's queue (SEDA's admission by queue delay, with
   * CoDel's distinction of a standing queue from a burst): while the queue is standing (overload),
   * once the expected delay passes the target; otherwise only past {@link BURST_TARGETS} targets.
   * A burst or the backlog of a GC pause is served, a little late, rather than refused; at the onset
   * of overload the queue holds at most that much until it is standing (100 ms), and what waited
   * past the deadline by then is answered 503 by the registrar. A few items behind an old head mean
   * the loop was busy elsewhere, not that the registrar is behind: never refused.
   */
  function overloaded(delay: number, target: number): boolean {
    if (registrar.queueLength < MIN_BACKLOG) return false;
    return delay > (registrar.standing ? target : BURST_TARGETS * target);
  }

  function refuse(inbound: Inbound, delayMs: number, why: string): void {
    const reply = overloadReply(inbound, retryAfterFor(delayMs, options.admissionDelayMs));
    if (reply === null) return stage.drop(`${why}-unanswerable`);
    stage.drop(why);
    options.respond(reply);
  }
  return stage;
}
