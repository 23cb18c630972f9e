/**
 * The accept stage: takes a new TCP connection, applies the process's flow budget (below the 20,000
 * files a process may open here) and the per-source-IP cap, gives the flow an id and puts it in the
 * flow table. It also closes flows that have been silent past the idle timeout.
 *
 * @module
 */
import { Flow, type FlowSocket } from "../transport/tcp.ts";
import type { SourceRateLimiter } from "./limits.ts";
import { Stage } from "./runtime.ts";

/** Queue and worker settings: accepting is synchronous, one at a time. */
export const ACCEPT_SETTINGS = { capacity: 1024, concurrency: 1, mode: "inline" } as const;

/** The flows this process owns. */
export class FlowTable {
  readonly flows: Map<number, Flow> = new Map();
  readonly perIp: Map<string, number> = new Map();
  #nextId = 1;

  /** Adds a flow for an accepted socket. */
  add(socket: FlowSocket, at: number): Flow {
    const address = stripMapped(socket.remoteAddress ?? "");
    const flow = new Flow(this.#nextId++, socket, {
      transport: "tcp",
      address,
      port: socket.remotePort ?? 0,
      flowId: 0,
      localAddress: stripMapped(socket.localAddress ?? ""),
      localPort: socket.localPort ?? 0,
    }, at);
    (flow.source as { flowId: number }).flowId = flow.id;
    this.flows.set(flow.id, flow);
    this.perIp.set(address, (this.perIp.get(address) ?? 0) + 1);
    return flow;
  }

  /** Forgets a closed flow. */
  remove(flow: Flow): void {
    if (!this.flows.delete(flow.id)) return;
    const n = (this.perIp.get(flow.source.address) ?? 1) - 1;
    if (n <= 0) this.perIp.delete(flow.source.address);
    else this.perIp.set(flow.source.address, n);
  }

  get size(): number {
    return this.flows.size;
  }
}

/** `::ffff:1.2.3.4` (an IPv4 peer on a dual-stack socket) -> `1.2.3.4`. */
function stripMapped(address: string): string {
  return address.startsWith("::ffff:") && address.includes(".") ? address.slice(7) : address;
}

/** What the accept stage needs. */
export interface AcceptOptions {
  readonly maxFlows: number;
  readonly maxFlowsPerIp: number;
  /** Per-source new-connection limiter, or null for none. */
  readonly connectLimit: SourceRateLimiter | null;
  /** Seconds of silence after which a flow is closed; 0 never. */
  readonly idleTimeout: number;
  readonly table: FlowTable;
  /** Called with each chunk of bytes a flow receives (the frame stage). */
  readonly onData: (flow: Flow, chunk: Uint8Array) => void;
  readonly onError: (error: unknown, stage: string) => void;
}

/** Builds the accept stage and starts its idle sweep; `stop()` ends the sweep. */
export function createAcceptStage(
  options: AcceptOptions,
): { stage: Stage<FlowSocket>; stop(): void } {
  const { table } = options;
  const stage: Stage<FlowSocket> = new Stage<FlowSocket>({
    name: "accept",
    ...ACCEPT_SETTINGS,
    onError: options.onError,
    handler(socket) {
      socket.on("error", () => stage.drop("socket-error"));
      if (table.size >= options.maxFlows) {
        stage.drop("max-flows");
        socket.destroy();
        return;
      }
      const address = stripMapped(socket.remoteAddress ?? "");
      if (options.connectLimit !== null && !options.connectLimit.allow(address, Date.now())) {
        stage.drop("connect-rate");
        socket.destroy();
        return;
      }
      if ((table.perIp.get(address) ?? 0) >= options.maxFlowsPerIp) {
        stage.drop("max-flows-per-ip");
        socket.destroy();
        return;
      }
      const flow = table.add(socket, Date.now());
      socket.setKeepAlive(true, 60_000);
      socket.on("data", (chunk: Uint8Array) => options.onData(flow, chunk));
      socket.on("close", () => {
        flow.closed = true;
        table.remove(flow);
      });
    },
  });
  // One sweep over the table serves every flow: no per-flow timers.
  const sweep = options.idleTimeout > 0
    ? setInterval(() => {
      const limit = Date.now() - options.idleTimeout * 1000;
      for (const flow of table.flows.values()) {
        if (flow.lastActive < limit) {
          stage.drop("idle-timeout");
          flow.close();
        }
      }
    }, Math.min(10_000, options.idleTimeout * 250))
    : undefined;
  return { stage, stop: () => clearInterval(sweep) };
}
