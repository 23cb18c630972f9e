/**
 * One worker: the whole stage pipeline on one event loop, accept -> frame -> classify -> registrar ->
 * respond, fed by the UDP sockets and TCP listeners of the `--listen` addresses.
 *
 * @module
 */
import type { ServeConfig } from "./config.ts";
import { log } from "./log.ts";
import { createAcceptStage, FlowTable } from "./stages/accept.ts";
import { createClassifyStage } from "./stages/classify.ts";
import { createFrameStage, type FrameInput } from "./stages/frame.ts";
import type { Inbound, Reply } from "./stages/items.ts";
import { createRegistrarStage, type RegistrarAuth } from "./stages/registrar.ts";
import { createRespondStage } from "./stages/respond.ts";
import type { Stage } from "./stages/runtime.ts";
import type { LocationStore } from "./storage/location_store.ts";
import { listenTcp, type TcpTransport } from "./transport/tcp.ts";
import { listenUdp, type UdpTransport } from "./transport/udp.ts";

/** A running worker. */
export interface Worker {
  readonly id: number;
  readonly udp: readonly UdpTransport[];
  readonly tcp: readonly TcpTransport[];
  // deno-lint-ignore no-explicit-any
  readonly stages: readonly Stage<any>[];
  readonly flows: FlowTable;
  /** Registrar answers by status code. */
  readonly responses: ReadonlyMap<number, number>;
  /** Stops listening, lets requests in service finish, closes flows. Does not close the store. */
  close(): Promise<void>;
}

/** What a worker is started with. */
export interface WorkerOptions {
  readonly id: number;
  readonly config: ServeConfig;
  readonly store: LocationStore;
  readonly auth: RegistrarAuth | null;
}

/** Starts the pipeline and its listeners. */
export async function startWorker(options: WorkerOptions): Promise<Worker> {
  const { config } = options;
  const onError = (error: unknown, stage: string) =>
    log.error("stage handler failed", { stage, error: (error as Error)?.stack ?? String(error) });

  const respond = createRespondStage(onError);
  const respondOffer = (reply: Reply) => {
    if (!respond.offer(reply)) reply.inbound.flow?.close();
  };
  const registrar = createRegistrarStage({
    store: options.store,
    domains: config.domains,
    minExpires: config.minExpires,
    maxExpires: config.maxExpires,
    defaultExpires: config.defaultExpires,
    maxBindings: config.maxBindingsPerAor,
    worker: options.id,
    auth: options.auth,
    respond: respondOffer,
    onError,
  });
  const classify = createClassifyStage({
    registrar: registrar.stage,
    admissionDelayMs: config.admissionDelayMs,
    respond: respondOffer,
    onError,
  });
  const classifyOffer = (inbound: Inbound) => {
    classify.offer(inbound);
  };
  const frame = createFrameStage({
    maxMessageSize: config.maxMessageSize,
    headerTimeout: config.headerTimeout,
    next: classifyOffer,
    onError,
  });
  const flows = new FlowTable();
  const accept = createAcceptStage({
    maxFlows: config.maxFlows,
    maxFlowsPerIp: config.maxFlowsPerIp,
    idleTimeout: config.idleTimeout,
    table: flows,
    onData: (flow, bytes) => {
      frame.stage.offer({ flow, bytes } as FrameInput);
    },
    onError,
  });

  const udp: UdpTransport[] = [];
  const tcp: TcpTransport[] = [];
  try {
    for (const spec of config.listen) {
      if (spec.transport === "udp") {
        const socket: UdpTransport = await listenUdp(spec.host, spec.port, (bytes, source) => {
          frame.stage.offer({ flow: null, bytes, source, udp: socket });
        });
        udp.push(socket);
      } else {
        tcp.push(await listenTcp(spec.host, spec.port, (socket) => accept.stage.offer(socket)));
      }
    }
  } catch (error) {
    await Promise.all([...udp, ...tcp].map((t) => t.close()));
    throw error;
  }

  return {
    id: options.id,
    udp,
    tcp,
    stages: [accept.stage, frame.stage, classify, registrar.stage, respond],
    flows,
    responses: registrar.responses,
    async close() {
      accept.stop();
      frame.stop();
      const closing = tcp.map((t) => t.close());
      await registrar.stage.idle();
      for (const flow of flows.flows.values()) flow.close();
      await Promise.all([...closing, ...udp.map((u) => u.close())]);
    },
  };
}
