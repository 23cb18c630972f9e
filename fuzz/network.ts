/**
 * Network mode: sends mutated messages to a running server over UDP and TCP in batches, and after
 * each batch checks that a valid REGISTER over each transport still gets 200 OK.
 *
 * @module
 */

import { statusOf, tcpRequest, UdpPeer, validRegister } from "./client.ts";
import { loadCorpus, saveCrash } from "./corpus.ts";
import { mutate } from "./mutate.ts";
import { Rng } from "./prng.ts";

/** Where to send: `host:port` per transport. */
export interface Targets {
  readonly udp?: string;
  readonly tcp?: string;
}

/** Parses `udp:127.0.0.1:P,tcp:127.0.0.1:P`. */
export function parseTargets(text: string): Targets {
  const out: { udp?: string; tcp?: string } = {};
  for (const part of text.split(",")) {
    const m = /^(udp|tcp):(.+:\d+)$/.exec(part.trim());
    if (m === null) throw new TypeError(`Cannot parse target "${part}": expected udp:HOST:PORT`);
    out[m[1] as "udp" | "tcp"] = m[2]!;
  }
  return out;
}

function split(target: string): { host: string; port: number } {
  const i = target.lastIndexOf(":");
  return { host: target.slice(0, i).replace(/^\[|\]$/g, ""), port: Number(target.slice(i + 1)) };
}

/** Options of {@linkcode fuzzNetwork}. */
export interface NetworkFuzzOptions {
  readonly seed: number;
  readonly targets: Targets;
  /** Stop after this many seconds. @default 10 */
  readonly seconds?: number;
  /** Stop after this many mutated messages. @default unlimited */
  readonly maxMessages?: number;
  /** Mutated messages between two health checks. @default 250 */
  readonly batch?: number;
  /** Keep the batch before a failed check in the crash store. @default true */
  readonly save?: boolean;
  /** Also fail when this returns false after a batch (e.g. the server process exited). */
  readonly alive?: () => boolean;
}

/** What a network run did. */
export interface NetworkFuzzStats {
  sent: number;
  udpSent: number;
  tcpSent: number;
  replies: number;
  batches: number;
  checksOk: number;
  checksFailed: number;
  seconds: number;
  failures: string[];
}

/** Up to 4 s of retries for a 200: an overloaded server may answer 503 for a while. */
async function checkUdp(peer: UdpPeer, port: number): Promise<number> {
  let last = 0;
  for (let attempt = 0; attempt < 8; attempt++) {
    const { text, callId } = validRegister("UDP", peer.port);
    const reply = await peer.request(text, port, callId, 500);
    last = statusOf(reply?.text);
    if (last === 200) return 200;
  }
  return last;
}

async function checkTcp(port: number): Promise<number> {
  let last = 0;
  for (let attempt = 0; attempt < 4; attempt++) {
    const { text } = validRegister("TCP", 5060);
    last = statusOf(await tcpRequest(port, text, 1000).catch(() => null));
    if (last === 200) return 200;
  }
  return last;
}

/** A TCP connection the fuzzer writes mutated messages into; replies are read and discarded. */
class TcpSink {
  #conn: Deno.TcpConn | null = null;
  replies = 0;
  constructor(readonly host: string, readonly port: number) {}

  async write(chunks: Uint8Array[]): Promise<void> {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        if (this.#conn === null) {
          const conn = await Deno.connect({ hostname: this.host, port: this.port });
          this.#conn = conn;
          this.#drain(conn);
        }
        for (const c of chunks) await this.#conn.write(c);
        return;
      } catch {
        // The server closes a flow after a framing error: open a new one.
        this.close();
      }
    }
  }

  async #drain(conn: Deno.TcpConn): Promise<void> {
    const buf = new Uint8Array(65536);
    try {
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        this.replies++;
      }
    } catch { /* reset */ }
    if (this.#conn === conn) this.close();
  }

  close(): void {
    try {
      this.#conn?.close();
    } catch { /* closed */ }
    this.#conn = null;
  }
}

/** Runs the network fuzzer. */
export async function fuzzNetwork(options: NetworkFuzzOptions): Promise<NetworkFuzzStats> {
  const corpus = loadCorpus();
  const rng = new Rng(options.seed);
  const batch = options.batch ?? 250;
  const deadline = performance.now() + (options.seconds ?? 10) * 1000;
  const maxMessages = options.maxMessages ?? Infinity;
  const udp = options.targets.udp === undefined ? null : split(options.targets.udp);
  const tcp = options.targets.tcp === undefined ? null : split(options.targets.tcp);
  const peer = await UdpPeer.open();
  const sink = tcp === null ? null : new TcpSink(tcp.host, tcp.port);
  const stats: NetworkFuzzStats = {
    sent: 0,
    udpSent: 0,
    tcpSent: 0,
    replies: 0,
    batches: 0,
    checksOk: 0,
    checksFailed: 0,
    seconds: 0,
    failures: [],
  };
  const t0 = performance.now();
  try {
    while (performance.now() < deadline && stats.sent < maxMessages) {
      const inputs: Uint8Array[] = [];
      for (let i = 0; i < batch && stats.sent < maxMessages; i++) {
        const { input } = mutate(rng, corpus);
        inputs.push(input);
        stats.sent++;
        const useUdp = udp !== null && (sink === null || rng.chance(0.5)) && input.length <= 65_000;
        if (useUdp) {
          await peer.send(input, udp.port, udp.host);
          stats.udpSent++;
        } else if (sink !== null) {
          const chunks: Uint8Array[] = [];
          for (let p = 0; p < input.length;) {
            const k = 1 + rng.int(Math.max(1, input.length));
            chunks.push(input.subarray(p, p + k));
            p += k;
          }
          await sink.write(chunks);
          stats.tcpSent++;
          // Sometimes start a fresh flow, so framing errors do not hide later messages.
          if (rng.chance(0.1)) sink.close();
        }
        // Let replies and the server breathe: the check measures survival, not overload.
        if ((i & 31) === 31) await new Promise((r) => setTimeout(r, 1));
      }
      stats.batches++;
      const problems: string[] = [];
      if (options.alive !== undefined && !options.alive()) problems.push("server exited");
      if (udp !== null) {
        const s = await checkUdp(peer, udp.port);
        if (s !== 200) problems.push(`valid REGISTER over UDP got ${s || "no answer"}`);
      }
      if (tcp !== null) {
        const s = await checkTcp(tcp.port);
        if (s !== 200) problems.push(`valid REGISTER over TCP got ${s || "no answer"}`);
      }
      if (problems.length === 0) stats.checksOk++;
      else {
        stats.checksFailed++;
        const what = `batch ${stats.batches}: ${problems.join("; ")}`;
        stats.failures.push(what);
        if (options.save ?? true) {
          for (const input of inputs.slice(-50)) {
            saveCrash(input, { kind: "network", detail: what, seed: options.seed });
          }
        }
        if (problems.includes("server exited")) break;
      }
    }
  } finally {
    stats.replies = peer.received.length + (sink?.replies ?? 0);
    sink?.close();
    await peer.close();
    stats.seconds = (performance.now() - t0) / 1000;
  }
  return stats;
}
