/**
 * Micro-benchmarks of the refusal path under overload, through the real stages: frame -> classify
 * -> 503 + Retry-After -> respond, with the registrar's queue full, over UDP and over a TCP flow (10
 * REGISTERs per read). What one refused request costs in JavaScript, to set against serving one;
 * the kernel's share (receive, send) comes on top. `deno bench --allow-all stages/refuse_bench.ts`.
 *
 * @module
 */
import { TYPICAL_REGISTER } from "../sip/_bench_data.ts";
import type { Source } from "../sip/message.ts";
import { Flow, type FlowSocket } from "../transport/tcp.ts";
import type { UdpTransport } from "../transport/udp.ts";
import { createClassifyStage } from "./classify.ts";
import { createFrameStage, type FrameInput } from "./frame.ts";
import type { Inbound } from "./items.ts";
import { createRespondStage } from "./respond.ts";
import { Stage } from "./runtime.ts";

const onError = (error: unknown) => {
  throw error;
};
let sent = 0;
const respond = createRespondStage(onError);
// A registrar with one item in service forever and one waiting: no free slot, every new request
// is refused.
const registrar = new Stage<Inbound>({
  name: "registrar",
  capacity: 1,
  concurrency: 1,
  mode: "deferred",
  handler: () => new Promise<void>(() => {}),
});
const classify = createClassifyStage({
  registrar,
  admissionDelayMs: 20,
  registerLimit: null,
  limitAction: "503",
  limitReplies: null,
  respond: (reply) => respond.offer(reply),
  onError,
});
const frame = createFrameStage({
  maxMessageSize: 65536,
  headerTimeout: 10,
  next: (m) => classify.offer(m),
  onError,
});
frame.stop();

const source: Source = {
  transport: "udp",
  address: "192.0.2.10",
  port: 5060,
  flowId: 0,
  localAddress: "127.0.0.1",
  localPort: 5060,
};
const udp: UdpTransport = {
  address: "127.0.0.1",
  port: 5060,
  sendErrors: 0,
  send(bytes) {
    sent += bytes.length;
  },
  close: () => Promise.resolve(),
};
const socket: FlowSocket = {
  writableLength: 0,
  write(bytes) {
    sent += bytes.length;
    return true;
  },
  end() {},
  destroy() {},
  setKeepAlive() {},
  on() {},
};
const flow = new Flow(1, socket, { ...source, transport: "tcp", flowId: 1 }, Date.now());
const TEN = new Uint8Array(TYPICAL_REGISTER.length * 10);
for (let i = 0; i < 10; i++) TEN.set(TYPICAL_REGISTER, i * TYPICAL_REGISTER.length);

const dummy = { bytes: TYPICAL_REGISTER, source, flow: null, udp };
registrar.offer(dummy);
registrar.offer(dummy);
if (registrar.free !== 0) throw new Error("Cannot bench: the registrar has room");

Deno.bench({
  name: "refuse 1 REGISTER over UDP (frame, classify, 503, respond)",
  group: "refuse",
  baseline: true,
  fn() {
    frame.stage.offer({ flow: null, bytes: TYPICAL_REGISTER, source, udp } as FrameInput);
  },
});

Deno.bench({
  name: "refuse 10 REGISTERs in one TCP read (per read)",
  group: "refuse",
  fn() {
    frame.stage.offer({ flow, bytes: TEN } as FrameInput);
  },
});

addEventListener("unload", () => {
  if (sent === 0) throw new Error("bench sent nothing");
});
