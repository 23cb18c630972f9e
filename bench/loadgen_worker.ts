/**
 * One load-generator process. Reads {@linkcode Command}s (JSON lines) on stdin, runs each,
 * answers with a {@linkcode Reply} line on stdout. Sockets are `node:dgram` and `node:net`
 * (cheapest per idle connection under Deno); a process holds at most ~19,000 of them. On Linux
 * the two hot modes (`udp`, `tcp_persistent`) run in {@linkcode ./loadgen_ffi.ts} instead: libc
 * sockets in a synchronous loop, a fraction of the CPU per request.
 *
 * Run by {@linkcode ./loadgen.ts}; not meant to be started by hand.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import dgram from "node:dgram";
import net from "node:net";
import process from "node:process";
import { Histogram } from "./hist.ts";
import type {
  Command,
  OpenResult,
  OpenSpec,
  RefreshSpec,
  Reply,
  RunResult,
  RunSpec,
} from "./loadgen_types.ts";
import { registerBuilder, retryAfterOf, seqOf, splitStream, statusOf } from "./sip_scan.ts";
import { ffiEngineFits, runFfi } from "./loadgen_ffi.ts";

const T1 = 500;
const T2 = 4000;
/** A held flow's REGISTER refused with 503 + Retry-After is sent again at most this many times. */
const MAX_503_RETRIES = 3;

/** A request in flight. */
interface Pending {
  t0: number;
  measured: boolean;
  nextRetx: number;
  interval: number;
  text: string;
  user: number;
  conn: Conn | null;
}

/** A TCP connection with its stream buffer. */
interface Conn {
  sock: net.Socket;
  buf: string;
  index: number;
  user: number;
  open: boolean;
}

const now = (): number => performance.now();

function cpuNow(): { user: number; system: number } {
  const u = process.cpuUsage();
  return { user: u.user / 1000, system: u.system / 1000 };
}

/** Counters shared by the run and refresh engines. */
class Tally {
  sent = 0;
  ok = 0;
  rejected503 = 0;
  failed = 0;
  timeouts = 0;
  connectErrors = 0;
  retransmits = 0;
  skipped = 0;
  lastDone = 0;
  /** When sending stopped (the end of the measuring window); 0 until then. */
  windowEnd = 0;
  latency = new Histogram();
  latency503 = new Histogram();
  loopLag = new Histogram();
  statuses: Record<string, number> = {};
  private lagTimer: ReturnType<typeof setInterval>;
  private lagLast = now();

  constructor() {
    this.lagTimer = setInterval(() => {
      const t = now();
      this.loopLag.record(Math.max(0, t - this.lagLast - 10) * 1000);
      this.lagLast = t;
    }, 10);
  }

  final(status: number, p: Pending, t: number): void {
    if (!p.measured) return;
    const k = String(status);
    this.statuses[k] = (this.statuses[k] ?? 0) + 1;
    const us = (t - p.t0) * 1000;
    if (status >= 200 && status < 300) {
      this.ok++;
      this.latency.record(us);
    } else if (status === 503) {
      this.rejected503++;
      this.latency503.record(us);
    } else this.failed++;
    this.lastDone = t;
  }

  result(measureStart: number, wall: number, c0: { user: number; system: number }): RunResult {
    clearInterval(this.lagTimer);
    const c1 = cpuNow();
    return {
      sent: this.sent,
      ok: this.ok,
      rejected503: this.rejected503,
      failed: this.failed,
      timeouts: this.timeouts,
      connectErrors: this.connectErrors,
      retransmits: this.retransmits,
      skipped: this.skipped,
      measuredMs: Math.max(0, (this.windowEnd || this.lastDone) - measureStart),
      latency: this.latency.toJSON(),
      latency503: this.latency503.toJSON(),
      statuses: this.statuses,
      cpuUserMs: c1.user - c0.user,
      cpuSystemMs: c1.system - c0.system,
      wallMs: wall,
      loopLag: this.loopLag.toJSON(),
    };
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Next source port per source address for held flows. bind() with port 0 scans the port
 * range in the kernel and slows to ~1 ms per connection beyond a few thousand sockets on one
 * address; naming the port is a hash lookup. Ports 1025-32767 are outside the kernel's
 * ephemeral range, so the kernel's own choices rarely collide with ours.
 */
const portCursor = new Map<string, number>();
function nextLocalPort(addr: string): number {
  let p = portCursor.get(addr) ?? 1025 + Math.floor(Math.random() * 1000);
  if (p > 32767) p = 1025;
  portCursor.set(addr, p + 1);
  return p;
}

/** Flows held between commands (`open`, then `refresh`, then `close`). */
const held: Conn[] = [];
/** Where responses on held flows go while a refresh runs. */
let heldSink: ((c: Conn, msg: string) => void) | null = null;

function connect(
  host: string,
  port: number,
  local: string | undefined,
  localPort?: number,
): net.Socket {
  const opts: net.NetConnectOpts = local === undefined
    ? { host, port, noDelay: true }
    : localPort === undefined
    ? { host, port, localAddress: local, noDelay: true }
    : { host, port, localAddress: local, localPort, noDelay: true };
  const s = net.connect(opts);
  s.setNoDelay(true);
  return s;
}

/** Runs one REGISTER load (any transport mode) and returns this worker's counters. */
async function run(worker: number, spec: RunSpec): Promise<RunResult> {
  if (ffiEngineFits(spec)) {
    const r = await runFfi(worker, spec);
    if (r !== null) return r;
  }
  const c0 = cpuNow();
  const tally = new Tally();
  const pending = new Map<number, Pending>();
  const udp = spec.mode === "udp";
  let seq = 0;
  let userNext = 0;
  const nextUser = (): number => {
    const u = spec.userBase + userNext;
    userNext = (userNext + 1) % Math.max(1, spec.userCount);
    return u;
  };

  const start = now();
  const measureStart = start + spec.warmupMs;
  const sendEnd = measureStart + spec.durationMs;
  let stopped = false;
  let wake: (() => void) | null = null;
  const signal = (): void => {
    if (wake) {
      const w = wake;
      wake = null;
      w();
    }
  };

  // Transport set-up.
  let sock: dgram.Socket | null = null;
  let localPort = 0;
  const conns: Conn[] = [];
  const heldOpen: Conn[] = [];
  let srcIdx = 0;
  const nextSrc = (): string | undefined => {
    if (spec.sourceAddrs.length === 0) return undefined;
    const a = spec.sourceAddrs[srcIdx % spec.sourceAddrs.length];
    srcIdx++;
    return a;
  };

  let onFinal: (p: Pending) => void = () => {};

  const complete = (s: number, status: number, t: number): void => {
    const p = pending.get(s);
    if (!p) return;
    if (status < 200) return; // provisional: keep waiting
    pending.delete(s);
    tally.final(status, p, t);
    onFinal(p);
    afterDone(p);
  };

  const onMessage = (msg: string, t: number): void => {
    const status = statusOf(msg);
    if (status === 0) return;
    const s = seqOf(msg);
    if (s >= 0) complete(s, status, t);
  };

  const attachReader = (c: Conn): void => {
    c.sock.on("data", (chunk: Buffer) => {
      const t = now();
      c.buf += chunk.toString("latin1");
      const { messages, rest } = splitStream(c.buf);
      c.buf = rest;
      for (const m of messages) onMessage(m, t);
    });
  };

  let build: (seq: number, user: number, port?: number) => string;
  if (udp) {
    sock = dgram.createSocket("udp4");
    await new Promise<void>((resolve, reject) => {
      sock!.once("error", reject);
      sock!.bind(0, "127.0.0.1", () => resolve());
    });
    localPort = sock.address().port;
    sock.on("message", (buf: Buffer) => {
      onMessage(buf.toString("latin1"), now());
    });
    build = registerBuilder({
      serverHost: spec.host,
      serverPort: spec.port,
      localHost: "127.0.0.1",
      localPort,
      transport: "UDP",
      worker,
    });
  } else {
    build = registerBuilder({
      serverHost: spec.host,
      serverPort: spec.port,
      localHost: "127.0.0.1",
      localPort: 5060,
      transport: "TCP",
      worker,
    });
  }

  const failConn = (c: Conn): void => {
    if (!c.open) return;
    c.open = false;
    const t = now();
    for (const [s, p] of pending) {
      if (p.conn === c) {
        pending.delete(s);
        if (p.measured) {
          tally.connectErrors++;
          tally.lastDone = t;
        }
        afterDone(p);
      }
    }
  };

  if (spec.mode === "tcp_persistent") {
    const n = Math.max(1, spec.connections);
    await Promise.all(
      Array.from({ length: n }, (_, i) =>
        new Promise<void>((resolve, reject) => {
          const s = connect(spec.host, spec.port, nextSrc());
          const c: Conn = { sock: s, buf: "", index: i, user: 0, open: true };
          s.once("connect", () => {
            conns.push(c);
            resolve();
          });
          s.once("error", (e: Error) => {
            failConn(c);
            reject(e);
          });
          s.on("close", () => failConn(c));
          attachReader(c);
        })),
    );
  }

  let rr = 0;
  const send = (p: Pending, s: number): void => {
    if (udp) {
      sock!.send(p.text, spec.port, spec.host);
      return;
    }
    if (spec.mode === "tcp_persistent") {
      let c = p.conn;
      if (!c) {
        c = conns[rr++ % conns.length]!;
        p.conn = c;
      }
      if (!c.open) {
        pending.delete(s);
        if (p.measured) tally.connectErrors++;
        return;
      }
      c.sock.write(build(s, p.user, c.sock.localPort ?? 5060));
      return;
    }
    // One connection per request: connect, send, and on the answer hold or close. The source
    // port is named (see nextLocalPort); one still in TIME_WAIT is skipped.
    const src = nextSrc();
    const c: Conn = {
      sock: null as unknown as net.Socket,
      buf: "",
      index: s,
      user: p.user,
      open: true,
    };
    p.conn = c;
    const attempt = (tries: number): void => {
      const so = connect(spec.host, spec.port, src, src ? nextLocalPort(src) : undefined);
      c.sock = so;
      let connected = false;
      so.once("connect", () => {
        connected = true;
        so.write(build(s, p.user, so.localPort ?? 5060));
      });
      so.on("error", (e: Error & { code?: string }) => {
        const busy = e.code === "EADDRINUSE" || e.code === "EADDRNOTAVAIL";
        if (!connected && busy && src && tries < 20 && c.open) {
          so.removeAllListeners();
          so.destroy();
          attempt(tries + 1);
          return;
        }
        failConn(c);
      });
      so.on("close", () => {
        if (c.sock === so) failConn(c);
      });
      attachReader(c);
    };
    attempt(0);
  };

  onFinal = (p: Pending): void => {
    const c = p.conn;
    if (!c || spec.mode === "tcp_persistent" || udp) return;
    if (spec.mode === "tcp_per_transaction") {
      c.open = false;
      c.sock.destroy();
    } else {
      heldOpen.push(c);
      while (heldOpen.length > spec.holdMax) {
        const old = heldOpen.shift()!;
        old.open = false;
        old.sock.destroy();
      }
    }
  };

  const issue = (): boolean => {
    const t = now();
    if (stopped || t >= sendEnd || seq >= spec.maxRequests) {
      stopped = true;
      return false;
    }
    const s = seq++;
    const user = nextUser();
    const p: Pending = {
      t0: t,
      measured: t >= measureStart,
      nextRetx: t + T1,
      interval: T1,
      text: udp ? build(s, user) : "",
      user,
      conn: null,
    };
    if (p.measured) tally.sent++;
    pending.set(s, p);
    send(p, s);
    return true;
  };

  // Closed loop refills on completion; open loop ignores completions.
  const afterDone = (_p: Pending): void => {
    if (spec.loop === "closed" && !stopped) issue();
    if (pending.size === 0) signal();
  };

  // Timer sweep: retransmissions (UDP) and timeouts, oldest first.
  const sweep = setInterval(() => {
    const t = now();
    for (const [s, p] of pending) {
      if (p.t0 + T1 > t) break; // younger entries need nothing yet
      if (p.t0 + spec.timeoutMs <= t) {
        pending.delete(s);
        if (p.measured) {
          tally.timeouts++;
          tally.lastDone = t;
        }
        if (p.conn && spec.mode !== "tcp_persistent") {
          p.conn.open = false;
          p.conn.sock.destroy();
        }
        afterDone(p);
        continue;
      }
      if (udp && spec.retransmit && p.nextRetx <= t) {
        sock!.send(p.text, spec.port, spec.host);
        if (p.measured) tally.retransmits++;
        p.interval = Math.min(p.interval * 2, T2);
        p.nextRetx = t + p.interval;
      }
    }
  }, 20);

  try {
    if (spec.loop === "closed") {
      const k = Math.max(1, spec.outstanding);
      for (let i = 0; i < k; i++) if (!issue()) break;
      // Wait for the sending window to end, then drain.
      while (!stopped && now() < sendEnd) {
        await sleep(Math.min(50, Math.max(1, sendEnd - now())));
      }
      stopped = true;
    } else {
      const rate = Math.max(1, spec.rate);
      let due = 0;
      while (!stopped) {
        const t = now();
        if (t >= sendEnd || seq >= spec.maxRequests) break;
        const target = Math.floor(((t - start) * rate) / 1000);
        // Everything due is sent now, at most 100 ms worth in one burst.
        due = Math.min(target - seq, Math.max(50, rate / 10));
        for (let i = 0; i < due; i++) {
          if (pending.size >= spec.maxOutstanding) {
            if (t >= measureStart) tally.skipped += due - i;
            seq += due - i; // keep the schedule: skipped requests are not sent late
            break;
          }
          if (!issue()) break;
        }
        await sleep(1);
      }
      stopped = true;
    }
    tally.windowEnd = Math.min(now(), sendEnd);
    const drainEnd = now() + spec.timeoutMs + 200;
    while (pending.size > 0 && now() < drainEnd) {
      await Promise.race([new Promise<void>((r) => (wake = r)), sleep(100)]);
    }
    const t = now();
    for (const [, p] of pending) {
      if (p.measured) {
        tally.timeouts++;
        tally.lastDone = t;
      }
    }
    pending.clear();
  } finally {
    clearInterval(sweep);
    if (sock) sock.close();
    for (const c of conns) {
      c.open = false;
      c.sock.destroy();
    }
    for (const c of heldOpen) {
      c.open = false;
      c.sock.destroy();
    }
  }
  return tally.result(measureStart, now() - start, c0);
}

/** Opens and registers (or echoes on) `count` more held flows. */
async function open(worker: number, spec: OpenSpec): Promise<OpenResult> {
  const c0 = cpuNow();
  const t0 = now();
  const setup = new Histogram();
  const first = new Histogram();
  let opened = 0, failed = 0, next = 0;
  let firstError: string | null = null;
  const build = registerBuilder({
    serverHost: spec.host,
    serverPort: spec.port,
    localHost: "127.0.0.1",
    localPort: 5060,
    transport: "TCP",
    worker,
  });
  const one = (i: number): Promise<void> =>
    new Promise<void>((resolve) => {
      const local = spec.sourceAddrs.length
        ? spec.sourceAddrs[i % spec.sourceAddrs.length]
        : undefined;
      const user = spec.userBase + i;
      const tc = now();
      let ts = 0;
      let done = false;
      let tries = 0;
      let retries = 0;
      let s = connect(spec.host, spec.port, local, local ? nextLocalPort(local) : undefined);
      const c: Conn = { sock: s, buf: "", index: held.length, user, open: true };
      const finish = (ok: boolean, err?: string): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (ok) {
          opened++;
          held.push(c);
        } else {
          failed++;
          if (firstError === null && err) firstError = err;
          c.open = false;
          s.destroy();
        }
        resolve();
      };
      const timer = setTimeout(() => finish(false, "timeout"), spec.timeoutMs);
      const onConnect = (): void => {
        ts = now();
        setup.record((ts - tc) * 1000);
        s.write(
          spec.proto === "sip" ? build(1_000_000_000 + i, user, s.localPort ?? 5060) : `E${i}\n`,
        );
      };
      const onError = (e: Error & { code?: string }): void => {
        // A source port still in use (TIME_WAIT of an earlier run): take the next one.
        if (e.code === "EADDRINUSE" && ts === 0 && local && tries++ < 50 && !done) {
          s.removeAllListeners();
          s.destroy();
          s = connect(spec.host, spec.port, local, nextLocalPort(local));
          c.sock = s;
          wire();
          return;
        }
        finish(false, e.message);
      };
      const wire = (): void => {
        s.once("connect", onConnect);
        s.on("error", onError);
        s.on("close", onClose);
        s.on("data", onData);
      };
      const onClose = (): void => {
        c.open = false;
        if (!done) finish(false, "closed by peer");
      };
      const onData = (chunk: Buffer): void => {
        c.buf += chunk.toString("latin1");
        if (!done) {
          if (spec.proto === "echo") {
            const nl = c.buf.indexOf("\n");
            if (nl < 0) return;
            c.buf = c.buf.slice(nl + 1);
            first.record((now() - ts) * 1000);
            finish(true);
          } else {
            const { messages, rest } = splitStream(c.buf);
            c.buf = rest;
            const m = messages[0];
            if (m === undefined) return;
            const st = statusOf(m);
            if (st >= 200 && st < 300) {
              first.record((now() - ts) * 1000);
              finish(true);
            } else if (st === 503 && retries < MAX_503_RETRIES && retryAfterOf(m) >= 0) {
              // As a phone does (RFC 3261 §21.5.4): register again after Retry-After, here
              // compressed to at most 2 s so the bench's timeout still bounds the open.
              retries++;
              const wait = Math.min(2000, retryAfterOf(m) * 1000);
              setTimeout(() => {
                if (!done && c.open) {
                  s.write(
                    build(1_500_000_000 + retries * 10_000_000 + i, user, s.localPort ?? 5060),
                  );
                }
              }, wait);
            } else if (st >= 300) finish(false, `status ${st}`);
          }
          return;
        }
        if (heldSink) {
          if (spec.proto === "echo") {
            let nl: number;
            while ((nl = c.buf.indexOf("\n")) >= 0) {
              const line = c.buf.slice(0, nl);
              c.buf = c.buf.slice(nl + 1);
              heldSink(c, line);
            }
          } else {
            const { messages, rest } = splitStream(c.buf);
            c.buf = rest;
            for (const m of messages) heldSink(c, m);
          }
        } else c.buf = "";
      };
      wire();
    });
  const lanes = Array.from(
    { length: Math.max(1, Math.min(spec.concurrency, spec.count)) },
    async () => {
      while (next < spec.count && failed < spec.maxFailures) {
        const i = next++;
        await one(i);
      }
    },
  );
  await Promise.all(lanes);
  const c1 = cpuNow();
  return {
    opened,
    failed,
    held: held.length,
    firstError,
    setup: setup.toJSON(),
    firstExchange: first.toJSON(),
    wallMs: now() - t0,
    cpuUserMs: c1.user - c0.user,
    cpuSystemMs: c1.system - c0.system,
  };
}

/** Sends REGISTERs (or echo lines) over the held flows at a rate; latency per request. */
async function refresh(
  worker: number,
  spec: RefreshSpec,
  host: string,
  port: number,
): Promise<RunResult> {
  const c0 = cpuNow();
  const tally = new Tally();
  const pending = new Map<number, Pending>();
  const build = registerBuilder({
    serverHost: host,
    serverPort: port,
    localHost: "127.0.0.1",
    localPort: 5060,
    transport: "TCP",
    worker,
  });
  const start = now();
  heldSink = (_c, msg) => {
    const t = now();
    let s: number, status: number;
    if (msg.charCodeAt(0) === 69 /* E */) {
      s = parseInt(msg.slice(1), 10);
      status = 200;
    } else {
      status = statusOf(msg);
      s = seqOf(msg);
      if (status < 200) return;
    }
    const p = pending.get(s);
    if (!p) return;
    pending.delete(s);
    tally.final(status, p, t);
  };
  const live = held.filter((c) => c.open);
  let seq = 0;
  const echo = lastOpenProto === "echo";
  try {
    while (live.length > 0) {
      const t = now();
      if (t - start >= spec.durationMs) break;
      const target = Math.floor(((t - start) * spec.rate) / 1000);
      while (seq < target) {
        const c = live[seq % live.length]!;
        const s = seq++;
        const p: Pending = {
          t0: t,
          measured: true,
          nextRetx: 0,
          interval: 0,
          text: echo ? `E${s}\n` : build(s, c.user, c.sock.localPort ?? 5060),
          user: c.user,
          conn: c,
        };
        pending.set(s, p);
        tally.sent++;
        c.sock.write(p.text);
      }
      for (const [s, p] of pending) {
        if (p.t0 + spec.timeoutMs > t) break;
        pending.delete(s);
        tally.timeouts++;
      }
      await sleep(2);
    }
    tally.windowEnd = now();
    const drainEnd = now() + spec.timeoutMs;
    while (pending.size > 0 && now() < drainEnd) await sleep(10);
    tally.timeouts += pending.size;
  } finally {
    heldSink = null;
  }
  return tally.result(start, now() - start, c0);
}

let lastOpenProto: "sip" | "echo" = "sip";
let lastTarget: { host: string; port: number } = { host: "127.0.0.1", port: 5060 };

/** Runs one command; exported so that type checking of the coordinator reaches this file. */
export async function handle(cmd: Command): Promise<Reply> {
  switch (cmd.op) {
    case "run":
      return { id: cmd.id, ok: true, run: await run(cmd.worker, cmd.spec) };
    case "open":
      lastOpenProto = cmd.spec.proto;
      lastTarget = { host: cmd.spec.host, port: cmd.spec.port };
      return { id: cmd.id, ok: true, open: await open(cmd.worker, cmd.spec) };
    case "refresh":
      return {
        id: cmd.id,
        ok: true,
        run: await refresh(cmd.worker, cmd.spec, lastTarget.host, lastTarget.port),
      };
    case "close": {
      const n = held.length;
      for (const c of held) {
        c.open = false;
        c.sock.destroy();
      }
      held.length = 0;
      return { id: cmd.id, ok: true, closed: n };
    }
    case "exit":
      return { id: cmd.id, ok: true, closed: held.length };
  }
}

async function main(): Promise<void> {
  const dec = new TextDecoder();
  const enc = new TextEncoder();
  let buf = "";
  const out = (r: Reply): void => {
    Deno.stdout.writeSync(enc.encode(JSON.stringify(r) + "\n"));
  };
  for await (const chunk of Deno.stdin.readable) {
    buf += dec.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!line.trim()) continue;
      const cmd = JSON.parse(line) as Command;
      try {
        out(await handle(cmd));
      } catch (e) {
        out({ id: cmd.id, ok: false, error: e instanceof Error ? e.message : String(e) });
      }
      if (cmd.op === "exit") Deno.exit(0);
    }
  }
  Deno.exit(0);
}

if (import.meta.main) await main();
