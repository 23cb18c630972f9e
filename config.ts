/**
 * Command-line configuration for `citysip serve`: one typed object from `node:util` parseArgs (the
 * reachable stand-in for `@std/cli`), validated once at start-up. Every bad flag or value is a
 * {@link ConfigError} whose message is one line; `main.ts` prints it and exits with status 2.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { LEVELS, type LogLevel } from "./log.ts";

/** A bad flag or value. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** Flows one process may hold: a process may open 20,000 files here, and some are not sockets. */
export const FLOWS_PER_WORKER = 19_000;

/** One listening socket. */
export interface ListenSpec {
  readonly transport: "udp" | "tcp";
  /** IP address to bind (IPv6 without brackets). */
  readonly host: string;
  /** 0 picks a free port. */
  readonly port: number;
}

/** Everything `serve` is configured with. */
export interface ServeConfig {
  /** @default [udp:0.0.0.0:5060, tcp:0.0.0.0:5060] */
  readonly listen: readonly ListenSpec[];
  /** Domains this registrar is responsible for; empty accepts any. @default [] */
  readonly domains: readonly string[];
  /** @default 60 */
  readonly minExpires: number;
  /** @default 7200 */
  readonly maxExpires: number;
  /** @default 3600 */
  readonly defaultExpires: number;
  /** @default 10 */
  readonly maxBindingsPerAor: number;
  /** Largest SIP message accepted, bytes. @default 65536 */
  readonly maxMessageSize: number;
  /** Seconds a TCP flow may take to complete a message's headers once started. @default 10 */
  readonly headerTimeout: number;
  /** Seconds a TCP flow may stay silent before it is closed; 0 never. @default 7500 */
  readonly idleTimeout: number;
  /** Worker processes. @default the number of cores, or more if `--max-flows` needs them */
  readonly workers: number;
  /** TCP flows the whole box holds. @default workers x 19000 */
  readonly maxFlows: number;
  /** TCP flows one worker holds: maxFlows / workers, at most 19000 (a process may open 20,000 files). */
  readonly maxFlowsPerWorker: number;
  /** TCP flows one source IP may hold. @default 1000 */
  readonly maxFlowsPerIp: number;
  /** REGISTERs per second one source IP may send (pike-like); 0 turns the limit off. @default 50 */
  readonly registerRate: number;
  /** REGISTERs a quiet source may send at once. @default 200 */
  readonly registerBurst: number;
  /** What happens to a REGISTER over the limit: a 503 with Retry-After, or silence. @default "503" */
  readonly limitAction: "503" | "drop";
  /** New TCP connections per second one source IP may open; 0 turns the limit off. @default 20 */
  readonly connectRate: number;
  /** New TCP connections a quiet source may open at once. @default 100 */
  readonly connectBurst: number;
  /** Longest Contact (URI and parameters) stored, bytes: bounds what a query REGISTER returns. @default 512 */
  readonly maxContactLength: number;
  /** Queue delay (ms) above which classify refuses new requests with 503. @default 20 */
  readonly admissionDelayMs: number;
  /**
   * In overload (a standing queue), the queue wait (ms) after which an admitted request is answered
   * 503 instead of served, 0 for none.
   * @default the admission delay + 15 ms (a few drain turns of slack)
   */
  readonly queueDeadlineMs: number;
  /** The location store: "memory" (nothing kept) or "postgres" (a server URL or the embedded default). */
  readonly store: "memory" | "postgres";
  /** PostgreSQL URL (`--db` or `DATABASE_URL`); null runs the embedded PostgreSQL. */
  readonly db: string | null;
  /** The embedded PostgreSQL's data directory. */
  readonly dataDir: string;
  /** Group commit: longest wait for a batch, ms. @default 2 */
  readonly commitWindowMs: number;
  /** Group commit: most changes in one batch. @default 1000 */
  readonly commitBatch: number;
  /** Challenge REGISTERs with digest authentication (RFC 3261 §22). @default false */
  readonly auth: boolean;
  /** Digest algorithms challenged with, most preferred first (RFC 8760 §2.4). @default SHA-256, MD5 */
  readonly digestAlgorithms: readonly ("SHA-256" | "MD5")[];
  /**
   * UDP sockets: `reuseport` (libc through FFI, SO_REUSEPORT with batched recvmmsg; every worker
   * shares the port) or `dgram` (node:dgram; one worker holds the port). @default reuseport on Linux
   */
  readonly udpTransport: "reuseport" | "dgram";
  /**
   * TCP sockets: `reuseport` (libc through FFI: epoll, one shared read buffer, ~1 KB per idle flow)
   * or `node` (node:net, ~3.7 KB per idle flow). Both share the port across workers. @default reuseport on Linux
   */
  readonly tcpTransport: "reuseport" | "node";
  /** Prometheus metrics listen address, or null for none. */
  readonly metrics: { readonly host: string; readonly port: number } | null;
  readonly logLevel: LogLevel;
}

/** The help text of `citysip serve`. */
export const SERVE_HELP = `Usage: citysip serve [options]

Options:
  --listen T:HOST:PORT     listen on udp or tcp (repeatable; default udp:0.0.0.0:5060, tcp:0.0.0.0:5060)
  --domain D               a domain this registrar serves (repeatable; default: any)
  --min-expires S          shortest registration granted, else 423 (default 60)
  --max-expires S          longest registration granted (default 7200)
  --default-expires S      when the REGISTER names none (default 3600)
  --max-bindings N         contacts one AOR may hold (default 10)
  --max-message-size B     largest SIP message (default 65536)
  --header-timeout S       time to complete a message's headers on TCP (default 10)
  --idle-timeout S         close a silent TCP flow after S seconds, 0 never (default 7500)
  --workers N              worker processes (default: cores, or max-flows / 19000 if more)
  --max-flows N            TCP flows the box holds (default workers x 19000)
  --max-flows-per-ip N     TCP flows one source IP holds (default 1000)
  --register-rate N        REGISTERs per second per source IP, 0 off (default 50)
  --register-burst N       REGISTERs a quiet source may send at once (default 200)
  --limit-action A         over the REGISTER limit: 503 or drop (default 503)
  --connect-rate N         new TCP connections per second per source IP, 0 off (default 20)
  --connect-burst N        new TCP connections a quiet source may open at once (default 100)
  --max-contact-length B   longest Contact stored (default 512)
  --admission-delay MS     queue delay above which new requests get 503 (default 20)
  --queue-deadline MS      in overload, queue wait after which a request gets 503, 0 off (default delay+15)
  --store memory|postgres  where bindings live (default postgres: --db, DATABASE_URL or embedded)
  --db URL                 PostgreSQL server URL (default: $DATABASE_URL, else the embedded engine)
  --data-dir DIR           the embedded engine's data directory (default $XDG_STATE_HOME/citysip/pglite)
  --commit-window MS       group commit: longest wait for a batch (default 2)
  --commit-batch N         group commit: most changes per batch (default 1000)
  --auth                   require digest authentication for REGISTER
  --digest-algorithms L    challenge order (default SHA-256,MD5; MD5,SHA-256 for clients that
                           read only the first challenge, e.g. SIPp and sipsak)
  --udp-transport T        reuseport (all workers share UDP; Linux) or dgram (worker 0 only)
  --tcp-transport T        reuseport (libc epoll through FFI, ~1 KB per idle flow; Linux) or node
  --metrics HOST:PORT      serve Prometheus metrics over HTTP
  --log-level L            error, warn, info or debug (default info)
  -h, --help               this text`;

function integer(
  flag: string,
  raw: string | undefined,
  def: number,
  min: number,
  max: number,
): number {
  if (raw === undefined) return def;
  if (!/^\d+$/.test(raw)) {
    throw new ConfigError(`invalid --${flag} "${raw}": expected a whole number`);
  }
  const n = Number(raw);
  if (n < min || n > max) {
    throw new ConfigError(`invalid --${flag} "${raw}": expected ${min} to ${max}`);
  }
  return n;
}

/** Parses `HOST:PORT`, `[v6]:PORT`; throws ConfigError naming the flag. */
export function parseHostPort(flag: string, raw: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]+)):(\d{1,5})$/.exec(raw);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) {
    throw new ConfigError(`invalid --${flag} "${raw}": expected HOST:PORT`);
  }
  return { host: (m[1] ?? m[2])!, port };
}

function parseListen(raw: string): ListenSpec {
  const colon = raw.indexOf(":");
  const transport = raw.slice(0, colon).toLowerCase();
  if (colon < 0 || (transport !== "udp" && transport !== "tcp")) {
    throw new ConfigError(`invalid --listen "${raw}": expected udp:HOST:PORT or tcp:HOST:PORT`);
  }
  try {
    return { transport, ...parseHostPort("listen", raw.slice(colon + 1)) };
  } catch {
    throw new ConfigError(`invalid --listen "${raw}": expected udp:HOST:PORT or tcp:HOST:PORT`);
  }
}

function defaultDataDir(): string {
  const state = Deno.env.get("XDG_STATE_HOME") ??
    `${Deno.env.get("HOME") ?? "."}/.local/state`;
  return `${state}/citysip/pglite`;
}

/** Parses and validates the arguments of `citysip serve`. Returns "help" when help was asked for. */
export function parseServeArgs(
  args: string[],
  env: Record<string, string> = {},
): ServeConfig | "help" {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        listen: { type: "string", multiple: true },
        domain: { type: "string", multiple: true },
        "min-expires": { type: "string" },
        "max-expires": { type: "string" },
        "default-expires": { type: "string" },
        "max-bindings": { type: "string" },
        "max-message-size": { type: "string" },
        "header-timeout": { type: "string" },
        "idle-timeout": { type: "string" },
        "max-flows": { type: "string" },
        workers: { type: "string" },
        "max-flows-per-ip": { type: "string" },
        "admission-delay": { type: "string" },
        "queue-deadline": { type: "string" },
        "register-rate": { type: "string" },
        "register-burst": { type: "string" },
        "limit-action": { type: "string" },
        "connect-rate": { type: "string" },
        "connect-burst": { type: "string" },
        "max-contact-length": { type: "string" },
        store: { type: "string" },
        db: { type: "string" },
        "data-dir": { type: "string" },
        "commit-window": { type: "string" },
        "commit-batch": { type: "string" },
        auth: { type: "boolean" },
        "digest-algorithms": { type: "string" },
        metrics: { type: "string" },
        "udp-transport": { type: "string" },
        "tcp-transport": { type: "string" },
        "log-level": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (error) {
    // parseArgs' messages are long and multi-line; keep the first sentence.
    const msg = (error as Error).message.split("\n")[0]!.replace(/\. To specify.*$/, "");
    throw new ConfigError(msg);
  }
  if (values.help) return "help";
  const listen = (values.listen ?? ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]).map(parseListen);
  const domains = (values.domain ?? []).map((d) => {
    if (!/^[A-Za-z0-9.\-]+$|^\[[0-9A-Fa-f:.]+\]$/.test(d)) {
      throw new ConfigError(`invalid --domain "${d}": expected a host name`);
    }
    return d.toLowerCase();
  });
  const minExpires = integer("min-expires", values["min-expires"], 60, 1, 2 ** 31 - 1);
  const maxExpires = integer("max-expires", values["max-expires"], 7200, 1, 2 ** 31 - 1);
  const defaultExpires = integer(
    "default-expires",
    values["default-expires"],
    3600,
    1,
    2 ** 31 - 1,
  );
  if (minExpires > maxExpires) {
    throw new ConfigError(`invalid --min-expires ${minExpires}: above --max-expires ${maxExpires}`);
  }
  const level = values["log-level"] ?? "info";
  if (!(LEVELS as readonly string[]).includes(level)) {
    throw new ConfigError(`invalid --log-level "${level}": expected ${LEVELS.join(", ")}`);
  }
  const store = values.store ?? "postgres";
  if (store !== "memory" && store !== "postgres") {
    throw new ConfigError(`invalid --store "${store}": expected memory or postgres`);
  }
  const digestAlgorithms = (values["digest-algorithms"] ?? "SHA-256,MD5").split(",").map((a) =>
    a.trim().toUpperCase()
  );
  if (
    digestAlgorithms.length === 0 || new Set(digestAlgorithms).size !== digestAlgorithms.length ||
    digestAlgorithms.some((a) => a !== "SHA-256" && a !== "MD5")
  ) {
    throw new ConfigError(
      `invalid --digest-algorithms "${values["digest-algorithms"]}": expected SHA-256 and/or MD5`,
    );
  }
  const cores = navigator.hardwareConcurrency || 1;
  // Each worker's memory store is its own: one worker by default there.
  const oneStore = store === "memory";
  const flowsAsked = values["max-flows"] === undefined
    ? null
    : integer("max-flows", values["max-flows"], 0, 1, 10_000_000);
  const workers = integer(
    "workers",
    values.workers,
    Math.max(oneStore ? 1 : cores, Math.ceil((flowsAsked ?? 0) / FLOWS_PER_WORKER)),
    1,
    256,
  );
  const udpTransport = values["udp-transport"] ??
    (Deno.build.os === "linux" ? "reuseport" : "dgram");
  if (udpTransport !== "reuseport" && udpTransport !== "dgram") {
    throw new ConfigError(`invalid --udp-transport "${udpTransport}": expected reuseport or dgram`);
  }
  if (udpTransport === "reuseport" && Deno.build.os !== "linux") {
    throw new ConfigError(`invalid --udp-transport reuseport: needs Linux; use dgram`);
  }
  const limitAction = values["limit-action"] ?? "503";
  const admissionDelayMs = integer("admission-delay", values["admission-delay"], 20, 1, 60_000);
  if (limitAction !== "503" && limitAction !== "drop") {
    throw new ConfigError(`invalid --limit-action "${limitAction}": expected 503 or drop`);
  }
  const tcpTransport = values["tcp-transport"] ??
    (Deno.build.os === "linux" ? "reuseport" : "node");
  if (tcpTransport !== "reuseport" && tcpTransport !== "node") {
    throw new ConfigError(`invalid --tcp-transport "${tcpTransport}": expected reuseport or node`);
  }
  if (tcpTransport === "reuseport" && Deno.build.os !== "linux") {
    throw new ConfigError(`invalid --tcp-transport reuseport: needs Linux; use node`);
  }
  const db = values.db ?? env["DATABASE_URL"] ?? null;
  const maxFlows = flowsAsked ?? workers * FLOWS_PER_WORKER;
  if (maxFlows / workers > FLOWS_PER_WORKER) {
    throw new ConfigError(
      `invalid --max-flows ${maxFlows}: ${workers} workers hold at most ${
        workers * FLOWS_PER_WORKER
      } (${FLOWS_PER_WORKER} each); add --workers`,
    );
  }
  if (db !== null && !/^postgres(ql)?:\/\//.test(db)) {
    throw new ConfigError(`invalid --db "${db}": expected a postgres:// URL`);
  }
  return {
    listen,
    domains,
    minExpires,
    maxExpires,
    defaultExpires: Math.min(Math.max(defaultExpires, minExpires), maxExpires),
    maxBindingsPerAor: integer("max-bindings", values["max-bindings"], 10, 1, 1000),
    maxMessageSize: integer("max-message-size", values["max-message-size"], 65536, 512, 1 << 24),
    headerTimeout: integer("header-timeout", values["header-timeout"], 10, 1, 3600),
    idleTimeout: integer("idle-timeout", values["idle-timeout"], 7500, 0, 2 ** 31 - 1),
    workers,
    maxFlows,
    maxFlowsPerWorker: Math.ceil(maxFlows / workers),
    maxFlowsPerIp: integer("max-flows-per-ip", values["max-flows-per-ip"], 1000, 1, 10_000_000),
    registerRate: integer("register-rate", values["register-rate"], 50, 0, 10_000_000),
    registerBurst: integer("register-burst", values["register-burst"], 200, 1, 10_000_000),
    limitAction,
    connectRate: integer("connect-rate", values["connect-rate"], 20, 0, 10_000_000),
    connectBurst: integer("connect-burst", values["connect-burst"], 100, 1, 10_000_000),
    maxContactLength: integer("max-contact-length", values["max-contact-length"], 512, 64, 65536),
    admissionDelayMs,
    queueDeadlineMs: integer(
      "queue-deadline",
      values["queue-deadline"],
      admissionDelayMs + 15,
      0,
      600_000,
    ),
    store,
    db,
    dataDir: values["data-dir"] ?? defaultDataDir(),
    commitWindowMs: integer("commit-window", values["commit-window"], 2, 0, 1000),
    commitBatch: integer("commit-batch", values["commit-batch"], 1000, 1, 100_000),
    auth: values.auth ?? false,
    digestAlgorithms: digestAlgorithms as ("SHA-256" | "MD5")[],
    udpTransport,
    tcpTransport,
    metrics: values.metrics ? parseHostPort("metrics", values.metrics) : null,
    logLevel: level as LogLevel,
  };
}
