/**
 * Helpers of the server-level durability and authentication tests (issue 4): a throw-away PostgreSQL
 * database per test, `citysip serve` started in a process group of its own (so that a test can
 * SIGKILL the supervisor and every worker at once, like a crash of the box), the `citysip` command
 * line, a UDP SIP client that keeps many requests in flight, and a TCP proxy in front of PostgreSQL
 * that a test can take down and bring back.
 *
 * These helpers build and read SIP messages themselves: the code under test does not check itself.
 *
 * @module
 */
import { createServer, type Server, Socket } from "node:net";
import postgres from "postgres";

/** The entry point under test. */
export const MAIN = new URL("../main.ts", import.meta.url).pathname;

/** Whether missing prerequisites must fail rather than skip. */
export const CI = Deno.env.get("CI") === "true";

/** The PostgreSQL server: `CITYSIP_TEST_DATABASE_URL`, default the local `test` database. */
export const PG_URL = Deno.env.get("CITYSIP_TEST_DATABASE_URL") ??
  "postgres://postgres@127.0.0.1:5432/test";

/** Resolves to null when PostgreSQL answers, else to why not. */
export async function pgUnavailable(url = PG_URL): Promise<string | null> {
  const sql = postgres(url, { max: 1, connect_timeout: 2, onnotice: () => {} });
  try {
    await sql`SELECT 1`;
    return null;
  } catch (err) {
    return `no PostgreSQL server at ${url.replace(/\/\/[^@]*@/, "//")}: ${(err as Error).message}`;
  } finally {
    await sql.end({ timeout: 0 });
  }
}

/** Whether `tool` runs. */
export async function hasTool(tool: string, arg: string): Promise<boolean> {
  try {
    await new Deno.Command(tool, { args: [arg], stdout: "null", stderr: "null" }).output();
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/**
 * Registers a test that needs `needs` (reasons it cannot run, empty when it can). When it cannot, it
 * is skipped with a printed reason, except under `CI=true`, where it fails.
 */
export function requiringTest(
  name: string,
  needs: readonly string[],
  fn: (t: Deno.TestContext) => Promise<void>,
): void {
  if (needs.length > 0 && CI) {
    Deno.test(name, () => {
      throw new Error(`Cannot run with CI=true: ${needs.join("; ")}`);
    });
    return;
  }
  if (needs.length > 0) console.log(`skipped "${name}": ${needs.join("; ")}`);
  Deno.test({ name, ignore: needs.length > 0, sanitizeOps: false, sanitizeResources: false, fn });
}

/** A database of its own on the PostgreSQL server. */
export interface TempDatabase {
  readonly name: string;
  /** URL of the database. */
  readonly url: string;
  /** URL of the database through another host:port (a proxy). */
  urlVia(port: number): string;
  /** A pool on the database, for the test's own queries. */
  readonly sql: postgres.Sql;
  /** Closes the pool and drops the database (any session still on it is terminated). */
  drop(): Promise<void>;
}

/** Creates `citysip_t_<random>` on the server of {@link PG_URL}. */
export async function tempDatabase(): Promise<TempDatabase> {
  const name = `citysip_t_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  const admin = postgres(PG_URL, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const u = new URL(PG_URL);
  u.pathname = `/${name}`;
  const url = u.href;
  const sql = postgres(url, { max: 2, onnotice: () => {} });
  return {
    name,
    url,
    urlVia(port: number) {
      const v = new URL(url);
      v.hostname = "127.0.0.1";
      v.port = String(port);
      return v.href;
    },
    sql,
    async drop() {
      await sql.end({ timeout: 1 });
      const a = postgres(PG_URL, { max: 1, onnotice: () => {} });
      try {
        await a.unsafe(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await a.end();
      }
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The server

/** A running `citysip serve`, leader of its own process group. */
export interface Citysip {
  /** The supervisor's pid, also the process group id. */
  readonly pid: number;
  readonly udpPort: number;
  readonly tcpPort: number;
  /** stderr of the supervisor and its workers so far, one entry per line. */
  readonly stderrLines: string[];
  /** Sends `signal` to the supervisor only, waits for its exit (SIGKILL after `graceMs`). */
  stop(signal?: Deno.Signal, graceMs?: number): Promise<Deno.CommandStatus>;
  /** SIGKILLs the supervisor and every worker at once; resolves when none is left. */
  killAll(): Promise<void>;
  /** Pids of the live processes of the group (supervisor and workers). */
  members(): number[];
}

const groups = new Set<number>();
globalThis.addEventListener("unload", () => {
  for (const pgid of groups) {
    try {
      Deno.kill(-pgid, "SIGKILL");
    } catch {
      // gone
    }
  }
});

/** Live (not zombie) processes whose process group is `pgid`. */
export function groupMembers(pgid: number): number[] {
  const out: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    let stat: string;
    try {
      stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
    } catch {
      continue;
    }
    // pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (fields[0] !== "Z" && Number(fields[2]) === pgid) out.push(Number(entry.name));
  }
  return out;
}

const LISTENING = /\bmsg=listening\b.*\btransport=(udp|tcp)\b.*\baddress=(\S+).*\bport=(\d+)/;

/** Options of {@link startCitysip}. */
export interface StartOptions {
  /** How long to wait for the listeners to be logged. @default 30000 */
  readonly readyTimeoutMs?: number;
  /** Extra environment; DATABASE_URL is never inherited. */
  readonly env?: Readonly<Record<string, string>>;
}

/**
 * Starts `main.ts serve FLAGS` under `setsid`, so the supervisor leads a process group that holds its
 * workers too; resolves once every `--listen` is logged as listening.
 */
export async function startCitysip(
  flags: readonly string[],
  options: StartOptions = {},
): Promise<Citysip> {
  const expected = flags.filter((f) => f === "--listen").length || 2;
  const env = Deno.env.toObject();
  delete env["DATABASE_URL"];
  const child = new Deno.Command("setsid", {
    // Load from one address (127.0.0.1): per-source limits off.
    args: [
      Deno.execPath(),
      "run",
      "--allow-all",
      "--unstable-net",
      MAIN,
      "serve",
      "--register-rate",
      "0",
      "--connect-rate",
      "0",
      ...flags,
    ],
    clearEnv: true,
    env: { ...env, ...options.env },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const pid = child.pid;
  groups.add(pid);
  const stderrLines: string[] = [];
  const ports = { udp: 0, tcp: 0, seen: 0 };
  const ready = Promise.withResolvers<void>();
  const drained = (async () => {
    const decoder = new TextDecoder();
    let buffer = "";
    const take = (line: string) => {
      stderrLines.push(line);
      const m = LISTENING.exec(line);
      if (m) {
        const t = m[1] as "udp" | "tcp";
        if (ports[t] === 0) ports[t] = Number(m[3]);
        if (++ports.seen >= expected) ready.resolve();
      }
    };
    for await (const chunk of child.stderr) {
      buffer += decoder.decode(chunk, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        take(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
      }
    }
    if (buffer !== "") take(buffer);
  })().catch(() => {});
  const exited = child.status;

  const killAll = async () => {
    try {
      Deno.kill(-pid, "SIGKILL");
    } catch {
      // the whole group is gone already
    }
    await exited;
    const until = Date.now() + 5000;
    while (groupMembers(pid).length > 0) {
      if (Date.now() > until) throw new Error(`processes of group ${pid} survive SIGKILL`);
      await sleep(20);
    }
    groups.delete(pid);
    await drained;
  };
  let stopping: Promise<Deno.CommandStatus> | null = null;
  const stop = (signal: Deno.Signal = "SIGTERM", graceMs = 15_000) => {
    stopping ??= (async () => {
      try {
        child.kill(signal);
      } catch {
        // exited already
      }
      const timer = setTimeout(() => {
        try {
          Deno.kill(-pid, "SIGKILL");
        } catch {
          // gone
        }
      }, graceMs);
      const status = await exited;
      clearTimeout(timer);
      await killAll();
      return status;
    })();
    return stopping;
  };

  const timeoutMs = options.readyTimeoutMs ?? 30_000;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const outcome = await Promise.race([
    ready.promise.then(() => "ready" as const),
    exited.then(() => "exited" as const),
    new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), timeoutMs)),
  ]);
  clearTimeout(timer);
  if (outcome !== "ready") {
    await killAll();
    throw new Error(
      `Cannot start citysip serve ${flags.join(" ")} (${outcome}):\n${stderrLines.join("\n")}`,
    );
  }
  return {
    pid,
    udpPort: ports.udp,
    tcpPort: ports.tcp,
    stderrLines,
    stop,
    killAll,
    members: () => groupMembers(pid),
  };
}

/** Output of a finished command. */
export interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command with optional stdin text; SIGKILLs it after `timeoutMs`. */
export async function run(
  command: string,
  args: readonly string[],
  options: { stdin?: string; timeoutMs?: number; cwd?: string } = {},
): Promise<Ran> {
  const env = Deno.env.toObject();
  delete env["DATABASE_URL"];
  const child = new Deno.Command(command, {
    args: [...args],
    clearEnv: true,
    env,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
    ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
  }).spawn();
  if (options.stdin !== undefined) {
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(options.stdin));
    await w.close();
  }
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // exited meanwhile
    }
  }, options.timeoutMs ?? 60_000);
  const out = await child.output();
  clearTimeout(timer);
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Runs `main.ts ARGS` (e.g. `user add alice@citysip.test --db URL`). */
export function citysip(args: readonly string[], stdin?: string): Promise<Ran> {
  return run(
    Deno.execPath(),
    ["run", "--allow-all", "--unstable-net", MAIN, ...args],
    stdin === undefined ? {} : { stdin },
  );
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------------------------
// SIP over UDP

const COMPACT: Readonly<Record<string, string>> = {
  v: "via",
  f: "from",
  t: "to",
  i: "call-id",
  m: "contact",
  l: "content-length",
};

/** A response as the tests read it. */
export interface SipResponse {
  readonly status: number;
  /** Header lines in order, names lower-case, compact forms expanded. */
  readonly headers: ReadonlyArray<readonly [string, string]>;
  header(name: string): string | undefined;
  /** Every line of a header, in order (no comma splitting). */
  lines(name: string): string[];
  readonly text: string;
}

/** Parses a response; null when the bytes are not one. */
export function parseSipResponse(text: string): SipResponse | null {
  const end = text.indexOf("\r\n\r\n");
  const lines = text.slice(0, end < 0 ? text.length : end).split("\r\n");
  const m = /^SIP\/2\.0 (\d{3}) /.exec(lines[0] ?? "");
  if (!m) return null;
  const headers: [string, string][] = [];
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    headers.push([COMPACT[name] ?? name, line.slice(colon + 1).trim()]);
  }
  return {
    status: Number(m[1]),
    headers,
    header: (name) => headers.find(([h]) => h === name.toLowerCase())?.[1],
    lines: (name) => headers.filter(([h]) => h === name.toLowerCase()).map(([, v]) => v),
    text,
  };
}

/** The `expires` parameters of the Contact values of a 200 OK, by contact URI. */
export function contactExpires(res: SipResponse): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of res.lines("contact")) {
    for (const value of line.split(/,(?=\s*<)/)) {
      const m = /<([^>]+)>.*?;\s*expires=(\d+)/i.exec(value);
      if (m) out.set(m[1]!, Number(m[2]));
    }
  }
  return out;
}

let seq = 0;

/** What {@link sipRequest} builds. */
export interface RequestSpec {
  readonly method?: "REGISTER" | "OPTIONS";
  readonly user: string;
  /** @default "citysip.test" */
  readonly domain?: string;
  /** The sender's port, for Via and Contact. */
  readonly localPort: number;
  readonly callId: string;
  /** @default 1 */
  readonly cseq?: number;
  /** Contact URI; none makes a query REGISTER (RFC 3261 §10.2.3). */
  readonly contact?: string;
  readonly expires?: number;
  /** An Authorization header value. */
  readonly authorization?: string;
  /** The Request-URI. @default `sip:${domain}` */
  readonly uri?: string;
}

/** A request as text. */
export function sipRequest(s: RequestSpec): string {
  const method = s.method ?? "REGISTER";
  const domain = s.domain ?? "citysip.test";
  const uri = s.uri ?? `sip:${domain}`;
  const lines = [
    `${method} ${uri} SIP/2.0`,
    `Via: SIP/2.0/UDP 127.0.0.1:${s.localPort};branch=z9hG4bK-d${Date.now().toString(36)}${
      (seq++).toString(36)
    };rport`,
    "Max-Forwards: 70",
    `From: <sip:${s.user}@${domain}>;tag=f${(seq++).toString(36)}`,
    `To: <sip:${s.user}@${domain}>`,
    `Call-ID: ${s.callId}`,
    `CSeq: ${s.cseq ?? 1} ${method}`,
  ];
  if (s.contact !== undefined) {
    lines.push(
      `Contact: <${s.contact}>${s.expires === undefined ? "" : `;expires=${s.expires}`}`,
    );
  }
  if (s.authorization !== undefined) lines.push(`Authorization: ${s.authorization}`);
  lines.push("Content-Length: 0", "", "");
  return lines.join("\r\n");
}

/**
 * UDP sockets (one by default) with any number of requests in flight, matched to responses by Call-ID
 * and CSeq; requests go out from the sockets in turn. Several sockets stand for several clients, and
 * spread a burst of responses (a group commit answers hundreds at once) over several receive
 * buffers, which one socket would overflow. No retransmissions: a request that gets no answer
 * within its timeout resolves to null.
 */
export class SipUdp {
  readonly #conns: Deno.DatagramConn[] = [];
  readonly #pending = new Map<string, (r: SipResponse) => void>();
  readonly #reading: Promise<void>[] = [];
  readonly #encoder = new TextEncoder();
  #next = 0;
  /** Responses that matched no pending request (late or duplicate). */
  unmatched = 0;

  constructor(sockets = 1) {
    const decoder = new TextDecoder();
    for (let i = 0; i < sockets; i++) {
      const conn = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
      this.#conns.push(conn);
      this.#reading.push((async () => {
        try {
          for (;;) {
            const [bytes] = await conn.receive();
            const res = parseSipResponse(decoder.decode(bytes));
            if (res === null) continue;
            const key = `${res.header("call-id")}\n${res.header("cseq")}`;
            const resolve = this.#pending.get(key);
            if (resolve === undefined) {
              this.unmatched++;
              continue;
            }
            // Provisional responses do not end a request; a registrar sends none anyway.
            if (res.status < 200) continue;
            this.#pending.delete(key);
            resolve(res);
          }
        } catch {
          // closed
        }
      })());
    }
  }

  /** The first socket's port. */
  get port(): number {
    return (this.#conns[0]!.addr as Deno.NetAddr).port;
  }

  /**
   * Sends a request to 127.0.0.1:`port` from the next socket; `text` may be built for that socket's
   * port. Resolves to the final response, or null after `timeoutMs`.
   */
  async request(
    text: string | ((localPort: number) => string),
    port: number,
    timeoutMs = 3000,
  ): Promise<SipResponse | null> {
    const conn = this.#conns[this.#next++ % this.#conns.length]!;
    const body = typeof text === "string" ? text : text((conn.addr as Deno.NetAddr).port);
    const callId = /\r\nCall-ID: ([^\r]+)/.exec(body)?.[1];
    const cseq = /\r\nCSeq: ([^\r]+)/.exec(body)?.[1];
    if (callId === undefined || cseq === undefined) throw new Error("request without Call-ID/CSeq");
    const key = `${callId}\n${cseq}`;
    const { promise, resolve } = Promise.withResolvers<SipResponse | null>();
    this.#pending.set(key, resolve);
    const timer = setTimeout(() => {
      this.#pending.delete(key);
      resolve(null);
    }, timeoutMs);
    try {
      await conn.send(this.#encoder.encode(body), {
        transport: "udp",
        hostname: "127.0.0.1",
        port,
      });
    } catch (error) {
      this.#pending.delete(key);
      clearTimeout(timer);
      throw error;
    }
    const res = await promise;
    clearTimeout(timer);
    return res;
  }

  async close(): Promise<void> {
    for (const c of this.#conns) c.close();
    await Promise.all(this.#reading);
  }
}

// ---------------------------------------------------------------------------------------------
// A proxy in front of PostgreSQL

/**
 * A TCP proxy to PostgreSQL. `down()` resets every connection and resets new ones as they arrive
 * (the database is unreachable); `up()` forwards again.
 */
export class DbProxy {
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  #down = false;
  port = 0;
  /** Connections accepted while up, and reset while down. */
  accepted = 0;
  refused = 0;

  constructor(target: { host: string; port: number }) {
    this.#server = createServer((client) => {
      client.on("error", () => {});
      if (this.#down) {
        this.refused++;
        client.resetAndDestroy();
        return;
      }
      this.accepted++;
      const upstream = new Socket();
      upstream.on("error", () => {});
      upstream.connect(target.port, target.host);
      this.#sockets.add(client);
      this.#sockets.add(upstream);
      client.pipe(upstream);
      upstream.pipe(client);
      const end = () => {
        this.#sockets.delete(client);
        this.#sockets.delete(upstream);
        client.destroy();
        upstream.destroy();
      };
      client.on("close", end);
      upstream.on("close", end);
    });
  }

  async listen(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.listen(0, "127.0.0.1", resolve));
    this.port = (this.#server.address() as { port: number }).port;
  }

  /** Resets every connection; until {@link up}, new ones are reset at once. */
  down(): void {
    this.#down = true;
    for (const s of this.#sockets) s.resetAndDestroy();
    this.#sockets.clear();
  }

  up(): void {
    this.#down = false;
  }

  async close(): Promise<void> {
    this.down();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
