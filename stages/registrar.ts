/**
 * The registrar stage: the full parse of a request and what RFC 3261 §10.3 asks of a registrar, steps
 * 1-8, with the location store deciding steps 6-7 atomically and answering only once the change is
 * durable (group commit). Also answers OPTIONS (§11.2) and refuses other methods (405/501, §8.2.1).
 *
 * Over UDP a client retransmits a REGISTER until it hears the final response (§17.1.2.2). The same
 * request processed twice would fail the CSeq check (§10.3 step 7), so the stage keeps, for 32 s (Timer J,
 * §17.2.2), the response sent to each UDP request it answered, keyed by the top Via branch, and resends
 * it to a retransmission; a retransmission of a request still in service is absorbed.
 *
 * @module
 */
import {
  aorOf,
  header,
  headerAll,
  parseContacts,
  parseCSeq,
  parseExpires,
  parseNameAddr,
  parseUri,
  parseVia,
  uriKey,
} from "../sip/headers.ts";
import type { SipRequest } from "../sip/message.ts";
import { KNOWN_METHODS } from "../sip/first_line.ts";
import { parseMessage } from "../sip/parse.ts";
import { quickResponse } from "../sip/serialize.ts";
import type { ContactChange, LocationStore, RegisterChange } from "../storage/location_store.ts";
import type { Inbound, Reply } from "./items.ts";
import { overloadReply, retryAfterFor } from "./classify.ts";
import { localTag } from "./respond.ts";
import { Stage } from "./runtime.ts";

/**
 * Queue and worker settings. Deferred, so reading and classify run ahead of parsing under load and the
 * queue's delay is measurable; a large worker set because each item mostly waits for a group commit.
 */
export const REGISTRAR_SETTINGS = {
  capacity: 16384,
  concurrency: 8192,
  mode: "deferred",
  budgetMs: 4,
} as const;

/** Methods this server handles (the Allow header, §20.5). */
export const ALLOW = "REGISTER, OPTIONS";
/** Extensions we support (§20.37): Path (RFC 3327). */
export const SUPPORTED = ["path"] as const;
const KNOWN = new Set(KNOWN_METHODS);

/** The outcome of checking a REGISTER's credentials (RFC 3261 §22). */
export type AuthOutcome =
  | { readonly ok: true; readonly username: string }
  | {
    readonly ok: false;
    readonly status: number;
    readonly reason?: string;
    readonly headers?: ReadonlyArray<readonly [string, string]>;
    readonly retryAfter?: number;
  };

/** Digest authentication as the registrar uses it (§10.3 steps 3-4). */
export interface RegistrarAuth {
  /** Checks the request's credentials for `realm`; the authenticated user must be `toUser`. */
  check(request: SipRequest, realm: string, toUser: string): Promise<AuthOutcome>;
}

/** What the registrar needs. */
export interface RegistrarOptions {
  readonly store: LocationStore;
  /** Domains served; empty serves any. */
  readonly domains: readonly string[];
  readonly minExpires: number;
  readonly maxExpires: number;
  readonly defaultExpires: number;
  readonly maxBindings: number;
  /** Longest Contact stored, bytes (bounds a query's answer, so UDP cannot amplify much). */
  readonly maxContactLength: number;
  /** This worker's number, recorded with each binding. */
  readonly worker: number;
  readonly auth: RegistrarAuth | null;
  readonly respond: (reply: Reply) => void;
  /** The queue wait (ms) by which the queue is judged standing (overload): the admission target. */
  readonly targetMs?: number;
  /**
   * While the queue is standing, a request that waited longer than this (ms) is answered 503 +
   * Retry-After instead of being served (see the stage runtime's `deadlineMs`). @default none
   */
  readonly deadlineMs?: number;
  readonly onError: (error: unknown, stage: string) => void;
}

/**
 * Responses sent to UDP requests, for retransmissions: key (branch, sent-by, method) -> bytes, or
 * null while the original is in service. Entries expire after `ttlMs` (Timer J) or when more than
 * `maxEntries` are held, oldest first. The expiry order is a FIFO ring of keys beside the Map, so that
 * no entry is ever deleted and re-inserted (V8's Map leaves a hole per delete, and a scan from its
 * front over many holes made each insertion slower as the table filled).
 */
export class RetransmissionCache {
  readonly #entries = new Map<string, { bytes: Uint8Array | null; readonly at: number }>();
  #keys: (string | undefined)[] = new Array(1024);
  #times = new Float64Array(1024);
  #head = 0;
  #size = 0;
  constructor(readonly ttlMs = 32_000, readonly maxEntries = 200_000) {}

  /** The cached response, `"pending"` if the original is in service, or undefined if new. */
  get(key: string): Uint8Array | "pending" | undefined {
    const e = this.#entries.get(key);
    if (e === undefined) return undefined;
    return e.bytes ?? "pending";
  }

  /** Records a request in service (bytes null) or, later, its response. */
  set(key: string, bytes: Uint8Array | null, at: number): void {
    const e = this.#entries.get(key);
    if (e !== undefined) {
      e.bytes = bytes; // the response to a request recorded as pending: keeps its place
      return;
    }
    this.#entries.set(key, { bytes, at });
    this.#push(key, at);
    const limit = at - this.ttlMs;
    while (
      this.#size > 0 && (this.#times[this.#head]! <= limit || this.#entries.size > this.maxEntries)
    ) {
      const old = this.#keys[this.#head]!;
      const entry = this.#entries.get(old);
      // The ring may name a key deleted (and perhaps recorded again) since: drop only that record.
      if (entry !== undefined && entry.at === this.#times[this.#head]) this.#entries.delete(old);
      this.#keys[this.#head] = undefined;
      this.#head = (this.#head + 1) % this.#keys.length;
      this.#size--;
    }
  }

  delete(key: string): void {
    this.#entries.delete(key);
  }

  get size(): number {
    return this.#entries.size;
  }

  #push(key: string, at: number): void {
    if (this.#size === this.#keys.length) {
      // Grow: unroll the ring into arrays twice as long.
      const keys = new Array<string | undefined>(this.#keys.length * 2);
      const times = new Float64Array(this.#keys.length * 2);
      for (let i = 0; i < this.#size; i++) {
        const j = (this.#head + i) % this.#keys.length;
        keys[i] = this.#keys[j];
        times[i] = this.#times[j]!;
      }
      this.#keys = keys;
      this.#times = times;
      this.#head = 0;
    }
    const slot = (this.#head + this.#size) % this.#keys.length;
    this.#keys[slot] = key;
    this.#times[slot] = at;
    this.#size++;
  }
}

const Q_VALUE = /^(0(\.\d{0,3})?|1(\.0{0,3})?)$/;

let dateSecond = 0;
let dateText = "";
/** The Date header value (§20.17), computed once a second. */
function dateHeader(now: number): string {
  const s = Math.floor(now / 1000);
  if (s !== dateSecond) {
    dateSecond = s;
    dateText = new Date(s * 1000).toUTCString();
  }
  return dateText;
}

type Answer = {
  status: number;
  reason: string;
  headers?: ReadonlyArray<readonly [string, string]>;
};

/** Builds the registrar stage. `responses` counts answers by status code. */
export function createRegistrarStage(
  options: RegistrarOptions,
): { stage: Stage<Inbound>; responses: Map<number, number>; retransmissions: RetransmissionCache } {
  const responses = new Map<number, number>();
  const cache = new RetransmissionCache();
  const served = new Set(options.domains);
  const source = (inbound: Inbound) => ({
    transport: inbound.source.transport,
    address: inbound.source.address,
    port: inbound.source.port,
    worker: options.worker,
    flowId: inbound.source.flowId,
  });

  function send(inbound: Inbound, request: SipRequest, answer: Answer, cacheKey: string | null) {
    responses.set(answer.status, (responses.get(answer.status) ?? 0) + 1);
    const reply: Reply = {
      inbound,
      request,
      status: answer.status,
      reason: answer.reason,
      headers: answer.headers ?? [],
      bytes: null,
      ...(cacheKey === null
        ? {}
        : { onSent: (bytes: Uint8Array) => cache.set(cacheKey, bytes, Date.now()) }),
    };
    options.respond(reply);
  }

  /** §8.2.2.3: Require/Proxy-Require options we do not support -> 420 listing them. */
  function unsupportedExtensions(req: SipRequest): Answer | null {
    const unsupported = [...headerAll(req, "require"), ...headerAll(req, "proxy-require")]
      .map((o) => o.trim().toLowerCase())
      .filter((o) => o !== "" && !(SUPPORTED as readonly string[]).includes(o));
    if (unsupported.length === 0) return null;
    return {
      status: 420,
      reason: "Bad Extension",
      headers: [["Unsupported", unsupported.join(", ")]],
    };
  }

  async function register(req: SipRequest, inbound: Inbound): Promise<Answer> {
    // Step 1: the Request-URI names a domain we serve.
    const ruri = parseUri(req.uri);
    if (!ruri.ok) return { status: ruri.status, reason: ruri.reason };
    if (ruri.value.scheme !== "sip" && ruri.value.scheme !== "sips") {
      return { status: 416, reason: "Unsupported URI Scheme" };
    }
    if (served.size > 0 && !served.has(ruri.value.host.toLowerCase())) {
      return { status: 403, reason: "Domain Not Served" };
    }
    // Step 5 (before auth, which needs the To user): the AOR from To, canonical.
    const toValue = header(req, "to")!;
    const to = parseNameAddr(toValue);
    if (!to.ok) return { status: 400, reason: "Malformed To Header" };
    const toUri = parseUri(to.value.uri);
    if (!toUri.ok) return { status: toUri.status, reason: "Malformed To URI" };
    if (toUri.value.scheme !== "sip" && toUri.value.scheme !== "sips") {
      return { status: 416, reason: "Unsupported URI Scheme" };
    }
    if (served.size > 0 && !served.has(toUri.value.host.toLowerCase())) {
      return { status: 404, reason: "Not Found" };
    }
    const aor = aorOf(toUri.value);
    // §20.20: From must be a valid name-addr or addr-spec (RFC 4475 §3.1.2.15 baddn).
    if (!parseNameAddr(header(req, "from")!, "From").ok) {
      return { status: 400, reason: "Malformed From Header" };
    }
    // Steps 3-4: authenticate, and the user may only register its own AOR.
    if (options.auth !== null) {
      const auth = await options.auth.check(
        req,
        toUri.value.host.toLowerCase(),
        toUri.value.user ?? "",
      );
      if (!auth.ok) {
        const headers = [...(auth.headers ?? [])];
        if (auth.retryAfter !== undefined) headers.push(["Retry-After", String(auth.retryAfter)]);
        return { status: auth.status, reason: auth.reason ?? reasonOf(auth.status), headers };
      }
    }
    const callId = header(req, "call-id")!;
    const cseq = parseCSeq(header(req, "cseq")!);
    if (!cseq.ok) return { status: 400, reason: "Malformed CSeq Header" };
    const expiresHeader = header(req, "expires");
    let headerExpires: number | null = null;
    if (expiresHeader !== undefined) {
      // §20.19: a malformed value is treated as 3600.
      headerExpires = parseExpires(expiresHeader) ?? 3600;
    }
    const contacts = parseContacts(req);
    if (!contacts.ok) return { status: 400, reason: contacts.reason };
    const now = Date.now();
    const changes: ContactChange[] = [];
    let removeAll = false;
    if (contacts.value.star) {
      // Step 6: `*` only with Expires: 0 (§10.2.2).
      if (headerExpires !== 0) {
        return { status: 400, reason: "Invalid Contact *: Expires Must Be 0" };
      }
      removeAll = true;
    } else {
      // Step 7: each contact's lifetime from its expires parameter, the Expires header, the default.
      let tooBrief = false;
      for (const c of contacts.value.contacts) {
        let expires = headerExpires ?? options.defaultExpires;
        const param = c.params.get("expires");
        if (param !== undefined) {
          // §20.19 / §10.2.1.1: a malformed value is treated as 3600.
          expires = (param === null ? null : parseExpires(param)) ?? 3600;
        }
        if (expires > 0 && expires < options.minExpires) tooBrief = true;
        expires = Math.min(expires, options.maxExpires);
        const qRaw = c.params.get("q");
        let q: number | null = null;
        if (qRaw !== undefined) {
          if (qRaw === null || !Q_VALUE.test(qRaw)) {
            return { status: 400, reason: "Malformed q Value" };
          }
          q = Number(qRaw);
        }
        const uri = parseUri(c.uri);
        if (!uri.ok) return { status: 400, reason: "Malformed Contact URI" };
        const instance = c.params.get("+sip.instance") ?? null;
        const regIdRaw = c.params.get("reg-id");
        const regId = regIdRaw != null && /^\d{1,9}$/.test(regIdRaw) ? Number(regIdRaw) : null;
        let contact = `<${c.uri}>`;
        for (const [name, value] of c.params) {
          if (name !== "expires") contact += value === null ? `;${name}` : `;${name}=${value}`;
        }
        if (contact.length > options.maxContactLength) {
          return { status: 400, reason: "Contact Too Long" };
        }
        changes.push({
          key: instance !== null && regId !== null
            ? `${instance};reg-id=${regId}`
            : uriKey(uri.value),
          contact,
          expires,
          q,
          instanceId: instance,
          regId,
        });
      }
      if (tooBrief) {
        // §10.3 step 7: 423 with the shortest interval we accept.
        return {
          status: 423,
          reason: "Interval Too Brief",
          headers: [["Min-Expires", String(options.minExpires)]],
        };
      }
    }
    const change: RegisterChange = {
      aor,
      callId,
      cseq: cseq.value.seq,
      contacts: changes,
      removeAll,
      now,
      source: source(inbound),
      path: headerAll(req, "path"),
      userAgent: header(req, "user-agent") ?? null,
      maxBindings: options.maxBindings,
    };
    const outcome = await options.store.register(change);
    if (!outcome.ok) {
      switch (outcome.reason) {
        case "out-of-order":
          return { status: 400, reason: "Out Of Order CSeq" };
        case "too-many-bindings":
          return { status: 403, reason: "Too Many Bindings" };
        case "unavailable":
          return {
            status: 503,
            reason: "Service Unavailable",
            headers: [["Retry-After", String(outcome.retryAfter)]],
          };
      }
    }
    // Step 8: 200 OK listing every current binding with its remaining lifetime.
    const headers: [string, string][] = [];
    for (const b of outcome.bindings) {
      headers.push([
        "Contact",
        `${b.contact};expires=${Math.max(0, Math.round((b.expiresAt - now) / 1000))}`,
      ]);
    }
    for (const p of change.path) headers.push(["Path", p]);
    headers.push(["Date", dateHeader(now)]);
    return { status: 200, reason: "OK", headers };
  }

  async function handle(inbound: Inbound): Promise<void> {
    const parsed = parseMessage(inbound.bytes);
    if (!parsed.ok) {
      // §21.4.1: a request we cannot parse gets 400 with the reason (505/416 where they fit), if it
      // carries what a response needs; otherwise it is dropped.
      const bytes = quickResponse(inbound.bytes, parsed.status, parsed.reason, [], localTag());
      if (bytes === null) return stage.drop("unparseable");
      responses.set(parsed.status, (responses.get(parsed.status) ?? 0) + 1);
      options.respond({
        inbound,
        request: null,
        status: parsed.status,
        reason: parsed.reason,
        headers: [],
        bytes,
      });
      return;
    }
    const msg = parsed.value;
    if (msg.kind !== "request") return stage.drop("stray-response");
    let cacheKey: string | null = null;
    if (inbound.flow === null) {
      const via = parseVia(headerAll(msg, "via")[0] ?? "");
      if (!via.ok) {
        return send(inbound, msg, { status: 400, reason: "Malformed Via Header" }, null);
      }
      const branch = via.value.branch;
      if (branch !== null && branch.startsWith("z9hG4bK")) {
        cacheKey = `${branch}|${via.value.host}:${via.value.port ?? ""}|${msg.method}`;
        const cached = cache.get(cacheKey);
        if (cached === "pending") return stage.drop("retransmission-absorbed");
        if (cached !== undefined) {
          stage.drop("retransmission-answered");
          options.respond({
            inbound,
            request: null,
            status: 0,
            reason: "",
            headers: [],
            bytes: cached,
          });
          return;
        }
        cache.set(cacheKey, null, Date.now());
      }
    }
    let answer: Answer;
    try {
      const refused = msg.method === "ACK" || msg.method === "CANCEL"
        ? null
        : unsupportedExtensions(msg);
      if (refused !== null) answer = refused;
      else {
        switch (msg.method) {
          case "REGISTER":
            answer = await register(msg, inbound);
            break;
          case "OPTIONS":
            // §11.2: what we can do.
            answer = {
              status: 200,
              reason: "OK",
              headers: [
                ["Allow", ALLOW],
                ["Accept", "application/sdp"],
                ["Supported", SUPPORTED.join(", ")],
              ],
            };
            break;
          case "CANCEL":
          case "BYE":
            // §9.2, §15.1.2: no INVITE transaction or dialog of ours matches (we hold none yet).
            answer = { status: 481, reason: "Call/Transaction Does Not Exist" };
            break;
          default:
            answer = KNOWN.has(msg.method)
              ? { status: 405, reason: "Method Not Allowed", headers: [["Allow", ALLOW]] }
              : { status: 501, reason: "Not Implemented", headers: [["Allow", ALLOW]] };
        }
      }
    } catch (error) {
      if (cacheKey !== null) cache.delete(cacheKey);
      throw error;
    }
    send(inbound, msg, answer, cacheKey);
  }

  const stage: Stage<Inbound> = new Stage<Inbound>({
    name: "registrar",
    ...REGISTRAR_SETTINGS,
    onError: options.onError,
    ...(options.targetMs === undefined ? {} : { targetMs: options.targetMs }),
    ...(options.deadlineMs === undefined ? {} : {
      deadlineMs: options.deadlineMs,
      onLate(inbound: Inbound, waitedMs: number) {
        inbound.flow?.requestDone();
        const reply = overloadReply(inbound, retryAfterFor(waitedMs, options.deadlineMs!));
        if (reply !== null) options.respond(reply);
      },
    }),
    async handler(inbound) {
      try {
        await handle(inbound);
      } finally {
        inbound.flow?.requestDone();
      }
    },
  });
  return { stage, responses, retransmissions: cache };
}

function reasonOf(status: number): string {
  switch (status) {
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 503:
      return "Service Unavailable";
    default:
      return "Server Internal Error";
  }
}
