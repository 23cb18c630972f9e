/**
 * SIP over TCP (RFC 3261 §18): a listener sharing its port with the other workers (SO_REUSEPORT), and
 * the flow: one accepted connection, owned by the worker that accepted it (RFC 5626 keeps flows open so
 * requests can reach users behind NAT).
 *
 * `node:net` is used rather than `Deno.listen`: on this platform it costs ~4.4 KB of RSS per idle
 * connection against ~11.7 KB (ARCHITECTURE.md, platform facts), and it shares a port across processes
 * without an unstable flag.
 *
 * @module
 */
import net from "node:net";
import type { Source } from "../sip/message.ts";

/** Bytes a flow may have queued for sending before it counts as a slow reader and is closed. */
export const MAX_SEND_BACKLOG = 256 * 1024;

/**
 * Requests one flow may have in service (admitted, not yet answered): room for a trunk (an SBC or
 * proxy carrying many users' transactions on one connection). Beyond it, classify answers the
 * flow's new requests with 503 instead of queueing them. Reading never pauses for this: a paused flow
 * would hold its BYEs, CANCELs and responses behind the REGISTERs waiting in its TCP window
 * (head-of-line blocking), and requests left in the window age past the client's timers, the
 * collapse the paper measured over TCP.
 */
export const FLOW_MAX_IN_SERVICE = 1024;

/**
 * What a flow needs of a connection: the subset of `node:net`'s Socket the stages use, so that
 * another TCP transport (e.g. one on the kernel's sockets through FFI) can stand in for it.
 */
export interface FlowSocket {
  readonly remoteAddress?: string | undefined;
  readonly remotePort?: number | undefined;
  readonly localAddress?: string | undefined;
  readonly localPort?: number | undefined;
  /** Bytes queued in user space, not yet handed to the kernel. */
  readonly writableLength: number;
  write(bytes: Uint8Array | string): boolean;
  /** Sends FIN once queued bytes are written; `done` runs then. */
  end(done?: () => void): void;
  /** Closes at once, dropping queued bytes. */
  destroy(): void;
  setKeepAlive(enable: boolean, initialDelayMs: number): void;
  on(event: "data", listener: (chunk: Uint8Array) => void): void;
  on(event: "close", listener: () => void): void;
  on(event: "error", listener: (error: Error) => void): void;
}

/** One TCP connection and the little state the stages keep for it. Kept small: 300,000 of them. */
export class Flow {
  /** Where messages on this flow come from; one object shared by all of them. */
  readonly source: Source;
  /** Framer state, created on the first bytes (see the frame stage). */
  framer: unknown = null;
  /** Requests admitted and not yet answered (at most {@link FLOW_MAX_IN_SERVICE}). */
  pending = 0;
  /** Set by the frame stage while a message is partly received (header-completion timeout). */
  partialSince = 0;
  /** When bytes last arrived, ms (coarse clock). */
  lastActive: number;
  closed = false;

  constructor(readonly id: number, readonly socket: FlowSocket, source: Source, at: number) {
    this.source = source;
    this.lastActive = at;
  }

  /** Whether the flow has its share of requests in service: new ones are refused, not queued. */
  get saturated(): boolean {
    return this.pending >= FLOW_MAX_IN_SERVICE;
  }

  /** Counts a request admitted for processing. */
  requestStarted(): void {
    this.pending++;
  }

  /** Counts a request answered (or dropped). */
  requestDone(): void {
    this.pending--;
  }

  /** Writes bytes; closes the flow if the peer has stopped reading. Returns false if the flow is gone. */
  send(bytes: Uint8Array | string): boolean {
    if (this.closed) return false;
    if (this.socket.writableLength > MAX_SEND_BACKLOG) {
      this.close();
      return false;
    }
    this.socket.write(bytes);
    return true;
  }

  /** Closes the connection (after queued bytes are written). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // FIN after what is queued is written, then release the socket without waiting for the peer.
    this.socket.end(() => this.socket.destroy());
  }
}

/** An open TCP listener. */
export interface TcpTransport {
  readonly address: string;
  readonly port: number;
  close(): Promise<void>;
}

/** Listens on host:port with SO_REUSEPORT and hands every accepted socket to `onConnection`. */
export function listenTcp(
  host: string,
  port: number,
  onConnection: (socket: FlowSocket) => void,
): Promise<TcpTransport> {
  const server = net.createServer({ noDelay: true, pauseOnConnect: false }, onConnection);
  // Errors on the listening socket after start (EMFILE on accept) must not crash the worker.
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen({ host, port, reusePort: true, backlog: 4096 } as net.ListenOptions, () => {
      server.off("error", reject);
      server.on("error", () => {});
      const bound = server.address() as net.AddressInfo;
      resolve({
        address: bound.address,
        port: bound.port,
        close: () =>
          new Promise((done) => {
            server.close(() => done());
          }),
      });
    });
  });
}
