/**
 * Tiny SIP clients for end-to-end tests: UDP request/response with a timeout, a TCP client that
 * sends raw bytes (whole, split, several messages at once) and reads framed responses or raw bytes,
 * a request builder with overridable headers, and a small response reader.
 *
 * These deliberately do not use `sip/`: the code under test must not check itself.
 *
 * @module
 */

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Bytes of a string (UTF-8). */
export function bytesOf(text: string): Uint8Array {
  return encoder.encode(text);
}

/** Text of bytes (UTF-8). */
export function textOf(bytes: Uint8Array): string {
  return decoder.decode(bytes);
}

/** Concatenates byte arrays. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * The length of the first complete message at the start of a TCP byte stream (headers up to
 * CRLFCRLF, then a Content-Length body), or -1 when it has not all arrived.
 */
export function framedLength(b: Uint8Array): number {
  let end = -1;
  for (let i = 0; i + 3 < b.length; i++) {
    if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) {
      end = i + 4;
      break;
    }
  }
  if (end < 0) return -1;
  const head = textOf(b.subarray(0, end));
  const m = /^(?:content-length|l)[ \t]*:[ \t]*(\d+)/im.exec(head);
  const length = end + (m ? Number(m[1]) : 0);
  return b.length >= length ? length : -1;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------------------------
// Responses

const COMPACT: Readonly<Record<string, string>> = {
  v: "via",
  f: "from",
  t: "to",
  i: "call-id",
  m: "contact",
  l: "content-length",
  c: "content-type",
  k: "supported",
  e: "content-encoding",
  s: "subject",
};

/** A SIP response as the tests see it. */
export interface Response {
  readonly status: number;
  readonly reason: string;
  /** Header lines in order, names lower-case with compact forms expanded. */
  readonly headers: ReadonlyArray<readonly [string, string]>;
  readonly body: Uint8Array;
  /** The response exactly as received. */
  readonly raw: Uint8Array;
  /** The first value of a header, or undefined. */
  header(name: string): string | undefined;
  /** Every value of a header: repeated lines and comma-separated lists (outside <> and quotes). */
  all(name: string): string[];
}

/** Splits a header value at commas outside angle brackets and quotes. */
export function splitCommas(value: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let quoted = false;
  let start = 0;
  for (let i = 0; i < value.length; i++) {
    const c = value[i];
    if (quoted) {
      if (c === "\\") i++;
      else if (c === '"') quoted = false;
    } else if (c === '"') quoted = true;
    else if (c === "<") depth++;
    else if (c === ">") depth--;
    else if (c === "," && depth === 0) {
      out.push(value.slice(start, i).trim());
      start = i + 1;
    }
  }
  const last = value.slice(start).trim();
  if (last !== "") out.push(last);
  return out;
}

/** Parses one complete response; throws (a test failure) when it is not one. */
export function parseResponse(raw: Uint8Array): Response {
  const text = textOf(raw);
  const end = text.indexOf("\r\n\r\n");
  if (end < 0) {
    throw new Error(`Cannot parse response: no end of headers in ${JSON.stringify(text)}`);
  }
  const lines = text.slice(0, end).split("\r\n");
  const m = /^SIP\/2\.0 (\d{3}) (.*)$/.exec(lines[0] ?? "");
  if (!m) throw new Error(`Cannot parse response: bad status line ${JSON.stringify(lines[0])}`);
  const headers: [string, string][] = [];
  for (const line of lines.slice(1)) {
    if (/^[ \t]/.test(line) && headers.length > 0) {
      const last = headers[headers.length - 1]!;
      last[1] += " " + line.trim();
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0) {
      throw new Error(`Cannot parse response: bad header line ${JSON.stringify(line)}`);
    }
    const name = line.slice(0, colon).trim().toLowerCase();
    headers.push([COMPACT[name] ?? name, line.slice(colon + 1).trim()]);
  }
  const body = raw.subarray(encoder.encode(text.slice(0, end + 4)).length);
  return {
    status: Number(m[1]),
    reason: m[2]!,
    headers,
    body,
    raw,
    header(name) {
      const n = name.toLowerCase();
      return headers.find(([h]) => h === n)?.[1];
    },
    all(name) {
      const n = name.toLowerCase();
      return headers.filter(([h]) => h === n).flatMap(([, v]) => splitCommas(v));
    },
  };
}

/** A Contact of a 200 OK: its URI and parameters (names lower-case). */
export interface ListedContact {
  readonly uri: string;
  readonly params: ReadonlyMap<string, string | null>;
  readonly expires: number | null;
}

/** The Contacts a registrar listed, in order (RFC 3261 §10.3 step 8). */
export function contactsOf(response: Response): ListedContact[] {
  return response.all("contact").map((value) => {
    const m = /^(?:"[^"]*"\s*|[^<]*)?<([^>]*)>(.*)$/.exec(value);
    const uri = m ? m[1]! : value.split(";")[0]!.trim();
    const rest = m ? m[2]! : value.slice(uri.length);
    const params = new Map<string, string | null>();
    for (const p of rest.split(";").slice(1)) {
      const eq = p.indexOf("=");
      if (eq < 0) params.set(p.trim().toLowerCase(), null);
      else params.set(p.slice(0, eq).trim().toLowerCase(), p.slice(eq + 1).trim());
    }
    const e = params.get("expires");
    return { uri, params, expires: e == null ? null : Number(e) };
  });
}

// ---------------------------------------------------------------------------------------------
// Requests

let counter = 0;
/** A fresh RFC 3261 branch (magic cookie first, §8.1.1.7). */
export function newBranch(): string {
  return `z9hG4bK-t${Date.now().toString(36)}-${(counter++).toString(36)}`;
}
/** A fresh Call-ID. */
export function newCallId(): string {
  return `${crypto.randomUUID()}@citysip.test`;
}
/** A fresh user name. */
export function newUser(prefix = "u"): string {
  return `${prefix}${Date.now().toString(36)}${(counter++).toString(36)}`;
}

/** What a request is built from; every header can be overridden or removed. */
export interface RequestSpec {
  /** @default "REGISTER" */
  readonly method?: string;
  /** The Request-URI. @default `sip:${domain}` */
  readonly uri?: string;
  /** The AOR's user part. @default "alice" */
  readonly user?: string;
  /** The AOR's domain (To/From). @default "citysip.test" */
  readonly domain?: string;
  /** Via transport token. @default "UDP" */
  readonly transport?: "UDP" | "TCP";
  /** Via sent-by. @default "127.0.0.1:5999" */
  readonly sentBy?: string;
  /** Whether the Via carries `;rport` (RFC 3581). @default true */
  readonly rport?: boolean;
  /** @default a fresh one */
  readonly branch?: string;
  /** @default a fresh one */
  readonly callId?: string;
  /** @default 1 */
  readonly cseq?: number;
  /** Contact header values, one line each; none makes a query REGISTER. @default [] */
  readonly contacts?: readonly string[];
  /** An Expires header, when given. */
  readonly expires?: number | string;
  /**
   * Header overrides by (case-insensitive) name: a string replaces the default value, null removes
   * the header. Names not among the defaults are appended in order.
   */
  readonly headers?: Readonly<Record<string, string | null>>;
  /** A body; Content-Length is set to its length unless overridden. */
  readonly body?: string;
}

/** Builds a request as bytes (default: a REGISTER for alice@citysip.test without Contact). */
export function buildRequest(spec: RequestSpec = {}): Uint8Array {
  const method = spec.method ?? "REGISTER";
  const domain = spec.domain ?? "citysip.test";
  const user = spec.user ?? "alice";
  const uri = spec.uri ?? `sip:${domain}`;
  const body = bytesOf(spec.body ?? "");
  const list: [string, string][] = [
    [
      "Via",
      `SIP/2.0/${spec.transport ?? "UDP"} ${spec.sentBy ?? "127.0.0.1:5999"};branch=${
        spec.branch ?? newBranch()
      }${spec.rport === false ? "" : ";rport"}`,
    ],
    ["Max-Forwards", "70"],
    ["From", `<sip:${user}@${domain}>;tag=${(counter++).toString(36)}f`],
    ["To", `<sip:${user}@${domain}>`],
    ["Call-ID", spec.callId ?? newCallId()],
    ["CSeq", `${spec.cseq ?? 1} ${method}`],
  ];
  for (const c of spec.contacts ?? []) list.push(["Contact", c]);
  if (spec.expires !== undefined) list.push(["Expires", String(spec.expires)]);
  list.push(["Content-Length", String(body.length)]);
  for (const [name, value] of Object.entries(spec.headers ?? {})) {
    const n = name.toLowerCase();
    const at = list.findIndex(([h]) => h.toLowerCase() === n);
    if (value === null) {
      for (let i = list.length - 1; i >= 0; i--) {
        if (list[i]![0].toLowerCase() === n) list.splice(i, 1);
      }
    } else if (at >= 0) list[at] = [list[at]![0], value];
    else list.splice(list.length - 1, 0, [name, value]);
  }
  let head = `${method} ${uri} SIP/2.0\r\n`;
  for (const [name, value] of list) head += `${name}: ${value}\r\n`;
  return concat(bytesOf(head + "\r\n"), body);
}

/** A REGISTER of one contact with an expires parameter, for `user` (RFC 3261 §10.2.1). */
export function buildRegister(spec: RequestSpec & { readonly contact?: string }): Uint8Array {
  const contacts = spec.contact !== undefined ? [spec.contact] : spec.contacts;
  return buildRequest({ ...spec, method: "REGISTER", ...(contacts ? { contacts } : {}) });
}

// ---------------------------------------------------------------------------------------------
// UDP

/** A UDP socket on the loopback that sends requests and waits for datagrams. */
export class UdpClient {
  readonly #conn: Deno.DatagramConn;
  #pending: Promise<[Uint8Array, Deno.Addr]> | null = null;
  readonly host: string;

  constructor(host = "127.0.0.1") {
    this.host = host;
    this.#conn = Deno.listenDatagram({ transport: "udp", hostname: host, port: 0 });
  }

  /** The local port. */
  get port(): number {
    return (this.#conn.addr as Deno.NetAddr).port;
  }

  /** Sends one datagram to `port` on `host` (default: this client's host). */
  async send(bytes: Uint8Array, port: number, host = this.host): Promise<void> {
    await this.#conn.send(bytes, { transport: "udp", hostname: host, port });
  }

  /** The next datagram, or null when none arrives within `timeoutMs`. */
  async receive(timeoutMs = 3000): Promise<{ bytes: Uint8Array; from: Deno.NetAddr } | null> {
    this.#pending ??= this.#conn.receive();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const got = await Promise.race([
      this.#pending,
      new Promise<null>((r) => timer = setTimeout(() => r(null), timeoutMs)),
    ]);
    clearTimeout(timer);
    if (got === null) return null;
    this.#pending = null;
    return { bytes: got[0], from: got[1] as Deno.NetAddr };
  }

  /** Sends `bytes` and parses the next datagram; throws when none arrives in time. */
  async request(bytes: Uint8Array, port: number, timeoutMs = 3000): Promise<Response> {
    await this.send(bytes, port);
    const got = await this.receive(timeoutMs);
    if (got === null) throw new Error(`No UDP response within ${timeoutMs} ms`);
    return parseResponse(got.bytes);
  }

  async close(): Promise<void> {
    this.#conn.close();
    await this.#pending?.catch(() => {});
    this.#pending = null;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

// ---------------------------------------------------------------------------------------------
// TCP

/** A TCP connection that sends raw bytes and reads framed responses or raw bytes. */
export class TcpClient {
  readonly #conn: Deno.TcpConn;
  #buffer: Uint8Array = new Uint8Array(0);
  #eof = false;
  #wake: (() => void) | null = null;
  readonly #reading: Promise<void>;

  private constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
    conn.setNoDelay(true);
    this.#reading = (async () => {
      const chunk = new Uint8Array(65536);
      try {
        while (true) {
          const n = await conn.read(chunk);
          if (n === null) break;
          this.#buffer = concat(this.#buffer, chunk.slice(0, n));
          this.#wake?.();
        }
      } catch {
        // reset or closed by us
      }
      this.#eof = true;
      this.#wake?.();
    })();
  }

  /** Connects to `port` on `host`. */
  static async connect(port: number, host = "127.0.0.1"): Promise<TcpClient> {
    return new TcpClient(await Deno.connect({ hostname: host, port, transport: "tcp" }));
  }

  /** The local port. */
  get localPort(): number {
    return (this.#conn.localAddr as Deno.NetAddr).port;
  }

  /** Whether the server closed the connection (as far as read so far). */
  get closedByPeer(): boolean {
    return this.#eof;
  }

  /** Sends all bytes in one write (one segment when small, with Nagle off). */
  async send(bytes: Uint8Array): Promise<void> {
    let at = 0;
    while (at < bytes.length) at += await this.#conn.write(bytes.subarray(at));
  }

  /**
   * Sends `bytes` in pieces cut at `cuts` (byte offsets, ascending), pausing `pauseMs` between them
   * so each piece leaves as its own segment.
   */
  async sendSplit(bytes: Uint8Array, cuts: readonly number[], pauseMs = 5): Promise<void> {
    let from = 0;
    for (const cut of [...cuts, bytes.length]) {
      if (cut <= from) continue;
      await this.send(bytes.subarray(from, cut));
      from = cut;
      if (from < bytes.length) await sleep(pauseMs);
    }
  }

  /** Sends `bytes` one byte per write. */
  async sendByteByByte(bytes: Uint8Array, pauseMs = 1): Promise<void> {
    await this.sendSplit(bytes, Array.from({ length: bytes.length }, (_, i) => i + 1), pauseMs);
  }

  /** Waits until `ready()` holds or the deadline passes; returns whether it held. */
  async #until(ready: () => boolean, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!ready()) {
      const left = deadline - Date.now();
      if (left <= 0 || this.#eof) return ready();
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((r) => {
        this.#wake = r;
        timer = setTimeout(r, left);
      });
      clearTimeout(timer);
      this.#wake = null;
    }
    return true;
  }

  /** The length of the first complete message in the buffer (headers + Content-Length), or -1. */
  #framed(): number {
    return framedLength(this.#buffer);
  }

  /** Reads the next response framed by Content-Length; throws when none completes in time. */
  async readResponse(timeoutMs = 3000): Promise<Response> {
    const ok = await this.#until(() => this.#framed() >= 0, timeoutMs);
    if (!ok) {
      throw new Error(
        `No complete TCP response within ${timeoutMs} ms (eof=${this.#eof}, buffered ${
          JSON.stringify(textOf(this.#buffer))
        })`,
      );
    }
    const n = this.#framed();
    const raw = this.#buffer.slice(0, n);
    this.#buffer = this.#buffer.slice(n);
    return parseResponse(raw);
  }

  /** Sends `bytes` and reads one response. */
  async request(bytes: Uint8Array, timeoutMs = 3000): Promise<Response> {
    await this.send(bytes);
    return await this.readResponse(timeoutMs);
  }

  /** Reads exactly `n` raw bytes; throws when they do not arrive in time. */
  async readRaw(n: number, timeoutMs = 3000): Promise<Uint8Array> {
    const ok = await this.#until(() => this.#buffer.length >= n, timeoutMs);
    if (!ok) {
      throw new Error(
        `Wanted ${n} bytes within ${timeoutMs} ms, got ${JSON.stringify(textOf(this.#buffer))}`,
      );
    }
    const out = this.#buffer.slice(0, n);
    this.#buffer = this.#buffer.slice(n);
    return out;
  }

  /** Waits `ms` and returns whatever arrived meanwhile (and is still unread). */
  async drain(ms: number): Promise<Uint8Array> {
    await this.#until(() => false, ms);
    const out = this.#buffer;
    this.#buffer = new Uint8Array(0);
    return out;
  }

  /** Waits up to `timeoutMs` for the server to close the connection; returns whether it did. */
  async waitClosed(timeoutMs = 3000): Promise<boolean> {
    return await this.#until(() => this.#eof, timeoutMs);
  }

  async close(): Promise<void> {
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
    await this.#reading;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
