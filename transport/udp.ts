/**
 * SIP over UDP (RFC 3261 §18): one datagram is one message. Receives on a `node:dgram` socket and hands
 * each datagram to the frame stage; sends responses to the address the respond stage chose.
 *
 * @module
 */
import dgram from "node:dgram";
import type { Source } from "../sip/message.ts";

/** An open UDP listener. */
export interface UdpTransport {
  readonly address: string;
  readonly port: number;
  /** Sends one datagram; errors (unreachable peer, full buffer) are counted, never thrown. */
  send(bytes: Uint8Array, address: string, port: number): void;
  close(): Promise<void>;
  /** Datagrams that could not be sent. */
  readonly sendErrors: number;
}

/** Binds a UDP socket on host:port and calls `onDatagram` for each datagram received. */
export function listenUdp(
  host: string,
  port: number,
  onDatagram: (bytes: Uint8Array, source: Source) => void,
): Promise<UdpTransport> {
  const v6 = host.includes(":");
  const socket = dgram.createSocket({ type: v6 ? "udp6" : "udp4" });
  let sendErrors = 0;
  return new Promise((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(port, host, () => {
      socket.off("error", reject);
      socket.on("error", () => sendErrors++);
      const bound = socket.address();
      const localAddress = bound.address;
      const localPort = bound.port;
      socket.on("message", (msg: Uint8Array, rinfo: dgram.RemoteInfo) => {
        onDatagram(msg, {
          transport: "udp",
          address: rinfo.address,
          port: rinfo.port,
          flowId: 0,
          localAddress,
          localPort,
        });
      });
      resolve({
        address: localAddress,
        port: localPort,
        get sendErrors() {
          return sendErrors;
        },
        send(bytes, address, toPort) {
          try {
            socket.send(bytes, toPort, address, (error) => {
              if (error) sendErrors++;
            });
          } catch {
            sendErrors++; // closed socket, bad address: counted, never thrown
          }
        },
        close: () => new Promise((done) => socket.close(() => done())),
      });
    });
  });
}
