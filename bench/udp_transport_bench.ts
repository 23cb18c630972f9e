/**
 * UDP echo throughput: `node:dgram` (transport/udp.ts) against the FFI SO_REUSEPORT transport
 * (transport/udp_ffi.ts), with one server process and with several sharing the port.
 *
 *   deno run -A bench/udp_transport_bench.ts [seconds=5] [inflight=200] [bytes=400]
 *
 * Each scenario starts the echo server process(es) and one client process; the client keeps
 * `inflight` datagrams outstanding spread over its source sockets (each echo is answered by the
 * next datagram on the same socket), tops the window back up when datagrams are lost, and counts
 * echoes per second after a one-second warm-up. Every process is ended before the next scenario.
 *
 * Roles (used by the runner itself): `server dgram|ffi PORT` and
 * `client PORT SOCKETS INFLIGHT BYTES SECONDS`.
 *
 * @module
 */
import process from "node:process";
import { listenUdp } from "../transport/udp.ts";
import { listenUdpReusePort } from "../transport/udp_ffi.ts";

const HOST = "127.0.0.1";

/** An echo server until stdin closes; prints `ready PORT`, then `received N` when done. */
async function server(impl: string, port: number): Promise<void> {
  let received = 0;
  const listen = impl === "ffi" ? listenUdpReusePort : listenUdp;
  const transport = await listen(HOST, port, (bytes, source) => {
    received++;
    transport.send(bytes, source.address, source.port);
  });
  console.log(`ready ${transport.port}`);
  const before = process.cpuUsage();
  for await (const _ of Deno.stdin.readable) { /* until the runner closes stdin */ }
  const cpu = process.cpuUsage(before); // every thread of the process, the FFI pool's included
  await transport.close();
  console.log(
    `received ${received} cpu_us ${cpu.user + cpu.system} sendErrors ${transport.sendErrors}`,
  );
}

/** The load: prints `rate N` (echoes per second over the measured window) and `lost N`. */
async function client(
  port: number,
  sockets: number,
  inflight: number,
  size: number,
  seconds: number,
): Promise<void> {
  const payload = new Uint8Array(size).fill(0x61);
  let echoes = 0;
  let outstanding = 0;
  let lost = 0;
  type Transport = Awaited<ReturnType<typeof listenUdpReusePort>>;
  const transports: Transport[] = [];
  let next = 0;
  const send = (t: Transport) => {
    outstanding++;
    t.send(payload, HOST, port);
  };
  for (let i = 0; i < sockets; i++) {
    transports.push(
      await listenUdpReusePort(HOST, 0, () => {
        echoes++;
        outstanding--;
        send(transports[next++ % transports.length]!);
      }),
    );
  }
  const fill = () => {
    while (outstanding < inflight) send(transports[next++ % transports.length]!);
  };
  fill();
  let last = echoes;
  const refill = setInterval(() => {
    if (echoes === last) { // nothing came back for 100 ms: the window was lost
      lost += outstanding;
      outstanding = 0;
      fill();
    }
    last = echoes;
  }, 100);
  await new Promise((r) => setTimeout(r, 1000));
  const start = echoes;
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const rate = (echoes - start) / ((performance.now() - t0) / 1000);
  clearInterval(refill);
  await Promise.all(transports.map((t) => t.close()));
  console.log(`rate ${Math.round(rate)} lost ${lost}`);
}

const self = new URL(import.meta.url).pathname;

/** Starts `deno run -A` on this file with `args`, piping stdin and stdout. */
function spawn(args: string[]): { child: Deno.ChildProcess; lines: AsyncIterator<string> } {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--unstable-net", self, ...args],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).pipeThrough(
    new TransformStream<string, string>(
      {
        buffer: "",
        transform(chunk, out) {
          const parts = (this.buffer + chunk).split("\n");
          this.buffer = parts.pop() ?? "";
          for (const p of parts) out.enqueue(p);
        },
      } as Transformer<string, string> & { buffer: string },
    ),
  )[Symbol.asyncIterator]();
  return { child, lines };
}

async function line(it: AsyncIterator<string>): Promise<string> {
  const r = await it.next();
  if (r.done) throw new Error("child ended early");
  return r.value;
}

interface Result {
  readonly impl: string;
  readonly servers: number;
  readonly sockets: number;
  readonly rate: number;
  readonly split: string;
  readonly lost: number;
  /** Server CPU time (user + system, all processes) per datagram received, in µs. */
  readonly cpuPerDatagram: number;
}

async function scenario(
  impl: string,
  servers: number,
  sockets: number,
  inflight: number,
  size: number,
  seconds: number,
): Promise<Result> {
  const procs: ReturnType<typeof spawn>[] = [];
  let port = 0;
  for (let i = 0; i < servers; i++) {
    const p = spawn(["server", impl, String(port)]);
    procs.push(p);
    port = Number((await line(p.lines)).split(" ")[1]);
  }
  const c = spawn([
    "client",
    String(port),
    String(sockets),
    String(inflight),
    String(size),
    String(seconds),
  ]);
  c.child.stdin.close();
  const [, rate, , lost] = (await line(c.lines)).split(" ");
  await c.child.status;
  const counts: string[] = [];
  let received = 0;
  let cpu = 0;
  for (const p of procs) {
    await p.child.stdin.close();
    const words = (await line(p.lines)).split(" ");
    counts.push(words[1] ?? "?");
    received += Number(words[1]);
    cpu += Number(words[3]);
    await p.child.status;
  }
  return {
    impl,
    servers,
    sockets,
    rate: Number(rate),
    split: counts.join("/"),
    lost: Number(lost),
    cpuPerDatagram: cpu / received,
  };
}

if (import.meta.main) {
  const [role, ...rest] = Deno.args;
  if (role === "server") {
    await server(rest[0] ?? "ffi", Number(rest[1] ?? 0));
  } else if (role === "client") {
    const [port, sockets, inflight, size, seconds] = rest.map(Number);
    await client(port!, sockets!, inflight!, size!, seconds!);
  } else {
    const seconds = Number(Deno.args[0] ?? 5);
    const inflight = Number(Deno.args[1] ?? 200);
    const size = Number(Deno.args[2] ?? 400);
    const plan: [string, number, number][] = [
      ["dgram", 1, 1],
      ["ffi", 1, 1],
      ["dgram", 1, 32],
      ["ffi", 1, 32],
      ["ffi", 2, 32],
    ];
    console.log(
      `| server | processes | client sockets | echoes/s | server CPU µs/datagram | datagrams per server | lost |`,
    );
    console.log(`| --- | --- | --- | --- | --- | --- | --- |`);
    for (const [impl, servers, sockets] of plan) {
      const r = await scenario(impl, servers, sockets, inflight, size, seconds);
      console.log(
        `| ${
          r.impl === "ffi" ? "FFI SO_REUSEPORT" : "node:dgram"
        } | ${r.servers} | ${r.sockets} | ${r.rate} | ${
          r.cpuPerDatagram.toFixed(1)
        } | ${r.split} | ${r.lost} |`,
      );
    }
  }
}
