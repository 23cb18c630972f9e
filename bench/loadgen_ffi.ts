/**
 * The load generator's cheap engine for its two hot modes, `udp` and `tcp_persistent` (closed and
 * open loop), on Linux. {@linkcode ./loadgen_worker.ts} runs a {@linkcode RunSpec} here when
 * {@linkcode ffiEngineFits} says so, and through `node:dgram`/`node:net` otherwise.
 *
 * Why: on a 2-core box the generator shares the CPU with the server, and through the runtime's
 * sockets it spent about as much CPU per REGISTER as the server (~45 µs over UDP, ~17 µs over TCP),
 * so it could neither leave a second server worker its core nor offer 3x the server's capacity.
 * Here one synchronous loop owns the process while the command runs (the worker process does
 * nothing else; its event loop is blocked until the run returns), at 3-10 µs per request:
 *
 * - turns of at least 1 ms: send what is due, then `nanosleep` for the rest of the turn and
 *   `poll(2)` the sockets (blocking up to 1 ms more when nothing came). A wake-up costs ~40 µs of
 *   CPU on a VM, more than a dozen requests, so the loop never wakes per datagram, and an idle loop
 *   sleeps instead of spinning. Arrival times come from the kernel (`SO_TIMESTAMPNS`: per datagram
 *   over UDP; over TCP the last segment of each read), so the wait does not show in latencies;
 * - UDP: 8 connected sockets per process (the server's workers share their port through
 *   `SO_REUSEPORT` and the kernel picks one by hashing the source port, so one socket would load
 *   one worker); a socket's requests of one turn have equal lengths and leave in one `send` with
 *   `UDP_SEGMENT` (GSO: the kernel splits it into one datagram per request at the receiving
 *   socket), answers come 64 at a time by `recvmmsg`;
 * - TCP: nonblocking connections, one `send` per connection per turn with every request due on it,
 *   `recvmsg` into one big buffer split into messages on bytes (CRLFCRLF + Content-Length);
 * - requests are a byte template of {@linkcode registerBuilder}'s message with the request number
 *   (10 digits, zero-padded) and the user number patched in; responses are read on bytes (status
 *   at bytes 8-10, request number after `Call-ID:`, found by a skipping search), nothing is decoded
 *   to a string;
 * - requests in flight live in typed arrays indexed by request number modulo a power of two (grown
 *   when needed); the timeout and every Timer E retransmission (RFC 3261 §17.1.2.2: T1 = 500 ms
 *   doubling to T2 = 4 s) are cursors that walk the request numbers in send order, so each request
 *   is visited a fixed number of times whatever the load.
 *
 * Counting is the worker's (`Tally`): the same counters, the same measuring window, latencies in µs
 * from the first send, CPU from `process.cpuUsage()`. A closed loop refills on the socket or
 * connection the answer came back on (so the window does not drift to a slower server worker and
 * starve the other); an open loop sends everything the schedule says is due at each turn (at most
 * 100 ms worth), skipping and counting what exceeds `maxOutstanding`. `loopLag` holds, per 10 ms,
 * how much the longest turn exceeded its planned length (1 ms + the 1 ms poll): the analogue of a
 * late 10 ms timer, high when the generator is saturated or descheduled.
 *
 * Needs `--allow-ffi`; Linux x86_64/aarch64 with glibc (struct layouts, constants, `libc.so.6`);
 * IPv4 servers (an IPv6 one, or no glibc, falls back to the worker's `node:` path).
 *
 * @module
 */
import process from "node:process";
import { type OpenLibc, openLibc } from "../transport/_libc.ts";
import { AF_INET, literalFor } from "../transport/_sockaddr.ts";
import { Histogram } from "./hist.ts";
import type { RunResult, RunSpec } from "./loadgen_types.ts";
import { registerBuilder } from "./sip_scan.ts";

const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const SOCK_FLAGS = 0x800 | 0x80000; // SOCK_NONBLOCK | SOCK_CLOEXEC
const SOL_SOCKET = 1;
const SO_ERROR = 4;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const IPPROTO_TCP = 6;
const SOL_UDP = 17;
const UDP_SEGMENT = 103;
const SO_TIMESTAMPNS = 35; // SO_TIMESTAMPNS_OLD = SCM_TIMESTAMPNS; a 64-bit timespec on LP64
const CLOCK_REALTIME = 0;
const TCP_NODELAY = 1;
const DONTWAIT = 0x40 | 0x4000; // MSG_DONTWAIT | MSG_NOSIGNAL
const POLLIN = 1;
const POLLOUT = 4;
const EINTR = 4;
const EIO = 5;
const EINVAL = 22;
const ENOPROTOOPT = 92;
const EOPNOTSUPP = 95;
const EAGAIN = 11;
const EINPROGRESS = 115;

/** Timer E (RFC 3261 §17.1.2.2), ms. */
const T1 = 500;
const T2 = 4000;
/** How long `poll` waits at most when nothing came during a turn, ms. */
const POLL_MS = 1;
/** UDP sockets per process (see the module doc). */
const UDP_SOCKETS = 8;
/**
 * Shortest turn of the loop, ms (UDP, TCP). Without it the loop wakes for every few answers, and a
 * wake costs more than they do; arrival times come from the kernel, so waiting does not show in
 * the latencies (see the module doc).
 */
const UDP_TURN_MS = 1;
const TCP_TURN_MS = 1;
/** Open loop over UDP: consecutive requests sent from one socket (one GSO send) before the next. */
const UDP_RUN_SHIFT = 4;
/** Datagrams per `recvmmsg`. */
const BATCH = 64;
/** UDP GSO: bytes and requests in one send at most (the kernel's limits: 64 KiB, 64 segments). */
const GSO_RUN = 65000;
const GSO_SEGMENTS = 64;
/** Bytes per receive slot; a longer response is truncated, which loses nothing we read. */
const RECV_SLOT = 4096;
/** `sizeof(struct mmsghdr)` on LP64 Linux; `msg_len` is the u32 at byte 56. */
const MMSG = 64;
/** Control bytes per received datagram: `CMSG_SPACE(sizeof(struct timespec))`. */
const CTRL = 32;
/** TCP: bytes asked of one `recvmsg`; leftovers (a partial message) are kept up to `REST_MAX`. */
const TCP_CHUNK = 256 * 1024;
const REST_MAX = 64 * 1024;
/** TCP: a connection's output is sent at once when it reaches this many bytes. */
const TCP_OUT_FLUSH = 256 * 1024;
/** Request numbers are written with this many digits (zero-padded). */
const SEQ_DIGITS = 10;
/** Initial ring size (requests in flight or not yet timed out, by request number). */
const RING = 1 << 16;

const SYMBOLS = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  poll: { parameters: ["buffer", "usize", "i32"], result: "i32" },
  recvmmsg: { parameters: ["i32", "pointer", "u32", "i32", "pointer"], result: "i32" },
  recvmsg: { parameters: ["i32", "pointer", "i32"], result: "i32" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  send_at: { name: "send", parameters: ["i32", "pointer", "usize", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  nanosleep: { parameters: ["buffer", "pointer"], result: "i32" },
  clock_gettime: { parameters: ["i32", "buffer"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

type Sym = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let libc: OpenLibc<typeof SYMBOLS> | null = null;
let sym: Sym | null = null;

/** libc, opened on first use (once per process). */
function lib(): Sym {
  if (sym === null) {
    libc = openLibc(SYMBOLS, "loadgen_ffi");
    sym = libc.symbols;
  }
  return sym;
}

/** errno of the last failed call on this thread. */
const errno = (): number => libc!.errno();

const now = (): number => performance.now();

const timespec = new Uint32Array(4);
const timespecBytes = new Uint8Array(timespec.buffer);

/** Sleeps `ms` (under a second). */
function sleepMs(ms: number): void {
  timespec[0] = 0;
  timespec[1] = 0;
  timespec[2] = Math.round(ms * 1e6);
  timespec[3] = 0;
  sym!.nanosleep(timespecBytes, null);
}

/** Seconds of the real-time clock at load, so that real-time ms stay small exact doubles. */
let epochSec = 0;

/** The real-time clock (`SO_TIMESTAMPNS`'s clock) in ms since `epochSec`. */
function realMs(): number {
  sym!.clock_gettime(CLOCK_REALTIME, timespecBytes);
  const sec = timespec[0]! + timespec[1]! * 4294967296;
  if (epochSec === 0) epochSec = sec;
  return (sec - epochSec) * 1000 + timespec[2]! / 1e6;
}

/**
 * Arrival time on our clock from the `SCM_TIMESTAMPNS` control message at word `k` of `ctrl`
 * (`used` control bytes came back), given `real` = real-time ms minus our ms; `t` (now) if absent.
 */
function arrival(ctrl: Uint32Array, k: number, used: number, real: number, t: number): number {
  if (used < CTRL || ctrl[k + 2] !== SOL_SOCKET || ctrl[k + 3] !== SO_TIMESTAMPNS) return t;
  const sec = ctrl[k + 4]! + ctrl[k + 5]! * 4294967296;
  return Math.min(t, (sec - epochSec) * 1000 + ctrl[k + 6]! / 1e6 - real);
}

/** Whether {@linkcode runFfi} can run `spec` (Linux, `udp` or `tcp_persistent`). */
export function ffiEngineFits(spec: RunSpec): boolean {
  return Deno.build.os === "linux" &&
    (Deno.build.arch === "x86_64" || Deno.build.arch === "aarch64") &&
    (spec.mode === "udp" || spec.mode === "tcp_persistent");
}

/** A `sockaddr_in` for an IPv4 literal. */
function sockaddrIn(address: string, port: number): Uint8Array {
  const sa = new Uint8Array(16);
  sa[0] = AF_INET;
  sa[2] = port >> 8;
  sa[3] = port & 0xff;
  sa.set(address.split(".").map(Number), 4);
  return sa;
}

/** Sets an int socket option; false if the kernel refused it. */
function setOpt(fd: number, level: number, name: number, value: number): boolean {
  const v = new Uint8Array(4);
  new DataView(v.buffer).setInt32(0, value, true);
  return lib().setsockopt(fd, level, name, v, 4) === 0;
}

/** Local port of a bound socket. */
function localPortOf(fd: number): number {
  const sa = new Uint8Array(16);
  const len = new Uint32Array([16]);
  lib().getsockname(fd, sa, new Uint8Array(len.buffer));
  return (sa[2]! << 8) | sa[3]!;
}

/** Address of byte `at` of `buf` as a number (for iovecs). */
function addressOf(buf: Uint8Array, at = 0): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf))) + BigInt(at);
}

// ---------------------------------------------------------------------------------------------
// Requests as byte templates.

/** One REGISTER as bytes and where its request number and user digits go (3 places each). */
interface Template {
  bytes: Uint8Array;
  seqAt: [number, number, number];
  userAt: [number, number, number];
  userWidth: number;
}

/** Offsets of every occurrence of `needle` in `text`. */
function allIndexes(text: string, needle: string): number[] {
  const out: number[] = [];
  for (let i = text.indexOf(needle); i >= 0; i = text.indexOf(needle, i + 1)) out.push(i);
  return out;
}

/**
 * The message {@linkcode registerBuilder} makes for local port `port` and a user number of
 * `userWidth` digits, with marks where the numbers go (so its text is defined in one place).
 */
function makeTemplate(
  build: (seq: number, user: number, port?: number) => string,
  port: number,
  userWidth: number,
): Template {
  const seqMark = "9876543210"; // SEQ_DIGITS digits
  const userMark = "7" + "3".repeat(userWidth - 1);
  const text = build(Number(seqMark), Number(userMark), port);
  const seqs = allIndexes(text, seqMark);
  const users = allIndexes(text, `sip:u${userMark}@`).map((i) => i + 5);
  if (seqs.length !== 3 || users.length !== 3) {
    throw new Error(`loadgen_ffi: unexpected REGISTER template (${seqs.length}, ${users.length})`);
  }
  return {
    bytes: new TextEncoder().encode(text),
    seqAt: seqs as [number, number, number],
    userAt: users as [number, number, number],
    userWidth,
  };
}

/** Digits of a user number as `userName` writes it (at least 6). */
function userWidthOf(user: number): number {
  if (user < 1_000_000) return 6;
  let w = 7;
  for (let lim = 10_000_000; user >= lim && w < 16; lim *= 10) w++;
  return w;
}

/** Writes `v` as `width` decimal digits at three places of `buf`. */
function digits3(buf: Uint8Array, a: number, b: number, c: number, v: number, width: number) {
  for (let i = width - 1; i >= 0; i--) {
    const q = Math.floor(v / 10);
    const d = 48 + v - q * 10;
    buf[a + i] = d;
    buf[b + i] = d;
    buf[c + i] = d;
    v = q;
  }
}

/** Templates per channel (socket or connection) and user width, made on first use. */
class Templates {
  private readonly cache: (Template | undefined)[] = [];
  readonly maxLength: number;

  constructor(
    private readonly build: (seq: number, user: number, port?: number) => string,
    private readonly ports: number[],
  ) {
    this.maxLength = makeTemplate(build, 65535, 16).bytes.length;
  }

  /** The template for channel `chan` and `user`'s digit count. */
  get(chan: number, user: number): Template {
    const w = userWidthOf(user);
    const key = chan * 17 + w;
    return this.cache[key] ??= makeTemplate(this.build, this.ports[chan]!, w);
  }

  /** Writes REGISTER `seq` for `user` from channel `chan` at `at`; returns its length. */
  write(buf: Uint8Array, at: number, chan: number, seq: number, user: number): number {
    return fill(buf, at, this.get(chan, user), seq, user);
  }
}

/** Writes template `t` with request number `seq` and user `user` at `at`; returns its length. */
function fill(buf: Uint8Array, at: number, t: Template, seq: number, user: number): number {
  buf.set(t.bytes, at);
  digits3(buf, at + t.seqAt[0], at + t.seqAt[1], at + t.seqAt[2], seq, SEQ_DIGITS);
  digits3(buf, at + t.userAt[0], at + t.userAt[1], at + t.userAt[2], user, t.userWidth);
  return t.bytes.length;
}

// ---------------------------------------------------------------------------------------------
// Responses on bytes.

/** Status code of the response starting at `p` (`SIP/2.0 200 ...`), or 0. */
function statusAt(b: Uint8Array, p: number, end: number): number {
  if (end - p < 12 || b[p] !== 83 || b[p + 3] !== 47) return 0;
  const x = b[p + 8]! - 48, y = b[p + 9]! - 48, z = b[p + 10]! - 48;
  if (x < 1 || x > 6 || y < 0 || y > 9 || z < 0 || z > 9) return 0;
  return x * 100 + y * 10 + z;
}

/** Position after `name` + optional blanks + `:` at `p` (name lower case), or -1. */
function headerValue(b: Uint8Array, p: number, end: number, name: string): number {
  const n = name.length;
  if (p + n >= end) return -1;
  for (let i = 0; i < n; i++) if ((b[p + i]! | 32) !== name.charCodeAt(i)) return -1;
  let q = p + n;
  while (q < end && (b[q] === 32 || b[q] === 9)) q++;
  if (b[q] !== 58) return -1;
  q++;
  while (q < end && (b[q] === 32 || b[q] === 9)) q++;
  return q;
}

/** Decimal number at `p` (digits only), or -1 when there is no digit. */
function numberAt(b: Uint8Array, p: number, end: number): number {
  let v = 0, q = p;
  for (; q < end; q++) {
    const d = b[q]! - 48;
    if (d < 0 || d > 9) break;
    v = v * 10 + d;
  }
  return q > p ? v : -1;
}

/**
 * Scans the header of the message at `p`: `out[0]` = request number from Call-ID (or -1),
 * `out[1]` = Content-Length (0 if absent). Returns where the body starts, or -1 when the header
 * does not end before `end` (`out[0]` is still set if the Call-ID was seen).
 */
function scanHead(b: Uint8Array, p: number, end: number, out: Int32Array): number {
  out[0] = -1;
  out[1] = 0;
  let q = p;
  for (;;) {
    while (q < end && b[q] !== 10) q++;
    if (q >= end) return -1;
    q++; // start of the next line
    const raw = b[q]!;
    if (raw === 13) {
      if (q + 1 >= end) return -1;
      if (b[q + 1] === 10) return q + 2;
      continue;
    }
    if (raw === 10) return q + 1;
    const c = raw | 32;
    if (c === 99 /* c */) {
      let v = headerValue(b, q, end, "call-id");
      if (v >= 0) out[0] = numberAt(b, v, end);
      else if ((v = headerValue(b, q, end, "content-length")) >= 0) {
        out[1] = Math.max(0, numberAt(b, v, end));
      }
    } else if (c === 105 /* i */) {
      const v = headerValue(b, q, end, "i");
      if (v >= 0) out[0] = numberAt(b, v, end);
    } else if (c === 108 /* l */) {
      const v = headerValue(b, q, end, "l");
      if (v >= 0) out[1] = Math.max(0, numberAt(b, v, end));
    }
  }
}

/** A byte string to look for, with its Boyer-Moore-Horspool shift table. */
class Needle {
  private readonly bytes: Uint8Array;
  private readonly shift = new Uint8Array(256);

  constructor(text: string) {
    this.bytes = new TextEncoder().encode(text);
    const m = this.bytes.length;
    this.shift.fill(m);
    for (let j = 0; j < m - 1; j++) this.shift[this.bytes[j]!] = m - 1 - j;
  }

  /** Index of the first occurrence in `b[from, end)`, or -1. */
  find(b: Uint8Array, from: number, end: number): number {
    const n = this.bytes, m = n.length, last = n[m - 1]!, shift = this.shift;
    for (let i = from + m - 1; i < end; i += shift[b[i]!]!) {
      if (b[i] !== last) continue;
      let j = m - 2, k = i - 1;
      while (j >= 0 && b[k] === n[j]) {
        j--;
        k--;
      }
      if (j < 0) return k + 1;
    }
    return -1;
  }
}

const CALL_ID = new Needle("\nCall-ID:");
const CONTENT_LENGTH = new Needle("\nContent-Length:");
const HEAD_END = new Needle("\r\n\r\n");

/** Position after the blanks at `p`. */
function skipBlanks(b: Uint8Array, p: number, end: number): number {
  while (p < end && (b[p] === 32 || b[p] === 9)) p++;
  return p;
}

/**
 * Request number of the message in `b[p, end)` (from Call-ID), or -1: the usual spelling is found
 * by a skipping search, anything else (compact `i:`, other case) by the line scan.
 */
function seqIn(b: Uint8Array, p: number, end: number, scratch: Int32Array): number {
  const at = CALL_ID.find(b, p, end);
  if (at >= 0) return numberAt(b, skipBlanks(b, at + 9, end), end);
  scanHead(b, p, end, scratch);
  return scratch[0]!;
}

/**
 * Frames the stream message at `p`: returns where it ends (header, CRLFCRLF, Content-Length bytes
 * of body) or -1 when it is not all in `b[p, end)`; `out[0]` = its request number (or -1).
 */
function frameAt(b: Uint8Array, p: number, end: number, out: Int32Array): number {
  const e = HEAD_END.find(b, p, end);
  if (e < 0) return -1;
  const body = e + 4;
  const id = CALL_ID.find(b, p, body);
  const cl = CONTENT_LENGTH.find(b, p, body);
  if (id >= 0 && cl >= 0) {
    out[0] = numberAt(b, skipBlanks(b, id + 9, body), body);
    out[1] = Math.max(0, numberAt(b, skipBlanks(b, cl + 16, body), body));
  } else scanHead(b, p, body, out);
  return body + out[1]! <= end ? body + out[1]! : -1;
}

// ---------------------------------------------------------------------------------------------
// The load: requests in flight, counters, the loop.

/** A transport under the loop: channels (sockets or connections) carrying requests. */
interface Wire {
  /** Number of channels. */
  readonly chans: number;
  /** Open loop: consecutive requests sent on one channel (log2). */
  readonly runShift: number;
  /** Shortest turn of the loop, ms (0: wake on every arrival). */
  readonly turnMs: number;
  /** Whether channel `c` can carry a request. */
  usable(c: number): boolean;
  /** Queues request `seq` for `user` on channel `c` (sent by `flush`, or when a queue fills). */
  queue(c: number, seq: number, user: number): void;
  /** Sends what is queued. */
  flush(): void;
  /** Waits up to `ms` for input and hands every response to the load's `answer`; false if none. */
  pump(ms: number): boolean;
  /** Closes every socket. */
  close(): void;
}

/** Pending state per ring slot. */
const FREE = 0, PENDING = 1, MEASURED = 2;

/** One run: its schedule, the requests in flight, the counters. */
class Load {
  readonly closed: boolean;
  readonly start: number;
  readonly measureStart: number;
  readonly sendEnd: number;
  /** Retransmission times after the first send, ms (UDP with `retransmit`). */
  readonly retxAt: number[] = [];
  /** Per retransmission: the next request number to look at. */
  readonly retxCursor: number[] = [];

  mask = RING - 1;
  t0 = new Float64Array(RING);
  users = new Float64Array(RING);
  chanOf = new Uint16Array(RING);
  state = new Uint8Array(RING);
  /** Oldest request number that may still be in flight. */
  lo = 0;
  /** Next request number. */
  seq = 0;
  inFlight = 0;
  userNext = 0;
  stopped = false;
  windowEnd = 0;
  lastDone = 0;

  sent = 0;
  ok = 0;
  rejected503 = 0;
  failed = 0;
  timeouts = 0;
  connectErrors = 0;
  retransmits = 0;
  skipped = 0;
  readonly statusCount = new Float64Array(700);
  readonly latency = new Histogram();
  readonly latency503 = new Histogram();
  readonly loopLag = new Histogram();

  wire!: Wire;

  constructor(readonly spec: RunSpec, start: number) {
    this.closed = spec.loop === "closed";
    this.start = start;
    this.measureStart = start + spec.warmupMs;
    this.sendEnd = this.measureStart + spec.durationMs;
    if (spec.mode === "udp" && spec.retransmit) {
      let at = T1, interval = T1;
      while (at < spec.timeoutMs) {
        this.retxAt.push(at);
        this.retxCursor.push(0);
        interval = Math.min(interval * 2, T2);
        at += interval;
      }
    }
  }

  private stop(t: number): void {
    this.stopped = true;
    this.windowEnd = Math.min(t, this.sendEnd);
  }

  /** Doubles the ring, keeping every request from `lo` on in its new slot. */
  private grow(): void {
    const size = (this.mask + 1) * 2, mask = size - 1;
    const t0 = new Float64Array(size), users = new Float64Array(size);
    const chanOf = new Uint16Array(size), state = new Uint8Array(size);
    for (let s = this.lo; s < this.seq; s++) {
      const i = s & this.mask, j = s & mask;
      t0[j] = this.t0[i]!;
      users[j] = this.users[i]!;
      chanOf[j] = this.chanOf[i]!;
      state[j] = this.state[i]!;
    }
    this.mask = mask;
    this.t0 = t0;
    this.users = users;
    this.chanOf = chanOf;
    this.state = state;
  }

  /** Sends a new request on channel `c` (or another usable one); false once sending is over. */
  issue(t: number, c: number): boolean {
    if (this.stopped) return false;
    const spec = this.spec;
    if (t >= this.sendEnd || this.seq >= spec.maxRequests) {
      this.stop(t);
      return false;
    }
    const w = this.wire;
    if (!w.usable(c)) {
      let k = 1;
      while (k < w.chans && !w.usable((c + k) % w.chans)) k++;
      if (k === w.chans) {
        // No connection left: the request is lost to the broken connections.
        this.seq++;
        if (t >= this.measureStart) {
          this.sent++;
          this.connectErrors++;
        }
        return false;
      }
      c = (c + k) % w.chans;
    }
    if (this.seq - this.lo > this.mask) this.grow();
    const s = this.seq++;
    const user = spec.userBase + this.userNext;
    if (++this.userNext >= Math.max(1, spec.userCount)) this.userNext = 0;
    const i = s & this.mask;
    this.t0[i] = t;
    this.users[i] = user;
    this.chanOf[i] = c;
    const measured = t >= this.measureStart;
    this.state[i] = measured ? MEASURED : PENDING;
    if (measured) this.sent++;
    this.inFlight++;
    w.queue(c, s, user);
    return true;
  }

  /**
   * Open loop: `n` due requests are not sent (the in-flight cap), counted while measuring; their
   * numbers are used up, so the schedule goes on (skipped requests are not sent late).
   */
  private skip(n: number, t: number): void {
    // The ring must cover the numbers skipped too, or a later grow() would copy older slots to them.
    while (this.seq + n - this.lo > this.mask) this.grow();
    if (t >= this.measureStart) this.skipped += n;
    this.seq += n;
  }

  /** A response to request `s` arrived at `at` (read at `t`). */
  answer(s: number, status: number, at: number, t: number): void {
    if (status < 200 || s < this.lo || s >= this.seq) return;
    const i = s & this.mask;
    const st = this.state[i]!;
    if (st === FREE) return;
    this.state[i] = FREE;
    this.inFlight--;
    if (st === MEASURED) {
      this.statusCount[status]!++;
      const us = (at - this.t0[i]!) * 1000;
      if (status < 300) {
        this.ok++;
        this.latency.record(us);
      } else if (status === 503) {
        this.rejected503++;
        this.latency503.record(us);
      } else this.failed++;
      this.lastDone = at;
    }
    if (this.closed) this.issue(t, this.chanOf[i]!);
  }

  /** Timeouts at the tail, then Timer E retransmissions. */
  private sweep(t: number): void {
    const limit = this.spec.timeoutMs;
    while (this.lo < this.seq) {
      const i = this.lo & this.mask;
      const st = this.state[i]!;
      if (st !== FREE) {
        if (this.t0[i]! + limit > t) break;
        this.state[i] = FREE;
        this.inFlight--;
        if (st === MEASURED) {
          this.timeouts++;
          this.lastDone = t;
        }
        this.lo++;
        if (this.closed) this.issue(t, this.chanOf[i]!);
        continue;
      }
      this.lo++;
    }
    for (let k = 0; k < this.retxAt.length; k++) {
      const after = this.retxAt[k]!;
      let s = Math.max(this.retxCursor[k]!, this.lo);
      for (; s < this.seq; s++) {
        const i = s & this.mask;
        const st = this.state[i]!;
        if (st === FREE) continue;
        if (this.t0[i]! + after > t) break;
        this.wire.queue(this.chanOf[i]!, s, this.users[i]!);
        if (st === MEASURED) this.retransmits++;
      }
      this.retxCursor[k] = s;
    }
  }

  /** Channel `c` broke: its requests in flight are connection errors. */
  failChan(c: number, t: number): void {
    for (let s = this.lo; s < this.seq; s++) {
      const i = s & this.mask;
      const st = this.state[i]!;
      if (st === FREE || this.chanOf[i] !== c) continue;
      this.state[i] = FREE;
      this.inFlight--;
      if (st === MEASURED) {
        this.connectErrors++;
        this.lastDone = t;
      }
      if (this.closed) this.issue(t, c);
    }
  }

  /** Runs the whole load: sending, then draining until answered or timed out. */
  loop(): void {
    const spec = this.spec, w = this.wire;
    const rate = Math.max(1, spec.rate);
    const burst = Math.floor(Math.max(50, rate / 10));
    if (this.closed) {
      const k = Math.max(1, spec.outstanding);
      for (let i = 0; i < k; i++) if (!this.issue(now(), i % w.chans)) break;
    }
    let drainEnd = Infinity;
    let prev = now(), lagFrom = prev, lagMax = 0;
    for (;;) {
      const t = now();
      const gap = t - prev;
      prev = t;
      if (gap > lagMax) lagMax = gap;
      if (t - lagFrom >= 10) {
        this.loopLag.record(Math.max(0, lagMax - POLL_MS - w.turnMs) * 1000);
        lagMax = 0;
        lagFrom = t;
      }
      if (!this.stopped && (t >= this.sendEnd || this.seq >= spec.maxRequests)) this.stop(t);
      if (!this.stopped && !this.closed) {
        const due = Math.min(Math.floor(((t - this.start) * rate) / 1000) - this.seq, burst);
        for (let j = 0; j < due; j++) {
          if (this.inFlight >= spec.maxOutstanding) {
            this.skip(due - j, t);
            break;
          }
          if (!this.issue(t, (this.seq >>> w.runShift) % w.chans)) break;
        }
      }
      this.sweep(t);
      w.flush();
      if (this.stopped) {
        if (drainEnd === Infinity) drainEnd = now() + spec.timeoutMs + 200;
        if (this.inFlight === 0 || t >= drainEnd) break;
      }
      if (w.turnMs > 0) {
        const rest = w.turnMs - (now() - t);
        if (rest > 0.02) sleepMs(rest);
        if (!w.pump(0)) w.pump(POLL_MS);
      } else w.pump(POLL_MS);
    }
    const t = now();
    for (let s = this.lo; s < this.seq; s++) {
      if (this.state[s & this.mask] === MEASURED) {
        this.timeouts++;
        this.lastDone = t;
      }
    }
    this.inFlight = 0;
  }

  result(wallMs: number, c0: { user: number; system: number }): RunResult {
    const c1 = process.cpuUsage();
    const statuses: Record<string, number> = {};
    this.statusCount.forEach((n, code) => {
      if (n > 0) statuses[String(code)] = n;
    });
    return {
      sent: this.sent,
      ok: this.ok,
      rejected503: this.rejected503,
      failed: this.failed,
      timeouts: this.timeouts,
      connectErrors: this.connectErrors,
      retransmits: this.retransmits,
      skipped: this.skipped,
      measuredMs: Math.max(0, (this.windowEnd || this.lastDone) - this.measureStart),
      latency: this.latency.toJSON(),
      latency503: this.latency503.toJSON(),
      statuses,
      cpuUserMs: (c1.user - c0.user) / 1000,
      cpuSystemMs: (c1.system - c0.system) / 1000,
      wallMs,
      loopLag: this.loopLag.toJSON(),
    };
  }
}

// ---------------------------------------------------------------------------------------------
// UDP: connected sockets; a socket's requests leave as one GSO send, answers come by recvmmsg.

/**
 * `count` mmsghdrs for `recvmmsg`, each with one iovec of `slot` bytes in `data` and `CTRL` control
 * bytes in `ctrl` (no address: the sockets are connected).
 */
function recvHeaders(data: Uint8Array, ctrl: Uint8Array, count: number, slot: number) {
  const hdrs = new Uint8Array(count * MMSG);
  const iovs = new Uint8Array(count * 16);
  const hv = new DataView(hdrs.buffer), iv = new DataView(iovs.buffer);
  const base = addressOf(data), iovBase = addressOf(iovs), ctrlBase = addressOf(ctrl);
  for (let i = 0; i < count; i++) {
    iv.setBigUint64(i * 16, base + BigInt(i * slot), true); // iov_base
    iv.setBigUint64(i * 16 + 8, BigInt(slot), true); // iov_len
    const h = i * MMSG;
    hv.setBigUint64(h + 16, iovBase + BigInt(i * 16), true); // msg_iov
    hv.setBigUint64(h + 24, 1n, true); // msg_iovlen
    hv.setBigUint64(h + 32, ctrlBase + BigInt(i * CTRL), true); // msg_control
    hv.setBigUint64(h + 40, BigInt(CTRL), true); // msg_controllen
  }
  return { hdrs, iovs, words: new Uint32Array(hdrs.buffer) };
}

class UdpWire implements Wire {
  readonly runShift = UDP_RUN_SHIFT;
  readonly turnMs = UDP_TURN_MS;
  readonly fds: number[] = [];
  readonly ports: number[] = [];
  readonly pfd: Uint8Array;
  readonly revents: Int16Array;
  readonly nfds: bigint;
  templates!: Templates;
  /**
   * Send runs: per socket, equal-length requests back to back in `GSO_RUN` bytes, sent as one
   * datagram with `UDP_SEGMENT` = their length, which the kernel splits into one datagram each.
   */
  readonly out: Uint8Array;
  readonly outAt: Deno.PointerValue[] = [];
  readonly outCount: Int32Array;
  readonly outSize: Int32Array;
  /** `UDP_SEGMENT` set on each socket (0: none yet). */
  readonly gsoSize: Int32Array;
  /** False once the kernel refused GSO: requests then go one `send` each. */
  gso = true;
  readonly recvData = new Uint8Array(BATCH * RECV_SLOT);
  /** Per datagram a cmsghdr (words 2-3: level, type) and the arrival timespec (words 4-7). */
  readonly recvCtrl = new Uint32Array(BATCH * CTRL / 4);
  readonly recv: ReturnType<typeof recvHeaders>;
  readonly recvHdrs: Deno.PointerValue;
  readonly scratch = new Int32Array(2);
  load!: Load;

  constructor(server: Uint8Array, local: Uint8Array, readonly chans: number) {
    const l = lib();
    try {
      for (let k = 0; k < chans; k++) {
        const fd = l.socket(AF_INET, SOCK_DGRAM | SOCK_FLAGS, 0);
        if (fd < 0) throw new Error(`loadgen_ffi: socket failed: errno ${errno()}`);
        this.fds.push(fd);
        setOpt(fd, SOL_SOCKET, SO_RCVBUF, 4 << 20);
        setOpt(fd, SOL_SOCKET, SO_SNDBUF, 1 << 20);
        setOpt(fd, SOL_SOCKET, SO_TIMESTAMPNS, 1);
        if (l.bind(fd, local, 16) < 0 || l.connect(fd, server, 16) < 0) {
          throw new Error(`loadgen_ffi: UDP bind/connect failed: errno ${errno()}`);
        }
        this.ports.push(localPortOf(fd));
      }
    } catch (e) {
      this.close();
      throw e;
    }
    this.nfds = BigInt(chans);
    this.pfd = new Uint8Array(chans * 8);
    const fdWords = new Int32Array(this.pfd.buffer);
    this.revents = new Int16Array(this.pfd.buffer);
    for (let k = 0; k < chans; k++) {
      fdWords[k * 2] = this.fds[k]!;
      this.revents[k * 4 + 2] = POLLIN; // events
    }
    this.out = new Uint8Array(chans * GSO_RUN);
    const at = Deno.UnsafePointer.of(this.out)!;
    for (let k = 0; k < chans; k++) this.outAt.push(Deno.UnsafePointer.offset(at, k * GSO_RUN));
    this.outCount = new Int32Array(chans);
    this.outSize = new Int32Array(chans);
    this.gsoSize = new Int32Array(chans);
    this.recv = recvHeaders(
      this.recvData,
      new Uint8Array(this.recvCtrl.buffer),
      BATCH,
      RECV_SLOT,
    );
    this.recvHdrs = Deno.UnsafePointer.of(this.recv.hdrs);
  }

  usable(_c: number): boolean {
    return true;
  }

  queue(c: number, seq: number, user: number): void {
    const t = this.templates.get(c, user);
    const len = t.bytes.length;
    let n = this.outCount[c]!;
    if (n > 0 && (len !== this.outSize[c] || (n + 1) * len > GSO_RUN || n === GSO_SEGMENTS)) {
      this.flushOne(c);
      n = 0;
    }
    fill(this.out, c * GSO_RUN + n * len, t, seq, user);
    this.outSize[c] = len;
    this.outCount[c] = n + 1;
  }

  private flushOne(c: number): void {
    const n = this.outCount[c]!, len = this.outSize[c]!, fd = this.fds[c]!;
    this.outCount[c] = 0;
    const l = sym!;
    // The option always equals the length of what is sent (even alone: a longer datagram would be
    // split); the kernel refusing it means no GSO from now on.
    if (this.gso && this.gsoSize[c] !== len) {
      if (setOpt(fd, SOL_UDP, UDP_SEGMENT, len)) this.gsoSize[c] = len;
      else this.noGso();
    }
    if (this.gso && n > 1) {
      let r = l.send_at(fd, this.outAt[c]!, BigInt(n * len), DONTWAIT);
      if (r < 0 && errno() === EINTR) r = l.send_at(fd, this.outAt[c]!, BigInt(n * len), DONTWAIT);
      if (r >= 0) return;
      const e = errno();
      // EAGAIN, ECONNREFUSED (an earlier ICMP error) and the like: lost, as datagrams can be.
      if (e !== EIO && e !== EINVAL && e !== ENOPROTOOPT && e !== EOPNOTSUPP) return;
      this.noGso(); // the kernel or the route cannot segment
    }
    for (let i = 0; i < n; i++) {
      const at = i === 0 ? this.outAt[c]! : Deno.UnsafePointer.offset(this.outAt[c]!, i * len);
      l.send_at(fd, at, BigInt(len), DONTWAIT);
    }
  }

  /** One `send` per request from now on, with `UDP_SEGMENT` cleared everywhere. */
  private noGso(): void {
    this.gso = false;
    for (let c = 0; c < this.chans; c++) {
      if (this.gsoSize[c] !== 0) setOpt(this.fds[c]!, SOL_UDP, UDP_SEGMENT, 0);
      this.gsoSize[c] = 0;
    }
  }

  flush(): void {
    for (let c = 0; c < this.chans; c++) if (this.outCount[c]! > 0) this.flushOne(c);
  }

  pump(ms: number): boolean {
    const l = sym!;
    if (l.poll(this.pfd, this.nfds, ms) <= 0) return false;
    const data = this.recvData, words = this.recv.words, ctrl = this.recvCtrl;
    const scratch = this.scratch, load = this.load;
    for (let c = 0; c < this.chans; c++) {
      if (this.revents[c * 4 + 3] === 0) continue;
      for (let round = 0; round < 16; round++) {
        const got = l.recvmmsg(this.fds[c]!, this.recvHdrs, BATCH, DONTWAIT, null);
        if (got <= 0) break; // empty, or a reported error (ECONNREFUSED) consumed
        const t = now();
        const real = realMs() - t; // real-time clock minus ours
        for (let i = 0; i < got; i++) {
          const h = i * 16, k = i * 8;
          const end = i * RECV_SLOT + Math.min(words[h + 14]!, RECV_SLOT); // msg_len
          const at = arrival(ctrl, k, words[h + 10]!, real, t);
          words[h + 10] = CTRL; // msg_controllen, for the next call
          const p = i * RECV_SLOT;
          const status = statusAt(data, p, end);
          if (status === 0) continue;
          const s = seqIn(data, p, end, scratch);
          if (s >= 0) load.answer(s, status, at, t);
        }
        if (got < BATCH) break;
      }
    }
    return true;
  }

  close(): void {
    for (const fd of this.fds) sym!.close(fd);
    this.fds.length = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// TCP persistent: nonblocking connections, one send per connection per turn.

class TcpWire implements Wire {
  readonly runShift = 0;
  readonly turnMs = TCP_TURN_MS;
  readonly fds: number[] = [];
  readonly ports: number[] = [];
  readonly open: boolean[] = [];
  readonly pfd: Uint8Array;
  readonly fdWords: Int32Array;
  readonly ev: Int16Array;
  templates!: Templates;
  readonly out: Uint8Array[] = [];
  readonly outLen: Int32Array;
  /** Receive buffer: leftovers are put just before `REST_MAX`, new bytes land from there on. */
  readonly rb = new Uint8Array(REST_MAX + TCP_CHUNK);
  /** One msghdr for `recvmsg`: an iovec at `rb + REST_MAX` and room for the arrival timestamp. */
  readonly msg = new Uint32Array(14);
  readonly msgAt: Deno.PointerValue;
  readonly iov = new BigUint64Array(2);
  readonly ctrl = new Uint32Array(CTRL / 4);
  readonly rest: Uint8Array[] = [];
  readonly restLen: Int32Array;
  readonly head = new Int32Array(2);
  load!: Load;

  readonly nfds: bigint;

  private constructor(readonly chans: number) {
    this.nfds = BigInt(chans);
    this.pfd = new Uint8Array(chans * 8);
    this.fdWords = new Int32Array(this.pfd.buffer);
    this.ev = new Int16Array(this.pfd.buffer);
    this.outLen = new Int32Array(chans);
    this.restLen = new Int32Array(chans);
    this.iov[0] = addressOf(this.rb, REST_MAX); // iov_base
    this.iov[1] = BigInt(TCP_CHUNK); // iov_len
    const hdr = new BigUint64Array(this.msg.buffer);
    hdr[2] = addressOf(new Uint8Array(this.iov.buffer)); // msg_iov
    hdr[3] = 1n; // msg_iovlen
    hdr[4] = addressOf(new Uint8Array(this.ctrl.buffer)); // msg_control
    this.msgAt = Deno.UnsafePointer.of(this.msg);
  }

  /** Opens `count` connections to `server` (source addresses round robin) within `limitMs`. */
  static connect(server: Uint8Array, sources: string[], count: number, limitMs: number) {
    const w = new TcpWire(count);
    const l = lib();
    try {
      for (let c = 0; c < count; c++) {
        const fd = l.socket(AF_INET, SOCK_STREAM | SOCK_FLAGS, 0);
        if (fd < 0) throw new Error(`loadgen_ffi: socket failed: errno ${errno()}`);
        w.fds.push(fd);
        w.open.push(false);
        setOpt(fd, IPPROTO_TCP, TCP_NODELAY, 1);
        setOpt(fd, SOL_SOCKET, SO_TIMESTAMPNS, 1);
        const src = sources.length ? sources[c % sources.length]! : null;
        if (src !== null && l.bind(fd, sockaddrIn(src, 0), 16) < 0) {
          throw new Error(`loadgen_ffi: bind ${src} failed: errno ${errno()}`);
        }
        if (l.connect(fd, server, 16) < 0 && errno() !== EINPROGRESS) {
          throw new Error(`loadgen_ffi: connect failed: errno ${errno()}`);
        }
        w.fdWords[c * 2] = fd;
        w.ev[c * 4 + 2] = POLLOUT;
        w.out.push(new Uint8Array(64 * 1024));
        w.rest.push(new Uint8Array(REST_MAX));
      }
      // Wait until every connection is writable (established) or failed.
      const deadline = now() + limitMs;
      let waiting = count;
      while (waiting > 0) {
        const left = Math.ceil(deadline - now());
        if (left <= 0) throw new Error("loadgen_ffi: connect timed out");
        if (l.poll(w.pfd, w.nfds, Math.min(left, 100)) <= 0) continue;
        for (let c = 0; c < count; c++) {
          if (w.open[c] || w.ev[c * 4 + 3] === 0) continue;
          const err = new Int32Array(1), len = new Uint32Array([4]);
          l.getsockopt(
            w.fds[c]!,
            SOL_SOCKET,
            SO_ERROR,
            new Uint8Array(err.buffer),
            new Uint8Array(len.buffer),
          );
          if (err[0] !== 0) throw new Error(`loadgen_ffi: connect failed: errno ${err[0]}`);
          w.open[c] = true;
          w.ev[c * 4 + 2] = POLLIN;
          waiting--;
        }
      }
      for (let c = 0; c < count; c++) w.ports[c] = localPortOf(w.fds[c]!);
    } catch (e) {
      w.close();
      throw e;
    }
    return w;
  }

  usable(c: number): boolean {
    return this.open[c]!;
  }

  queue(c: number, seq: number, user: number): void {
    let at = this.outLen[c]!;
    let buf = this.out[c]!;
    if (at + this.templates.maxLength > buf.length) {
      const bigger = new Uint8Array(buf.length * 2);
      bigger.set(buf.subarray(0, at));
      this.out[c] = buf = bigger;
    }
    at += this.templates.write(buf, at, c, seq, user);
    this.outLen[c] = at;
    if (at >= TCP_OUT_FLUSH) this.sendOne(c);
  }

  private sendOne(c: number): void {
    const n = this.outLen[c]!;
    if (n === 0 || !this.open[c]) return;
    const buf = this.out[c]!;
    const r = sym!.send(this.fds[c]!, buf, BigInt(n), DONTWAIT);
    if (r === n) {
      this.outLen[c] = 0;
      this.ev[c * 4 + 2] = POLLIN;
      return;
    }
    if (r > 0) {
      buf.copyWithin(0, r, n);
      this.outLen[c] = n - r;
    } else if (errno() !== EAGAIN && errno() !== EINTR) {
      this.fail(c);
      return;
    }
    this.ev[c * 4 + 2] = POLLIN | POLLOUT; // the rest goes when the kernel takes more
  }

  flush(): void {
    for (let c = 0; c < this.chans; c++) if (this.outLen[c]! > 0) this.sendOne(c);
  }

  private fail(c: number): void {
    if (!this.open[c]) return;
    this.open[c] = false;
    sym!.close(this.fds[c]!);
    this.fdWords[c * 2] = -1; // poll skips it
    this.outLen[c] = 0;
    this.restLen[c] = 0;
    this.load.failChan(c, now());
  }

  pump(ms: number): boolean {
    const l = sym!;
    if (l.poll(this.pfd, this.nfds, ms) <= 0) return false;
    for (let c = 0; c < this.chans; c++) {
      const rev = this.ev[c * 4 + 3]!;
      if (rev === 0 || !this.open[c]) continue;
      if (rev & POLLOUT) this.sendOne(c);
      if (rev & ~POLLOUT) this.read(c);
    }
    return true;
  }

  private read(c: number): void {
    const l = sym!, rb = this.rb, head = this.head, load = this.load, msg = this.msg;
    for (let round = 0; round < 4 && this.open[c]; round++) {
      msg[10] = CTRL; // msg_controllen
      msg[11] = 0;
      const r = l.recvmsg(this.fds[c]!, this.msgAt, DONTWAIT);
      if (r <= 0) {
        if (r === 0 || (errno() !== EAGAIN && errno() !== EINTR)) this.fail(c);
        return;
      }
      const t = now();
      // The kernel stamps the last segment read: messages of earlier segments of this read get it
      // too, so a latency is overstated by at most the spread of one read's segments.
      const at = arrival(this.ctrl, 0, msg[10]!, realMs() - t, t);
      const kept = this.restLen[c]!;
      let p = REST_MAX - kept;
      if (kept > 0) rb.set(this.rest[c]!.subarray(0, kept), p);
      const end = REST_MAX + r;
      while (p < end) {
        while (p < end && (rb[p] === 13 || rb[p] === 10)) p++; // CRLF keep-alives
        if (p >= end) break;
        const stop = frameAt(rb, p, end, head);
        if (stop < 0) break;
        const status = statusAt(rb, p, stop);
        if (status !== 0 && head[0]! >= 0) load.answer(head[0]!, status, at, t);
        p = stop;
      }
      const left = end - p;
      if (left > REST_MAX) {
        this.fail(c); // a message larger than we keep: not a SIP response of ours
        return;
      }
      if (left > 0) this.rest[c]!.set(rb.subarray(p, end));
      this.restLen[c] = left;
      if (r < TCP_CHUNK) return;
    }
  }

  close(): void {
    for (let c = 0; c < this.fds.length; c++) {
      if (this.fdWords[c * 2] !== -1) sym!.close(this.fds[c]!);
      this.fdWords[c * 2] = -1;
      this.open[c] = false;
    }
  }
}

/**
 * Runs one REGISTER load in mode `udp` or `tcp_persistent` (see {@linkcode ffiEngineFits}) and
 * returns this worker's counters; null when the server is not IPv4 (use the `node:` engine).
 * Blocks the event loop for the whole run.
 */
export async function runFfi(worker: number, spec: RunSpec): Promise<RunResult | null> {
  const c0 = process.cpuUsage();
  const { address, family } = await literalFor(spec.host);
  if (family !== AF_INET) return null;
  try {
    lib();
  } catch {
    return null; // no glibc here (musl, say): the node: engine runs it
  }
  const start = now();
  const load = new Load(spec, start);
  const server = sockaddrIn(address, spec.port);
  const udp = spec.mode === "udp";
  const wire = udp
    ? new UdpWire(
      server,
      sockaddrIn(address.startsWith("127.") ? "127.0.0.1" : "0.0.0.0", 0),
      UDP_SOCKETS,
    )
    : TcpWire.connect(
      server,
      spec.sourceAddrs,
      Math.max(1, spec.connections),
      Math.max(2000, spec.timeoutMs),
    );
  try {
    const build = registerBuilder({
      serverHost: spec.host,
      serverPort: spec.port,
      localHost: "127.0.0.1",
      localPort: wire.ports[0]!,
      transport: udp ? "UDP" : "TCP",
      worker,
    });
    const templates = new Templates(build, wire.ports);
    wire.templates = templates;
    wire.load = load;
    load.wire = wire;
    load.loop();
  } finally {
    wire.close();
  }
  return load.result(now() - start, { user: c0.user, system: c0.system });
}
