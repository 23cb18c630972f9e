/**
 * The SIP message model (RFC 3261 §7). Headers are kept as raw text in arrival order; typed values
 * (Via, name-addr, CSeq, ...) are decoded on demand by the functions in `sip/headers.ts`.
 *
 * @module
 */

/** One header line as received, after unfolding (RFC 3261 §7.3.1). */
export interface HeaderField {
  /** Canonical lower-case long name: compact forms are expanded (`v` -> `via`). */
  readonly name: string;
  /** The value with surrounding whitespace trimmed and folded lines joined by one space. */
  readonly value: string;
}

interface MessageBase {
  /** The SIP version token as received, e.g. `SIP/2.0`. */
  readonly version: string;
  /** Header fields in arrival order. Repeated headers appear once per line. */
  readonly headers: HeaderField[];
  /** The body: exactly Content-Length bytes (empty when there is none). */
  readonly body: Uint8Array;
}

/** A parsed SIP request. */
export interface SipRequest extends MessageBase {
  readonly kind: "request";
  /** The method token, case-sensitive (RFC 3261 §7.1). */
  readonly method: string;
  /** The Request-URI as text. */
  readonly uri: string;
}

/** A parsed SIP response. */
export interface SipResponse extends MessageBase {
  readonly kind: "response";
  readonly status: number;
  readonly reason: string;
}

export type SipMessage = SipRequest | SipResponse;

/** Why a message could not be parsed. `status` is the response a server should send to a request. */
export interface ParseError {
  readonly ok: false;
  /** A short reason phrase, fit for a 400 response line: `Malformed Via header`. */
  readonly reason: string;
  /** The header at fault, when one is. */
  readonly header?: string;
  /** 400 Bad Request by default; 505 for an unsupported SIP version; 416 for an unsupported URI scheme. */
  readonly status: 400 | 416 | 505;
}

export type ParseResult<T> = { readonly ok: true; readonly value: T } | ParseError;

/** Where a message came from; set by the transport, carried with the message through the stages. */
export interface Source {
  readonly transport: "udp" | "tcp";
  /** The peer's IP address as text (IPv6 without brackets). */
  readonly address: string;
  readonly port: number;
  /** The flow it arrived on: the TCP connection id, or 0 for UDP. */
  readonly flowId: number;
  /** The local address and port it arrived at. */
  readonly localAddress: string;
  readonly localPort: number;
}
