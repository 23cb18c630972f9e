/**
 * TCP transports compared: `node:net` (transport/tcp.ts) against the FFI epoll transport
 * (transport/tcp_ffi.ts), on memory per idle connection, heap objects per connection, and
 * request/response throughput.
 *
 *   deno run -A bench/tcp_transport_bench.ts [connections=15000] [seconds=5] [inflight=200] [bytes=400]
 *     [all|memory|rate]
 *
 * 1. Memory: a server process holds `connections` idle connections opened by a client process
 *    (spread over local addresses 127.0.0.2-201, so no address runs short of ports). Each accepted
 *    connection is handled as the accept stage does (data, close and error listeners,
 *    `setKeepAlive(true, 60 s)`). The server's RSS and heap are read after a forced GC before and
 *    after, and the difference is divided by the number of connections.
 * 2. Heap objects: heap snapshots at the same two points; the report lists, per connection, the
 *    objects that appeared (by V8 type and constructor or string) and their bytes.
 * 3. Throughput: a client process keeps `inflight` messages of `bytes` bytes outstanding, over one
 *    connection (pipelined) and over 200 connections (one each); the server answers each whole
 *    message with one write of it (one response per request, as SIP does). Messages per second over
 *    `seconds` after a one-second warm-up, median of three alternating runs; server CPU per message;
 *    client CPU, to show whether the client was the limit (both share this box's cores).
 *
 * Roles (used by the runner itself): `server net|ffi hold|echo`, `hold PORT N`,
 * `load PORT CONNS INFLIGHT BYTES SECONDS`. Every process is ended before the next scenario.
 *
 * @module
 */
import net from "node:net";
import process from "node:process";
import v8 from "node:v8";
import { type FlowSocket, listenTcp } from "../transport/tcp.ts";
import { listenTcpReusePort } from "../transport/tcp_ffi.ts";

const HOST = "127.0.0.1";
/** Runs of each throughput scenario (the median is reported). */
const ROUNDS = 3;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Lines of text from a byte stream. */
async function* linesOf(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let buffered = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    buffered += chunk;
    let at: number;
    while ((at = buffered.indexOf("\n")) >= 0) {
      yield buffered.slice(0, at);
      buffered = buffered.slice(at + 1);
    }
  }
}

function collect(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc) {
    gc();
    gc();
  }
}

/**
 * A server: `hold` treats connections as idle flows; `echo` answers every whole message of `size`
 * bytes with one write. Commands on stdin: `count`, `measure`, `snapshot PATH`; at EOF it closes and
 * prints `cpu_us N handled N`.
 */
async function server(impl: string, mode: string, size: number): Promise<void> {
  let open = 0;
  let handled = 0;
  const onConnection = (s: FlowSocket) => {
    open++;
    s.on("error", () => {});
    s.on("close", () => open--);
    if (mode === "hold") {
      s.setKeepAlive(true, 60_000);
      s.on("data", () => {});
      return;
    }
    let rest: Uint8Array | null = null;
    s.on("data", (chunk: Uint8Array) => {
      let bytes = chunk;
      if (rest !== null) {
        bytes = new Uint8Array(rest.length + chunk.length);
        bytes.set(rest);
        bytes.set(chunk, rest.length);
        rest = null;
      }
      let at = 0;
      for (; at + size <= bytes.length; at += size) {
        s.write(bytes.subarray(at, at + size));
        handled++;
      }
      if (at < bytes.length) rest = bytes.slice(at);
    });
  };
  const transport = impl === "ffi"
    ? await listenTcpReusePort(HOST, 0, onConnection)
    : await listenTcp(HOST, 0, onConnection);
  console.log(`ready ${transport.port}`);
  const cpu0 = process.cpuUsage();
  for await (const line of linesOf(Deno.stdin.readable)) {
    const [command, arg] = line.split(" ");
    if (command === "count") console.log(`count ${open}`);
    else if (command === "measure") {
      collect();
      await sleep(300);
      collect();
      const m = Deno.memoryUsage();
      console.log(`mem ${m.rss} ${m.heapUsed} ${open}`);
    } else if (command === "snapshot") {
      collect();
      v8.writeHeapSnapshot(arg!);
      console.log(`snapshot ${arg}`);
    }
  }
  const cpu = process.cpuUsage(cpu0);
  console.log(`cpu_us ${cpu.user + cpu.system} handled ${handled}`);
  // node:net's close waits for every connection to end: exit rather than wait.
  void transport.close();
  Deno.exit(0);
}

/** Opens `n` idle connections from 127.0.0.2-201; prints `connected N`; holds them until EOF. */
async function hold(port: number, n: number): Promise<void> {
  const sockets: net.Socket[] = [];
  let failed = 0;
  for (let i = 0; i < n; i += 500) {
    const batch = Array.from(
      { length: Math.min(500, n - i) },
      (_, j) =>
        new Promise<void>((resolve) => {
          const s = net.connect({ host: HOST, port, localAddress: `127.0.0.${2 + (i + j) % 200}` });
          s.once("connect", () => {
            sockets.push(s);
            resolve();
          });
          s.once("error", () => {
            failed++;
            resolve();
          });
        }),
    );
    await Promise.all(batch);
  }
  console.log(`connected ${sockets.length} failed ${failed}`);
  for await (const _ of Deno.stdin.readable) { /* until the runner closes stdin */ }
  for (const s of sockets) s.destroy();
  Deno.exit(0);
}

/** Keeps `inflight` messages outstanding over `conns` connections; prints `rate N cpu_us N`. */
async function load(
  port: number,
  conns: number,
  inflight: number,
  size: number,
  seconds: number,
): Promise<void> {
  const message = new Uint8Array(size).fill(0x61);
  let answered = 0;
  const sockets: net.Socket[] = [];
  for (let i = 0; i < conns; i++) {
    const s = net.connect({ host: HOST, port, noDelay: true });
    await new Promise<void>((resolve, reject) => {
      s.once("connect", () => resolve());
      s.once("error", reject);
    });
    let pending = 0; // bytes of an answer received so far
    s.on("data", (chunk: Uint8Array) => {
      pending += chunk.length;
      while (pending >= size) {
        pending -= size;
        answered++;
        s.write(message); // the next request on the same connection
      }
    });
    sockets.push(s);
  }
  for (let i = 0; i < inflight; i++) sockets[i % conns]!.write(message);
  await sleep(1000);
  const start = answered;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await sleep(seconds * 1000);
  const rate = (answered - start) / ((performance.now() - t0) / 1000);
  const cpu = process.cpuUsage(cpu0);
  for (const s of sockets) s.destroy();
  console.log(`rate ${Math.round(rate)} cpu_us ${Math.round((cpu.user + cpu.system) / seconds)}`);
  Deno.exit(0);
}

const self = new URL(import.meta.url).pathname;

/** A child running this file in `role`, with stdin and stdout piped. */
function spawn(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", self, ...args],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = linesOf(child.stdout);
  const writer = child.stdin.getWriter();
  return {
    child,
    async line(): Promise<string> {
      const r = await lines.next();
      if (r.done) throw new Error(`${args[0]} ended early`);
      return r.value;
    },
    send: (text: string) => writer.write(new TextEncoder().encode(`${text}\n`)),
    async stop(): Promise<void> {
      await writer.close().catch(() => {});
    },
  };
}

type Child = ReturnType<typeof spawn>;

async function ask(p: Child, command: string): Promise<string[]> {
  await p.send(command);
  return (await p.line()).split(" ");
}

async function waitCount(p: Child, n: number): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if (Number((await ask(p, "count"))[1]) === n) return;
    await sleep(100);
  }
  throw new Error(`server never reached ${n} connections`);
}

/** Objects by `type:name` in a heap snapshot: count and self size. */
function heapCensus(path: string): Map<string, { count: number; bytes: number }> {
  const snap = JSON.parse(Deno.readTextFileSync(path)) as {
    snapshot: { meta: { node_fields: string[]; node_types: [string[]] } };
    nodes: number[];
    strings: string[];
  };
  const fields = snap.snapshot.meta.node_fields;
  const types = snap.snapshot.meta.node_types[0];
  const width = fields.length;
  const typeAt = fields.indexOf("type");
  const nameAt = fields.indexOf("name");
  const sizeAt = fields.indexOf("self_size");
  const census = new Map<string, { count: number; bytes: number }>();
  for (let i = 0; i < snap.nodes.length; i += width) {
    const type = types[snap.nodes[i + typeAt]!] ?? "?";
    let name = snap.strings[snap.nodes[i + nameAt]!] ?? "?";
    if (type === "string" || type === "concatenated string" || type === "sliced string") {
      name = "(strings)";
    } else if (type === "code" || type === "hidden" || type === "array") {
      name = name.length > 40 ? `${name.slice(0, 40)}…` : name;
    }
    const key = `${type}:${name}`;
    const entry = census.get(key) ?? { count: 0, bytes: 0 };
    entry.count++;
    entry.bytes += snap.nodes[i + sizeAt]!;
    census.set(key, entry);
  }
  return census;
}

interface MemoryResult {
  readonly impl: string;
  readonly connections: number;
  readonly rssPerConn: number;
  readonly heapPerConn: number;
  readonly census: { key: string; perConn: number; bytesPerConn: number }[];
  readonly snapshotBytesPerConn: number;
}

/**
 * Holds `connections` idle connections on a fresh server. With `census`, heap snapshots are taken
 * before and after (they inflate RSS, so the RSS of such a run is not reported).
 */
async function memoryScenario(
  impl: string,
  connections: number,
  census: boolean,
): Promise<MemoryResult> {
  const srv = spawn(["server", impl, "hold", "400"]);
  const clients: Child[] = [];
  try {
    const port = Number((await srv.line()).split(" ")[1]);
    // Warm-up: the code paths run once, so the JIT's work is in the baseline.
    const warm = spawn(["hold", String(port), "500"]);
    clients.push(warm);
    await warm.line();
    await waitCount(srv, 500);
    await warm.stop();
    await warm.child.status;
    await waitCount(srv, 0);
    const [, rss0, heap0] = await ask(srv, "measure");
    const dir = Deno.makeTempDirSync({ prefix: "tcpbench" });
    if (census) {
      // The first snapshot loads code (node:fs and more) whose strings would count as the flows'.
      await ask(srv, `snapshot ${dir}/warm.heapsnapshot`);
      await ask(srv, `snapshot ${dir}/before.heapsnapshot`);
    }

    const holder = spawn(["hold", String(port), String(connections)]);
    clients.push(holder);
    const [, made] = (await holder.line()).split(" ");
    await waitCount(srv, Number(made));
    const [, rss1, heap1, open] = await ask(srv, "measure");
    if (census) await ask(srv, `snapshot ${dir}/after.heapsnapshot`);
    await holder.stop();
    await srv.stop();
    await holder.child.status;
    await srv.line();
    await srv.child.status;

    const n = Number(open);
    const rows: MemoryResult["census"] = [];
    let snapshotBytes = 0;
    if (census) {
      const before = heapCensus(`${dir}/before.heapsnapshot`);
      const after = heapCensus(`${dir}/after.heapsnapshot`);
      for (const [key, a] of after) {
        const b = before.get(key) ?? { count: 0, bytes: 0 };
        snapshotBytes += a.bytes - b.bytes;
        const perConn = (a.count - b.count) / n;
        const bytesPerConn = (a.bytes - b.bytes) / n;
        if (perConn >= 0.9 || bytesPerConn >= 8) rows.push({ key, perConn, bytesPerConn });
      }
      rows.sort((x, y) => y.bytesPerConn - x.bytesPerConn);
    }
    Deno.removeSync(dir, { recursive: true });
    return {
      impl,
      connections: n,
      rssPerConn: (Number(rss1) - Number(rss0)) / n,
      heapPerConn: (Number(heap1) - Number(heap0)) / n,
      census: rows,
      snapshotBytesPerConn: snapshotBytes / n,
    };
  } finally {
    for (const p of [srv, ...clients]) {
      try {
        p.child.kill("SIGKILL");
      } catch { /* ended */ }
      await p.child.status.catch(() => {});
    }
  }
}

interface RateResult {
  readonly impl: string;
  readonly conns: number;
  readonly rate: number;
  readonly serverCpuPerMsg: number;
  readonly clientCpu: number;
}

async function rateScenario(
  impl: string,
  conns: number,
  inflight: number,
  size: number,
  seconds: number,
): Promise<RateResult> {
  const srv = spawn(["server", impl, "echo", String(size)]);
  let cl: Child | undefined;
  try {
    const port = Number((await srv.line()).split(" ")[1]);
    cl = spawn([
      "load",
      String(port),
      String(conns),
      String(inflight),
      String(size),
      String(seconds),
    ]);
    const [, rate, , clientCpu] = (await cl.line()).split(" ");
    await cl.child.status;
    await srv.stop();
    const [, cpu, , handled] = (await srv.line()).split(" ");
    await srv.child.status;
    return {
      impl,
      conns,
      rate: Number(rate),
      serverCpuPerMsg: Number(cpu) / Number(handled),
      clientCpu: Number(clientCpu) / 1e6,
    };
  } finally {
    for (const p of [srv, cl]) {
      if (!p) continue;
      try {
        p.child.kill("SIGKILL");
      } catch { /* ended */ }
      await p.child.status.catch(() => {});
    }
  }
}

const label = (impl: string) => impl === "ffi" ? "FFI epoll (tcp_ffi.ts)" : "node:net (tcp.ts)";

if (import.meta.main) {
  const [role, ...rest] = Deno.args;
  if (role === "server") {
    await server(rest[0] ?? "ffi", rest[1] ?? "hold", Number(rest[2] ?? 400));
  } else if (role === "hold") {
    await hold(Number(rest[0]), Number(rest[1]));
  } else if (role === "load") {
    const [port, conns, inflight, size, seconds] = rest.map(Number);
    await load(port!, conns!, inflight!, size!, seconds!);
  } else {
    const connections = Number(Deno.args[0] ?? 15000);
    const seconds = Number(Deno.args[1] ?? 5);
    const inflight = Number(Deno.args[2] ?? 200);
    const size = Number(Deno.args[3] ?? 400);
    const only = Deno.args[4] ?? "all";
    const memory: MemoryResult[] = [];
    const census: MemoryResult[] = [];
    const censusConns = Math.min(connections, 2000);
    for (const impl of only === "rate" ? [] : ["net", "ffi"]) {
      memory.push(await memoryScenario(impl, connections, false));
      census.push(await memoryScenario(impl, censusConns, true));
    }
    console.log(`\n## Memory per idle connection (${connections} held, server process)\n`);
    console.log(`| transport | connections | RSS / conn | JS heap used / conn |`);
    console.log(`| --- | --- | --- | --- |`);
    for (const m of memory) {
      console.log(
        `| ${label(m.impl)} | ${m.connections} | ${Math.round(m.rssPerConn)} B | ${
          Math.round(m.heapPerConn)
        } B |`,
      );
    }
    for (const m of census) {
      console.log(
        `\n### Heap objects per connection: ${label(m.impl)} (heap snapshots, ${m.connections} ` +
          `connections; all objects ${Math.round(m.snapshotBytesPerConn)} B / conn)\n`,
      );
      console.log(`| V8 type:constructor | objects / conn | bytes / conn |`);
      console.log(`| --- | --- | --- |`);
      for (const c of m.census) {
        console.log(
          `| ${c.key.replaceAll("|", "\\|")} | ${c.perConn.toFixed(2)} | ${
            c.bytesPerConn.toFixed(0)
          } |`,
        );
      }
    }
    console.log(
      `\n## Request/response throughput (${size}-byte messages, ${inflight} in flight, ${seconds} s; ` +
        `load average before: ${Deno.loadavg()[0]})\n`,
    );
    console.log(
      `| transport | connections | messages/s, median (range) of ${ROUNDS} | server CPU µs/msg | ` +
        `client CPU (cores) |`,
    );
    console.log(`| --- | --- | --- | --- | --- |`);
    for (const conns of only === "memory" ? [] : [1, 200]) {
      // Runs alternate between the transports; the median of `ROUNDS` is reported, with the range.
      const runs = new Map<string, RateResult[]>([["net", []], ["ffi", []]]);
      for (let round = 0; round < ROUNDS; round++) {
        for (const impl of ["net", "ffi"]) {
          runs.get(impl)!.push(await rateScenario(impl, conns, inflight, size, seconds));
        }
      }
      for (const [impl, rs] of runs) {
        rs.sort((a, b) => a.rate - b.rate);
        const mid = rs[Math.floor(rs.length / 2)]!;
        console.log(
          `| ${label(impl)} | ${conns} | ${mid.rate} (${rs[0]!.rate}-${
            rs[rs.length - 1]!.rate
          }) | ${mid.serverCpuPerMsg.toFixed(1)} | ${mid.clientCpu.toFixed(2)} |`,
        );
      }
    }
  }
}
