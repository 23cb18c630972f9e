/**
 * One worker: the whole stage pipeline on one event loop, accept -> frame -> classify -> registrar ->
 * respond, fed by the UDP sockets and TCP listeners of the `--listen` addresses.
 *
 * @module
 */
import type { ListenSpec, ServeConfig } from "./config.ts";
import { createAcceptStage, FlowTable } from "./stages/accept.ts";
import { createClassifyStage } from "./stages/classify.ts";
import { createFrameStage, type FrameInput } from "./stages/frame.ts";
import type { Inbound, Reply } from "./stages/items.ts";
import { createRegistrarStage, type RegistrarAuth } from "./stages/registrar.ts";
import { createRespondStage } from "./stages/respond.ts";
import { SourceRateLimiter } from "./stages/limits.ts";
import type { Stage } from "./stages/runtime.ts";
import type { LocationStore } from "./storage/location_store.ts";
import { listenTcp, type TcpTransport } from "./transport/tcp.ts";
import { listenUdp, type UdpTransport } from "./transport/udp.ts";
import { log, setLogContext, setLogLevel } from "./log.ts";
import { MemoryLocationStore } from "./storage/memory.ts";
import { guardPostgresConnectionLoss, openStorage } from "./storage/open.ts";
import type { GroupCommitStats } from "./storage/postgres.ts";
import type { SubscriberStore } from "./storage/subscriber_store.ts";
import { DigestAuthenticator } from "./stages/auth.ts";
import { readLines, type WorkerMessage, type WorkerSpec } from "./supervisor.ts";

/** Expired bindings are swept from the store this often. */
const SWEEP_INTERVAL_MS = 30_000;

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
  /** The listeners to open (defaults to `config.listen`). */
  readonly listen?: readonly ListenSpec[];
  /** Opens a UDP listener; the FFI SO_REUSEPORT transport where UDP is shared by workers. */
  readonly listenUdp?: typeof listenUdp;
  /** Opens a TCP listener; the FFI epoll transport by default on Linux. */
  readonly listenTcp?: typeof listenTcp;
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
    maxContactLength: config.maxContactLength,
    worker: options.id,
    auth: options.auth,
    respond: respondOffer,
    targetMs: config.admissionDelayMs,
    ...(config.queueDeadlineMs > 0 ? { deadlineMs: config.queueDeadlineMs } : {}),
    onError,
  });
  const classify = createClassifyStage({
    registrar: registrar.stage,
    registerLimit: config.registerRate > 0
      ? new SourceRateLimiter({
        ratePerSecond: config.registerRate,
        burst: config.registerBurst,
        maxSources: 65536,
      })
      : null,
    limitAction: config.limitAction,
    limitReplies: new SourceRateLimiter({ ratePerSecond: 5, burst: 10, maxSources: 65536 }),
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
    maxFlows: config.maxFlowsPerWorker,
    maxFlowsPerIp: config.maxFlowsPerIp,
    connectLimit: config.connectRate > 0
      ? new SourceRateLimiter({
        ratePerSecond: config.connectRate,
        burst: config.connectBurst,
        maxSources: 65536,
      })
      : null,
    idleTimeout: config.idleTimeout,
    table: flows,
    onData: (flow, bytes) => {
      // A chunk may be a view of the transport's read buffer, valid during this call only: framed
      // at once (the frame stage runs inline), else copied to wait in its queue.
      if (frame.stage.queueLength > 0 || frame.stage.inFlight > 0) bytes = bytes.slice();
      frame.stage.offer({ flow, bytes } as FrameInput);
    },
    onError,
  });

  const udp: UdpTransport[] = [];
  const tcp: TcpTransport[] = [];
  try {
    for (const spec of options.listen ?? config.listen) {
      if (spec.transport === "udp") {
        const socket: UdpTransport = await (options.listenUdp ?? listenUdp)(
          spec.host,
          spec.port,
          (bytes, source) => {
            frame.stage.offer({ flow: null, bytes, source, udp: socket });
          },
        );
        udp.push(socket);
      } else {
        tcp.push(
          await (options.listenTcp ?? listenTcp)(
            spec.host,
            spec.port,
            (socket) => accept.stage.offer(socket),
          ),
        );
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

/**
 * The body of `citysip worker`: started by the supervisor with a {@link WorkerSpec} in the environment.
 * Opens its own store connection, runs the pipeline, reports on stdout, stops on SIGTERM.
 */
export async function runWorkerProcess(
  spec: WorkerSpec,
  udpTransport: typeof listenUdp | undefined,
  tcpTransport: typeof listenTcp | undefined,
): Promise<void> {
  setLogLevel(spec.config.logLevel);
  setLogContext({ worker: spec.id });
  let store: LocationStore;
  let subscribers: SubscriberStore | null = null;
  let closeStorage = async () => {};
  if (spec.dbUrl === null) {
    store = new MemoryLocationStore();
  } else {
    guardPostgresConnectionLoss((error) =>
      log.warn("postgres.js lost a connection mid-query", { error })
    );
    const storage = await openStorage(spec.dbUrl, {
      max: spec.dbPool,
      migrate: false,
      locations: {
        batchWindowMs: spec.config.commitWindowMs,
        maxBatchSize: spec.config.commitBatch,
      },
    });
    store = storage.locations;
    subscribers = storage.subscribers;
    closeStorage = storage.close;
  }
  const auth = spec.config.auth && subscribers !== null
    ? new DigestAuthenticator({
      subscribers,
      secret: Uint8Array.from(spec.secret.match(/../g) ?? [], (h) => parseInt(h, 16)),
      algorithms: spec.config.digestAlgorithms,
    })
    : null;
  let worker: Worker;
  try {
    worker = await startWorker({
      id: spec.id,
      config: spec.config,
      store,
      auth,
      listen: spec.listen,
      ...(udpTransport ? { listenUdp: udpTransport } : {}),
      ...(tcpTransport ? { listenTcp: tcpTransport } : {}),
    });
  } catch (error) {
    log.error("cannot start", { error });
    await store.close();
    await closeStorage();
    Deno.exit(1);
  }
  // Expired bindings are never returned (stores filter them); the sweep only frees their space.
  const sweep = spec.sweep || spec.dbUrl === null
    ? setInterval(() => {
      store.sweep(Date.now()).catch((error) => log.warn("expiry sweep failed", { error }));
    }, SWEEP_INTERVAL_MS)
    : undefined;
  const out = Deno.stdout;
  const encoder = new TextEncoder();
  const say = (msg: WorkerMessage) => out.writeSync(encoder.encode(JSON.stringify(msg) + "\n"));
  say({ type: "ready", udp: worker.udp.map((u) => u.port), tcp: worker.tcp.map((t) => t.port) });

  const stop = Promise.withResolvers<void>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => stop.resolve());
  }
  // The supervisor asks for counters with a `metrics` line; stdin closing means it is gone.
  (async () => {
    for await (const line of readLines(Deno.stdin.readable)) {
      if (line.trim() === "metrics") {
        const stats = "stats" in store && typeof store.stats === "function"
          ? (store as { stats(): GroupCommitStats }).stats()
          : null;
        say({
          type: "metrics",
          worker: spec.id,
          stages: worker.stages.map((s) => s.snapshot()),
          flowsOpen: worker.flows.size,
          responses: Object.fromEntries(worker.responses),
          extra: {
            citysip_flows_refused_total: (worker.stages[0]!.dropped["max-flows"] ?? 0) +
              (worker.stages[0]!.dropped["max-flows-per-ip"] ?? 0),
            citysip_rss_bytes: Deno.memoryUsage().rss,
            ...(stats === null ? {} : {
              citysip_storage_batches_total: stats.batches,
              citysip_storage_changes_total: stats.ops,
              citysip_storage_failed_batches_total: stats.failedBatches,
              citysip_storage_last_batch_size: stats.lastBatchSize,
              citysip_storage_largest_batch_size: stats.largestBatchSize,
              citysip_storage_queued: stats.queued,
              citysip_storage_commit_seconds_sum: stats.commitSeconds.sum,
              citysip_storage_commit_seconds_count: stats.commitSeconds.count,
            }),
          },
        });
      }
    }
    stop.resolve();
  })().catch(() => stop.resolve());
  await stop.promise;
  clearInterval(sweep);
  await worker.close();
  await store.close();
  await closeStorage();
  Deno.exit(0);
}
