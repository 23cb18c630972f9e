/**
 * What flows between the stages: an inbound message (bytes plus where they came from) and a reply to
 * send.
 *
 * @module
 */
import type { SipRequest, Source } from "../sip/message.ts";
import type { Flow } from "../transport/tcp.ts";
import type { UdpTransport } from "../transport/udp.ts";

/** One framed message, as it enters classify. */
export interface Inbound {
  readonly bytes: Uint8Array;
  readonly source: Source;
  /** The TCP flow it arrived on, or null for UDP. */
  readonly flow: Flow | null;
  /** The UDP socket it arrived on (responses leave from it), or null for TCP. */
  readonly udp: UdpTransport | null;
}

/** A response to send, as it enters respond. */
export interface Reply {
  readonly inbound: Inbound;
  /** The parsed request, or null when `bytes` was built without a parse (a cheap 503). */
  readonly request: SipRequest | null;
  readonly status: number;
  readonly reason: string;
  readonly headers: ReadonlyArray<readonly [string, string]>;
  /** A response already serialised (quick 503s); null to serialise `request` here. */
  readonly bytes: Uint8Array | null;
  /** Called once the reply is sent or dropped; e.g. to store it for retransmissions. */
  readonly onSent?: (bytes: Uint8Array) => void;
}
