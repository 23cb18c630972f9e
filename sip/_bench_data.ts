/**
 * Shared input of the `sip/` micro-benchmarks.
 *
 * @module
 */

/** A typical REGISTER from a phone, about 400 bytes. */
export const TYPICAL_REGISTER: Uint8Array = new TextEncoder().encode(
  [
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-524287-1---77ba1d5f6e;rport",
    "Max-Forwards: 70",
    "Contact: <sip:1001@192.0.2.10:5060;transport=udp>;expires=3600",
    "To: <sip:1001@example.com>",
    "From: <sip:1001@example.com>;tag=4f1a2b3c",
    "Call-ID: 7d3f2a9c1b5e4f60a8d2c3b4e5f6a7b8",
    "CSeq: 2 REGISTER",
    "Expires: 3600",
    "Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO",
    "User-Agent: Softphone 5.1",
    "Content-Length: 0",
    "",
    "",
  ].join("\r\n"),
);
