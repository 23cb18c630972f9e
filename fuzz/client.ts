/**
 * Minimal SIP test clients over real sockets: a UDP peer that records every datagram it receives
 * (with the address it came from), and a one-shot TCP request. Used by the network fuzzer and the
 * conformance tests.
 *
 * @module
 */

import dgram from "node:dgram";
import { StreamFramer } from "../sip/frame.ts";

/** A datagram received by a {@linkcode UdpPeer}. */
export interface Datagram {
  readonly bytes: Uint8Array;
  readonly text: string;
  readonly address: string;
  readonly port: number;
  readonly at: number;
}

const latin1 = new TextDecoder("latin1");

/** A UDP socket on 127.0.0.1 (or `host`) that keeps what it receives. */
export class UdpPeer {
  readonly #socket: dgram.Socket;
  readonly received: Datagram[] = [];
  #waiters: (() => void)[] = [];
  #port = 0;

  private constructor(socket: dgram.Socket) {
    this.#socket = socket;
    socket.on("message", (msg: Uint8Array, rinfo: { address: string; port: number }) => {
      const bytes = new Uint8Array(msg);
      this.received.push({
        bytes,
        text: latin1.decode(bytes),
        address: rinfo.address,
        port: rinfo.port,
        at: performance.now(),
      });
      if (this.received.length > 10_000) this.received.splice(0, 5_000);
      const ws = this.#waiters;
      this.#waiters = [];
      for (const w of ws) w();
    });
    socket.on("error", () => {});
  }

  /** Binds a peer to `host:port` (port 0: any). */
  static async open(host = "127.0.0.1", port = 0): Promise<UdpPeer> {
    const socket = dgram.createSocket("udp4");
    await new Promise<void>((resolve, reject) => {
      socket.once("error", reject);
      socket.bind(port, host, () => resolve());
    });
    const peer = new UdpPeer(socket);
    peer.#port = socket.address().port;
    return peer;
  }

  /** The local port. */
  get port(): number {
    return this.#port;
  }

  /** Sends one datagram. */
  send(bytes: Uint8Array | string, port: number, host = "127.0.0.1"): Promise<void> {
    const data = typeof bytes === "string" ? new TextEncoder().encode(bytes) : bytes;
    return new Promise((resolve) => this.#socket.send(data, port, host, () => resolve()));
  }

  /** Waits until a received datagram matches `pred` (scanning from index `from`); null on timeout. */
  async waitFor(
    pred: (d: Datagram) => boolean,
    timeoutMs: number,
    from = 0,
  ): Promise<Datagram | null> {
    const end = performance.now() + timeoutMs;
    let i = from;
    for (;;) {
      for (; i < this.received.length; i++) if (pred(this.received[i]!)) return this.received[i]!;
      const left = end - performance.now();
      if (left <= 0) return null;
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#waiters.push(resolve);
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
    }
  }

  /** Sends `bytes` and waits for a datagram containing `match` (e.g. the Call-ID). */
  async request(
    bytes: Uint8Array | string,
    port: number,
    match: string,
    timeoutMs = 2000,
  ): Promise<Datagram | null> {
    const from = this.received.length;
    await this.send(bytes, port);
    return await this.waitFor((d) => d.text.includes(match), timeoutMs, from);
  }

  /** Closes the socket. */
  close(): Promise<void> {
    return new Promise((resolve) => this.#socket.close(() => resolve()));
  }
}

/** Sends `bytes` on a new TCP connection and returns the first framed response, or null. */
export async function tcpRequest(
  port: number,
  bytes: Uint8Array | string,
  timeoutMs = 2000,
): Promise<string | null> {
  const data = typeof bytes === "string" ? new TextEncoder().encode(bytes) : bytes;
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const timer = setTimeout(() => {
    try {
      conn.close();
    } catch { /* closed */ }
  }, timeoutMs);
  try {
    await conn.write(data);
    const framer = new StreamFramer();
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) return null;
      for (const item of framer.push(buf.slice(0, n))) {
        if (item.type === "message") return latin1.decode(item.bytes);
      }
    }
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

let counter = 0;

/** A valid REGISTER for `user` with a fresh Call-ID and branch; returns the text and its Call-ID. */
export function validRegister(
  transport: "UDP" | "TCP",
  localPort: number,
  user = "probe",
): { text: string; callId: string } {
  const id = `${Date.now().toString(36)}-${(counter++).toString(36)}`;
  const callId = `check-${id}@127.0.0.1`;
  const text = [
    "REGISTER sip:127.0.0.1 SIP/2.0",
    `Via: SIP/2.0/${transport} 127.0.0.1:${localPort};branch=z9hG4bK-${id};rport`,
    "Max-Forwards: 70",
    `To: <sip:${user}@127.0.0.1>`,
    `From: <sip:${user}@127.0.0.1>;tag=${id}`,
    `Call-ID: ${callId}`,
    "CSeq: 1 REGISTER",
    `Contact: <sip:${user}@127.0.0.1:${localPort}>;expires=600`,
    "Content-Length: 0",
    "",
    "",
  ].join("\r\n");
  return { text, callId };
}

/** The status code of a response's text, or 0. */
export function statusOf(text: string | null | undefined): number {
  const m = /^SIP\/2\.0 (\d{3}) /.exec(text ?? "");
  return m === null ? 0 : Number(m[1]);
}
