/**
 * The load generator's view of SIP: build a REGISTER from a template, and read a response
 * with a cheap scan (status code and the request number carried in Call-ID), never a full
 * parse. Call-IDs have the form `<seq>.<worker>.<tag>@bench`, so matching a response to its
 * request is a number parse.
 *
 * @module
 */

/** Transport token as written in Via and in the Contact's `transport` parameter. */
export type ViaTransport = "UDP" | "TCP";

/** What a REGISTER needs beyond the per-request numbers. */
export interface RegisterTemplate {
  /** Registrar address (Request-URI host). */
  serverHost: string;
  /** Registrar port. */
  serverPort: number;
  /** Our address as written in Via and Contact. */
  localHost: string;
  /** Our port as written in Via and Contact. */
  localPort: number;
  /** Transport for Via and Contact. */
  transport: ViaTransport;
  /** Worker number, part of every Call-ID and branch. */
  worker: number;
  /** Registration lifetime in seconds. @default 3600 */
  expires?: number;
}

/** Formats user number `n` as the user part (`u000123`), the form SIPp's users.csv uses. */
export function userName(n: number): string {
  const s = String(n);
  return s.length >= 6 ? "u" + s : "u" + "000000".slice(s.length) + s;
}

/**
 * Returns a function that builds REGISTER number `seq` for user number `user`, with the
 * Contact (and Via) port `port` (default: the template's). Call-IDs carry a random tag per
 * builder, so that runs never repeat a Call-ID with the same CSeq.
 */
export function registerBuilder(
  t: RegisterTemplate,
): (seq: number, user: number, port?: number) => string {
  const expires = t.expires ?? 3600;
  const ruri = `REGISTER sip:${t.serverHost}:${t.serverPort} SIP/2.0\r\n`;
  const via = `Via: SIP/2.0/${t.transport} ${t.localHost}:`;
  const tag = Math.floor(Math.random() * 2 ** 32).toString(36);
  const tail = `.${tag}@bench\r\nCSeq: 1 REGISTER\r\n`;
  const contactEnd = `;transport=${t.transport.toLowerCase()}>` +
    `;expires=${expires}\r\nUser-Agent: citysip-bench\r\nContent-Length: 0\r\n\r\n`;
  const w = t.worker;
  return (seq: number, user: number, port: number = t.localPort): string => {
    const u = userName(user);
    return ruri + via + port + ";rport;branch=z9hG4bK" + seq + "x" + w + tag +
      "\r\nMax-Forwards: 70\r\nFrom: <sip:" + u + "@bench.test>;tag=" + seq +
      "\r\nTo: <sip:" + u + "@bench.test>\r\nCall-ID: " + seq + "." + w + tail +
      "Contact: <sip:" + u + "@" + t.localHost + ":" + port + contactEnd;
  };
}

/** A SIP OPTIONS request, used to see whether a server answers at all. */
export function optionsRequest(
  serverHost: string,
  serverPort: number,
  localHost: string,
  localPort: number,
  transport: ViaTransport,
  tag: string,
): string {
  return `OPTIONS sip:${serverHost}:${serverPort} SIP/2.0\r\n` +
    `Via: SIP/2.0/${transport} ${localHost}:${localPort};rport;branch=z9hG4bKopt${tag}\r\n` +
    `Max-Forwards: 70\r\nFrom: <sip:probe@bench.test>;tag=${tag}\r\n` +
    `To: <sip:${serverHost}:${serverPort}>\r\nCall-ID: opt${tag}@bench\r\nCSeq: 1 OPTIONS\r\n` +
    `Content-Length: 0\r\n\r\n`;
}

/** Status code of a response (`SIP/2.0 200 OK`), or 0 when `msg` is not a response. */
export function statusOf(msg: string): number {
  if (msg.charCodeAt(0) !== 83 /* S */ || msg.charCodeAt(3) !== 47 /* / */) return 0;
  const a = msg.charCodeAt(8) - 48, b = msg.charCodeAt(9) - 48, c = msg.charCodeAt(10) - 48;
  if (a < 1 || a > 6 || b < 0 || b > 9 || c < 0 || c > 9) return 0;
  return a * 100 + b * 10 + c;
}

/**
 * Request number from the Call-ID of a message (`Call-ID: 123.4@bench` or compact `i:`),
 * or -1. Only digits up to the dot are read.
 */
export function seqOf(msg: string): number {
  let i = msg.indexOf("\nCall-ID:");
  if (i < 0) i = msg.indexOf("\ni:");
  if (i < 0) {
    const low = msg.toLowerCase();
    i = low.indexOf("\ncall-id:");
    if (i < 0) return -1;
  }
  i = msg.indexOf(":", i) + 1;
  while (msg.charCodeAt(i) === 32 || msg.charCodeAt(i) === 9) i++;
  let n = 0, digits = 0;
  for (;;) {
    const d = msg.charCodeAt(i) - 48;
    if (d < 0 || d > 9) break;
    n = n * 10 + d;
    i++;
    digits++;
  }
  return digits > 0 ? n : -1;
}

/** Value of Retry-After in seconds if present, else -1 (cheap scan, exact-case names). */
export function retryAfterOf(msg: string): number {
  const i = msg.indexOf("\nRetry-After:");
  if (i < 0) return -1;
  const n = parseInt(msg.slice(i + 13, i + 24), 10);
  return Number.isFinite(n) ? n : -1;
}

/**
 * Splits a TCP byte stream (as latin1 text) into messages: headers end at CRLFCRLF, the
 * body follows by Content-Length (or `l:`). Returns the messages and the unconsumed rest.
 */
export function splitStream(buffer: string): { messages: string[]; rest: string } {
  const messages: string[] = [];
  let start = 0;
  for (;;) {
    // Skip CRLF keep-alives between messages (RFC 5626 §4.4.1 pong).
    while (buffer.charCodeAt(start) === 13 || buffer.charCodeAt(start) === 10) start++;
    const end = buffer.indexOf("\r\n\r\n", start);
    if (end < 0) break;
    let bodyLen = 0;
    const head = buffer.slice(start, end);
    let ci = head.indexOf("\nContent-Length:");
    if (ci < 0) ci = head.indexOf("\nl:");
    if (ci >= 0) {
      const colon = head.indexOf(":", ci);
      const n = parseInt(head.slice(colon + 1, colon + 16), 10);
      if (Number.isFinite(n) && n > 0) bodyLen = n;
    }
    const stop = end + 4 + bodyLen;
    if (stop > buffer.length) break;
    messages.push(buffer.slice(start, stop));
    start = stop;
  }
  return { messages, rest: start >= buffer.length ? "" : buffer.slice(start) };
}
