/**
 * The read/frame stage: turns bytes into messages. A UDP datagram is one message (RFC 3261 §18.1.1).
 * A TCP flow's bytes go through its own {@link StreamFramer} (RFC 3261 §18.3: headers end at CRLFCRLF,
 * the body is Content-Length bytes), which also yields RFC 5626 §4.4.1 keep-alive pings, answered here
 * with a single CRLF. A framing error (size limit, missing or bad Content-Length) loses the message
 * boundary, so nothing after it on that flow can be trusted: the flow is closed (counted by reason);
 * other flows never notice. A flow that starts
 * a message and does not complete its headers within the header timeout is closed (slowloris).
 *
 * @module
 */
import { StreamFramer } from "../sip/frame.ts";
import type { Source } from "../sip/message.ts";
import type { Flow } from "../transport/tcp.ts";
import type { UdpTransport } from "../transport/udp.ts";
import type { Inbound } from "./items.ts";
import { Stage } from "./runtime.ts";

/** Queue and worker settings: framing is synchronous and cheap, so it runs inline. */
export const FRAME_SETTINGS = { capacity: 1024, concurrency: 1, mode: "inline" } as const;

/** One unit of input: a chunk of a TCP flow, or a whole datagram. */
export type FrameInput =
  | { readonly flow: Flow; readonly bytes: Uint8Array }
  | {
    readonly flow: null;
    readonly bytes: Uint8Array;
    readonly source: Source;
    readonly udp: UdpTransport;
  };

/** What the frame stage needs. */
export interface FrameOptions {
  readonly maxMessageSize: number;
  /** Seconds to complete a message's headers on TCP once it has started. */
  readonly headerTimeout: number;
  /** The next stage (classify). */
  readonly next: (message: Inbound) => void;
  readonly onError: (error: unknown, stage: string) => void;
}

const PONG = "\r\n";

/** Builds the frame stage and starts its header-timeout sweep; `stop()` ends the sweep. */
export function createFrameStage(
  options: FrameOptions,
): { stage: Stage<FrameInput>; stop(): void } {
  const partial = new Set<Flow>();
  const stage: Stage<FrameInput> = new Stage<FrameInput>({
    name: "frame",
    ...FRAME_SETTINGS,
    onError: options.onError,
    handler(input) {
      if (input.flow === null) {
        const { bytes } = input;
        if (bytes.length > options.maxMessageSize) return stage.drop("too-large");
        if (isOnlyCrlf(bytes)) return stage.drop("keepalive");
        options.next({ bytes, source: input.source, flow: null, udp: input.udp });
        return;
      }
      const flow = input.flow;
      if (flow.closed) return stage.drop("flow-closed");
      flow.lastActive = Date.now();
      const framer = (flow.framer ??= new StreamFramer({
        maxMessageSize: options.maxMessageSize,
      })) as StreamFramer;
      for (const item of framer.push(input.bytes)) {
        if (item.type === "message") {
          options.next({ bytes: item.bytes, source: flow.source, flow, udp: null });
        } else if (item.type === "ping") {
          flow.send(PONG);
        } else {
          stage.drop(item.reason);
          flow.close();
          partial.delete(flow);
          return;
        }
      }
      if (framer.pendingSince > 0) partial.add(flow);
      else partial.delete(flow);
    },
  });
  const sweep = setInterval(() => {
    const limit = Date.now() - options.headerTimeout * 1000;
    for (const flow of partial) {
      const since = (flow.framer as StreamFramer | null)?.pendingSince ?? 0;
      if (flow.closed || since === 0) partial.delete(flow);
      else if (since < limit) {
        stage.drop("header-timeout");
        flow.close();
        partial.delete(flow);
      }
    }
  }, 1000);
  return { stage, stop: () => clearInterval(sweep) };
}

function isOnlyCrlf(bytes: Uint8Array): boolean {
  for (const b of bytes) if (b !== 13 && b !== 10) return false;
  return true;
}
