/**
 * SIP over TCP (RFC 3261 §18) on the kernel's sockets through libc by FFI, for flows that cost little
 * user memory: `node:net` under Deno costs ~4.4 KB of RSS per idle connection (ARCHITECTURE.md,
 * platform facts); here an idle connection is one small object and a `Map` entry, and no read buffer
 * (every connection reads into one shared 64 KiB buffer; only the bytes read are copied out).
 *
 * The listener is a nonblocking socket with `SO_REUSEPORT` (and `SO_REUSEADDR`), so several worker
 * processes share the port and the kernel spreads connections over them. One epoll instance per
 * listener holds the listener, an eventfd (to wake the wait) and every accepted connection,
 * level-triggered. The loop waits with `epoll_wait` as a `nonblocking` FFI call on a thread of Deno's
 * blocking pool (the event loop never waits on it), then handles the events synchronously on the main
 * thread: `accept4` until `EAGAIN`, `recv` into the shared buffer, `send` of queued bytes; a few more
 * batches are drained with a zero-timeout `epoll_wait` before the next threaded wait. Each event
 * carries the descriptor and a generation number, so an event for a descriptor closed (and its
 * number reused) meanwhile is ignored.
 *
 * Writes made in one turn of the event loop are gathered per connection and handed to the kernel in
 * one `send` when the turn's synchronous work is done (a microtask): a read that carried 50 requests
 * answered at once (e.g. 50 503s under overload) costs one system call, not 50. What the kernel does
 * not take (`EAGAIN`, partial writes) is queued on the connection (the queue exists only while
 * non-empty) and `EPOLLOUT` is armed only while it does. As
 * with `node:net`, bytes given to `write` are referenced, not copied, until sent: do not modify them.
 * Reading starts when a `data` listener is set (like a `node:net` socket's flowing mode), so bytes
 * that arrive before the stage attaches its listener are not lost. `end()` gives up on a peer that
 * does not take the queued bytes within `endTimeoutMs` (30 s by default). `close` and `error` listeners run
 * in a microtask after the connection is closed, never inside the call that closed it.
 *
 * Needs `--allow-ffi` (or `--allow-all`); Linux x86_64/aarch64 only (struct layouts, constants,
 * `libc.so.6`).
 *
 * @module
 */
import { type OpenLibc, openLibc } from "./_libc.ts";
import { AF_INET, AF_INET6, formatIPv6, literalFor } from "./_sockaddr.ts";
import type { FlowSocket, TcpTransport } from "./tcp.ts";

export type { FlowSocket, TcpTransport } from "./tcp.ts";

const SOCK_STREAM = 1;
const SOCK_NONBLOCK = 0x800;
const SOCK_CLOEXEC = 0x80000;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const SO_ERROR = 4;
const SO_KEEPALIVE = 9;
const SO_REUSEPORT = 15;
const IPPROTO_TCP = 6;
const TCP_NODELAY = 1;
const TCP_KEEPIDLE = 4;
const SHUT_WR = 1;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const EPOLL_CLOEXEC = 0x80000;
const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_DEL = 2;
const EPOLL_CTL_MOD = 3;
const EPOLLIN = 0x001;
const EPOLLOUT = 0x004;
const EPOLLERR = 0x008;
const EPOLLHUP = 0x010;
const EPOLLRDHUP = 0x2000;
const EFD_NONBLOCK = 0x800;
const EFD_CLOEXEC = 0x80000;
const EINTR = 4;
const EAGAIN = 11;
const EMFILE = 24;
const ENFILE = 23;
const ENOBUFS = 105;
const ENOMEM = 12;

/** Backlog asked for in `listen` (the kernel caps it at net.core.somaxconn). */
const BACKLOG = 4096;
/** The one buffer every connection reads into. */
const READ_SIZE = 65536;
const READ_SIZE_N = BigInt(READ_SIZE);
/** Reads of one connection per readiness event (then the others get their turn). */
const READS_PER_EVENT = 4;
/** A turn's writes to one flow up to this size are joined in a shared buffer for their `send`. */
const JOIN_SIZE = 256 * 1024;
/** Events per `epoll_wait`. */
const MAX_EVENTS = 256;
/** Zero-timeout `epoll_wait` batches handled after a threaded wait before yielding, at most. */
const DRAIN_BATCHES = 4;
/**
 * Main-thread time one turn of the loop may take before it yields to the event loop, ms: the stages
 * drain their queues in `setImmediate` callbacks and measure queue delay, so events must not be
 * handled for long without a yield.
 */
const TURN_BUDGET_MS = 2;
/** `write` returns false once this many bytes are queued (as `node:net`'s high-water mark). */
const HIGH_WATER = 16384;
/** How long the listener rests after `EMFILE`/`ENFILE` before accepting again, ms. */
const ACCEPT_REST_MS = 100;
/** Default of {@link TcpFfiOptions.endTimeoutMs}. */
const END_TIMEOUT_MS = 30_000;
/** Descriptors left free for the runtime (Deno panics in places when it cannot open one). */
const FD_RESERVE = 64;
const RLIMIT_NOFILE = 7;
/** Address strings kept for reuse (many flows from one address share one string). */
const ADDRESS_CACHE = 4096;
/** `struct epoll_event` is packed on x86_64 (12 bytes), naturally aligned elsewhere (16). */
const EVENT_SIZE = Deno.build.arch === "x86_64" ? 12 : 16;
const EVENT_DATA = Deno.build.arch === "x86_64" ? 4 : 8;

const SYMBOLS = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  accept4: { parameters: ["i32", "buffer", "buffer", "i32"], result: "i32" },
  inet_pton: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  getrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  epoll_wait: { parameters: ["i32", "pointer", "i32", "i32"], result: "i32" },
  epoll_wait_thread: {
    name: "epoll_wait",
    parameters: ["i32", "pointer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

type Libc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let libc: OpenLibc<typeof SYMBOLS> | undefined;

/** libc with this module's symbols, opened once per isolate. */
function libcOnce(): OpenLibc<typeof SYMBOLS> {
  return libc ??= openLibc(SYMBOLS, "tcp_ffi");
}

const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  4: "EINTR",
  9: "EBADF",
  11: "EAGAIN",
  12: "ENOMEM",
  13: "EACCES",
  22: "EINVAL",
  23: "ENFILE",
  24: "EMFILE",
  28: "ENOSPC",
  32: "EPIPE",
  97: "EAFNOSUPPORT",
  98: "EADDRINUSE",
  99: "EADDRNOTAVAIL",
  103: "ECONNABORTED",
  104: "ECONNRESET",
  105: "ENOBUFS",
  110: "ETIMEDOUT",
  113: "EHOSTUNREACH",
};

/** An Error named after the failed call, with `code` (`ECONNRESET`, …) and `errno`. */
function sysError(call: string, errno: number, where = ""): Error & { code: string } {
  const code = ERRNO_NAMES[errno] ?? `errno ${errno}`;
  const error = new Error(`tcp_ffi: ${call}${where ? ` ${where}` : ""} failed: ${code}`) as
    & Error
    & { code: string; errno: number };
  error.code = code;
  error.errno = errno;
  return error;
}

/** Address strings shared by the connections that come from (or arrive at) the same address. */
const addressCache = new Map<string, string>();

/**
 * Decodes a `sockaddr_in`/`sockaddr_in6` into an address (a cached string) and a port. An IPv6
 * link-local address gets its zone (`%index`).
 */
function decodeSockaddr(sa: Uint8Array): { address: string; port: number } {
  const port = (sa[2]! << 8) | sa[3]!;
  let key: string;
  let text: () => string;
  if (sa[0] === AF_INET6) {
    const scope = (sa[24]! | (sa[25]! << 8) | (sa[26]! << 16) | (sa[27]! << 24)) >>> 0;
    key = String.fromCharCode(...sa.subarray(8, 24)) + (scope ? `%${scope}` : "");
    text = () => formatIPv6(sa, 8) + (scope ? `%${scope}` : "");
  } else {
    key = `${sa[4]}.${sa[5]}.${sa[6]}.${sa[7]}`;
    text = () => key;
  }
  let address = addressCache.get(key);
  if (address === undefined) {
    address = text();
    if (addressCache.size >= ADDRESS_CACHE) addressCache.clear();
    addressCache.set(key, address);
  }
  return { address, port };
}

const encoder = new TextEncoder();

/** Most bytes handed to one `send` (its `ssize_t` result is read as an `i32`). */
const MAX_SEND = 1 << 30;

/** The length to pass to `send` for `bytes`: all of it, up to {@link MAX_SEND}. */
function sendLength(bytes: Uint8Array): bigint {
  return BigInt(bytes.length < MAX_SEND ? bytes.length : MAX_SEND);
}

/** A `sockaddr_in`/`sockaddr_in6` for an IP literal and port, or null if not a literal. */
function encodeSockaddr(
  lib: Libc,
  family: number,
  address: string,
  port: number,
): Uint8Array | null {
  const sa = new Uint8Array(family === AF_INET ? 16 : 28);
  const at = family === AF_INET ? sa.subarray(4, 8) : sa.subarray(8, 24);
  if (lib.inet_pton(family, encoder.encode(`${address}\0`), at) !== 1) return null;
  sa[0] = family; // sa_family, little-endian u16
  sa[2] = port >> 8; // port, network order
  sa[3] = port & 0xff;
  return sa;
}

/** Bytes a connection could not hand to the kernel yet; exists only while non-empty. */
interface SendQueue {
  chunks: Uint8Array[];
  /** Bytes of `chunks[0]` already sent. */
  offset: number;
  bytes: number;
  /** When a pending `end` gives up on a peer that does not read (ms since epoch); 0: not ending. */
  endBy: number;
}

// Connection state bits.
const PAUSED = 1;
const ENDING = 2;
const CLOSED = 4;
const EOF = 8;

type DataListener = (chunk: Uint8Array) => void;
type CloseListener = () => void;
type ErrorListener = (error: Error) => void;

/** Runs a listener; an exception is reported as an uncaught one would be, never thrown on. */
function safely(fn: () => void): void {
  try {
    fn();
  } catch (error) {
    reportError(error);
  }
}

/**
 * One accepted TCP connection: the {@link FlowSocket} of the FFI transport. Plain fields, at most
 * one listener per event (a later `on` replaces an earlier one), no buffers while idle.
 */
class FfiSocket implements FlowSocket {
  /** State bits: PAUSED, ENDING, CLOSED, EOF. */
  private st = 0;
  /** The epoll mask currently registered. */
  private armed = 0;
  private queue: SendQueue | null = null;
  /** Bytes written in this turn, not yet handed to the kernel (null when none). */
  private cork: Uint8Array[] | null = null;
  private corkBytes = 0;
  private onData: DataListener | null = null;
  private onClose: CloseListener | null = null;
  private onError: ErrorListener | null = null;
  private endDone: (() => void) | null = null;

  constructor(
    private readonly loop: Loop,
    /** The descriptor; -1 once closed. */
    public fd: number,
    /** Tells events for this connection from events for an earlier holder of the same `fd`. */
    readonly gen: number,
    readonly remoteAddress: string,
    readonly remotePort: number,
    readonly localAddress: string,
    readonly localPort: number,
  ) {}

  get writableLength(): number {
    return (this.queue === null ? 0 : this.queue.bytes) + this.corkBytes;
  }

  /** Whether the connection has been closed (by either side). */
  get closed(): boolean {
    return (this.st & CLOSED) !== 0;
  }

  write(bytes: Uint8Array | string): boolean {
    if ((this.st & (CLOSED | ENDING)) !== 0) return false;
    const data = typeof bytes === "string" ? encoder.encode(bytes) : bytes;
    if (data.length === 0) return this.writableLength < HIGH_WATER;
    if (this.queue !== null) {
      this.queue.chunks.push(data);
      this.queue.bytes += data.length;
      return this.queue.bytes < HIGH_WATER;
    }
    if (this.cork === null) {
      this.cork = [data];
      this.loop.corked(this);
    } else this.cork.push(data);
    this.corkBytes += data.length;
    return this.corkBytes < HIGH_WATER;
  }

  /** Hands this turn's writes to the kernel in one `send`; queues what it does not take. */
  uncork(): void {
    const chunks = this.cork;
    if (chunks === null) return;
    this.cork = null;
    const total = this.corkBytes;
    this.corkBytes = 0;
    if ((this.st & CLOSED) !== 0) return;
    let data = chunks[0]!;
    // Joined in the loop's shared buffer when they fit (the common case): only bytes the kernel
    // does not take are copied out to be kept.
    let joined = false;
    if (chunks.length > 1) {
      joined = total <= JOIN_SIZE && this.queue === null;
      data = joined ? this.loop.joinBuffer.subarray(0, total) : new Uint8Array(total);
      let at = 0;
      for (const c of chunks) {
        data.set(c, at);
        at += c.length;
      }
    }
    if (this.queue !== null) {
      this.queue.chunks.push(data);
      this.queue.bytes += data.length;
      return;
    }
    const { symbols: lib, errno } = this.loop.libc;
    let sent = lib.send(this.fd, data, sendLength(data), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      const e = errno();
      if (e !== EAGAIN && e !== EINTR) {
        this.fail(sysError("send", e));
        return;
      }
      sent = 0;
    }
    if (sent === data.length) return;
    if (joined) {
      data = data.slice(sent);
      sent = 0;
    }
    this.queue = { chunks: [data], offset: sent, bytes: data.length - sent, endBy: 0 };
    this.rearm();
  }

  end(done?: () => void): void {
    if ((this.st & CLOSED) !== 0) {
      if (done) queueMicrotask(() => safely(done));
      return;
    }
    if (done && this.endDone === null) this.endDone = done;
    if ((this.st & ENDING) !== 0) return;
    this.uncork(); // this turn's writes go before the FIN
    if ((this.st & CLOSED) !== 0) return;
    this.st |= ENDING | PAUSED;
    if (this.queue === null) {
      this.finishEnd();
      return;
    }
    this.rearm(); // stops reading; EPOLLOUT stays armed until the queue is flushed
    this.queue.endBy = Date.now() + this.loop.endTimeoutMs;
    this.loop.linger(this);
  }

  /** Closes with `ETIMEDOUT` if a pending `end` has waited past its deadline for the peer. */
  expire(now: number): boolean {
    if ((this.st & CLOSED) !== 0 || this.queue === null) return true;
    if (now < this.queue.endBy) return false;
    this.fail(sysError("end", 110)); // ETIMEDOUT: the peer has stopped reading
    return true;
  }

  destroy(): void {
    this.closeNow(null);
  }

  setKeepAlive(enable: boolean, initialDelayMs: number): void {
    if ((this.st & CLOSED) !== 0) return;
    const lib = this.loop.libc.symbols;
    const int = this.loop.int;
    int.setInt32(0, enable ? 1 : 0, true);
    lib.setsockopt(this.fd, SOL_SOCKET, SO_KEEPALIVE, this.loop.intBytes, 4);
    if (enable && initialDelayMs > 0) {
      int.setInt32(0, Math.max(1, Math.round(initialDelayMs / 1000)), true);
      lib.setsockopt(this.fd, IPPROTO_TCP, TCP_KEEPIDLE, this.loop.intBytes, 4);
    }
  }

  on(event: "data", listener: (chunk: Uint8Array) => void): void;
  on(event: "close", listener: () => void): void;
  on(event: "error", listener: (error: Error) => void): void;
  on(event: string, listener: (arg: never) => void): void {
    if (event === "data") {
      this.onData = listener as DataListener;
      if ((this.st & CLOSED) === 0) this.rearm(); // reading starts with the first data listener
    } else if (event === "close") this.onClose = listener as CloseListener;
    else if (event === "error") this.onError = listener as ErrorListener;
  }

  /** Registers the mask the state calls for, if it differs from the armed one. */
  private rearm(): void {
    if ((this.st & CLOSED) !== 0) return;
    const want =
      ((this.st & (PAUSED | EOF)) === 0 && this.onData !== null ? EPOLLIN | EPOLLRDHUP : 0) |
      (this.queue !== null ? EPOLLOUT : 0);
    if (want === this.armed) return;
    if (this.loop.ctl(EPOLL_CTL_MOD, this.fd, want, this.gen) < 0) {
      this.fail(sysError("epoll_ctl", this.loop.libc.errno()));
      return;
    }
    this.armed = want;
  }

  /** Handles one readiness event (on the main thread, from the loop). */
  handle(events: number): void {
    if ((events & EPOLLERR) !== 0) {
      const lib = this.loop.libc.symbols;
      const len = new Uint8Array(4);
      len[0] = 4;
      this.loop.int.setInt32(0, 0, true);
      lib.getsockopt(this.fd, SOL_SOCKET, SO_ERROR, this.loop.intBytes, len);
      const e = this.loop.int.getInt32(0, true);
      this.fail(sysError("socket", e === 0 ? 104 : e));
      return;
    }
    if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) !== 0 && (this.armed & EPOLLIN) !== 0) {
      this.readable();
      if ((this.st & CLOSED) !== 0) return;
    }
    if ((events & EPOLLOUT) !== 0 && this.queue !== null) {
      this.flush();
      if ((this.st & CLOSED) !== 0) return;
    }
    if ((events & EPOLLHUP) !== 0) this.closeNow(null); // both directions are down
  }

  /** Reads into the shared buffer and hands copies of what was read to the data listener. */
  private readable(): void {
    const loop = this.loop;
    const { symbols: lib, errno } = loop.libc;
    for (let i = 0; i < READS_PER_EVENT; i++) {
      const n = lib.recv(this.fd, loop.readBuffer, READ_SIZE_N, 0);
      if (n > 0) {
        const chunk = loop.lendChunks
          ? loop.readBuffer.subarray(0, n)
          : loop.readBuffer.slice(0, n);
        const listener = this.onData;
        if (listener !== null) {
          try {
            listener(chunk);
          } catch (error) {
            reportError(error); // as an uncaught exception in a listener would be
          }
        }
        if ((this.st & (CLOSED | PAUSED)) !== 0 || n < READ_SIZE) return;
        continue;
      }
      if (n === 0) {
        this.peerEnded();
        return;
      }
      const e = errno();
      if (e === EINTR) continue;
      if (e !== EAGAIN) this.fail(sysError("recv", e));
      return;
    }
  }

  /** The peer sent FIN: flush what is queued, then close (as `node:net` without allowHalfOpen). */
  private peerEnded(): void {
    this.st |= EOF;
    if (this.queue === null) this.closeNow(null);
    else this.end();
  }

  /** Sends queued bytes until the kernel takes no more; finishes a pending `end` once empty. */
  private flush(): void {
    const q = this.queue;
    if (q === null) return;
    const { symbols: lib, errno } = this.loop.libc;
    while (q.chunks.length > 0) {
      const head = q.chunks[0]!;
      const part = q.offset === 0 ? head : head.subarray(q.offset);
      const sent = lib.send(this.fd, part, sendLength(part), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (sent < 0) {
        const e = errno();
        if (e === EINTR) continue;
        if (e !== EAGAIN) this.fail(sysError("send", e));
        return;
      }
      q.bytes -= sent;
      if (sent < part.length) {
        q.offset += sent;
        return; // the kernel's buffer is full: wait for EPOLLOUT
      }
      q.chunks.shift();
      q.offset = 0;
    }
    if (q.endBy !== 0) this.loop.lingering.delete(this);
    this.queue = null;
    if ((this.st & ENDING) !== 0) this.finishEnd();
    else this.rearm();
  }

  /** Everything is written: FIN, discard unread input (so close sends no RST), close. */
  private finishEnd(): void {
    const loop = this.loop;
    const lib = loop.libc.symbols;
    lib.shutdown(this.fd, SHUT_WR);
    for (let i = 0; i < 16; i++) {
      if (lib.recv(this.fd, loop.readBuffer, READ_SIZE_N, MSG_DONTWAIT) <= 0) break;
    }
    this.closeNow(null);
  }

  /** Reports `error`, then closes. */
  private fail(error: Error): void {
    this.closeNow(error);
  }

  /** Closes the descriptor now; listeners run in a microtask: error, end's callback, close. */
  private closeNow(error: Error | null): void {
    if ((this.st & CLOSED) !== 0) return;
    this.st |= CLOSED;
    const loop = this.loop;
    if (loop.conns.get(this.fd) === this) loop.conns.delete(this.fd);
    loop.libc.symbols.close(this.fd); // also leaves the epoll set
    this.fd = -1;
    if (this.queue !== null && this.queue.endBy !== 0) loop.lingering.delete(this);
    this.queue = null;
    this.cork = null;
    this.corkBytes = 0;
    this.armed = 0;
    if (error !== null) loop.socketErrors++;
    queueMicrotask(() => {
      const onError = this.onError;
      const done = this.endDone;
      const onClose = this.onClose;
      this.endDone = null;
      if (error !== null && onError !== null) safely(() => onError(error));
      if (done !== null) safely(done);
      if (onClose !== null) safely(onClose);
    });
    loop.connectionClosed();
  }
}

/** The state shared by the listener and its connections: one epoll instance and its loop. */
class Loop {
  readonly conns = new Map<number, FfiSocket>();
  /** Connections whose `end` waits for queued bytes to drain, swept for their deadline. */
  readonly lingering = new Set<FfiSocket>();
  lingerTimer: ReturnType<typeof setInterval> | undefined;
  readonly readBuffer = new Uint8Array(READ_SIZE);
  /** Where one flow's writes of a turn are joined for their `send` (no buffer per `send`). */
  readonly joinBuffer = new Uint8Array(JOIN_SIZE);
  readonly events = new Uint8Array(MAX_EVENTS * EVENT_SIZE);
  readonly eventView = new DataView(this.events.buffer);
  readonly eventsPtr = Deno.UnsafePointer.of(this.events);
  readonly ctlEvent = new Uint8Array(16);
  readonly ctlView = new DataView(this.ctlEvent.buffer);
  readonly intBytes = new Uint8Array(4);
  readonly int = new DataView(this.intBytes.buffer);
  readonly wakeBytes = new Uint8Array(8);
  readonly wakeOne = new Uint8Array([1, 0, 0, 0, 0, 0, 0, 0]);
  /** Accepted address and its length (in/out for accept4). */
  readonly peerAddr = new Uint8Array(28);
  readonly peerLen = new Uint8Array(4);
  readonly peerLenView = new DataView(this.peerLen.buffer);
  /** Buffers the kernel writes into from another thread; referenced until the loop has ended. */
  keepAlive: Uint8Array[] | null = [this.events, this.readBuffer];
  nextGen = 2; // 0: the eventfd, 1: the listener
  listenFd: number;
  listening = true;
  resting: ReturnType<typeof setTimeout> | undefined;
  acceptErrors = 0;
  refused = 0;
  socketErrors = 0;
  loopErrors = 0;
  accepted = 0;
  done: Promise<void> | undefined;

  constructor(
    readonly libc: OpenLibc<typeof SYMBOLS>,
    readonly epfd: number,
    readonly wakeFd: number,
    listenFd: number,
    readonly family: number,
    /** The local address when the listener is bound to one (not a wildcard): shared by all flows. */
    readonly fixedLocal: { address: string; port: number } | null,
    readonly onConnection: (socket: FlowSocket) => void,
    /** Accepted descriptors at or above this number are closed at once (counted in `refused`). */
    readonly fdCeiling: number,
    /** How long `end` waits for a peer to take queued bytes before closing, ms. */
    readonly endTimeoutMs: number,
    /** Data listeners get views of `readBuffer` (see {@link TcpFfiOptions.lendChunks}). */
    readonly lendChunks: boolean,
  ) {
    this.listenFd = listenFd;
  }

  /** `epoll_ctl` with `events` and data = (gen << 32) | fd. */
  ctl(op: number, fd: number, events: number, gen: number): number {
    this.ctlView.setUint32(0, events, true);
    this.ctlView.setUint32(EVENT_DATA, fd, true);
    this.ctlView.setUint32(EVENT_DATA + 4, gen, true);
    return this.libc.symbols.epoll_ctl(this.epfd, op, fd, this.ctlEvent);
  }

  /** Wakes the threaded `epoll_wait` (so the loop notices it should end). */
  wake(): void {
    this.libc.symbols.write(this.wakeFd, this.wakeOne, 8n);
  }

  /** Watches an ending connection's deadline (one timer for all, only while any is ending). */
  linger(socket: FfiSocket): void {
    this.lingering.add(socket);
    if (this.lingerTimer !== undefined) return;
    this.lingerTimer = setInterval(() => {
      const now = Date.now();
      for (const s of this.lingering) {
        if (s.expire(now)) this.lingering.delete(s);
      }
      if (this.lingering.size === 0) {
        clearInterval(this.lingerTimer);
        this.lingerTimer = undefined;
      }
    }, Math.max(10, Math.min(1000, this.endTimeoutMs / 4)));
    Deno.unrefTimer(this.lingerTimer);
  }

  connectionClosed(): void {
    if (!this.listening && this.conns.size === 0) this.wake();
  }

  /** Accepts until `EAGAIN`; rests the listener a while on `EMFILE`/`ENFILE`. */
  accept(): void {
    const { symbols: lib, errno } = this.libc;
    while (this.listening) {
      this.peerLenView.setUint32(0, 28, true);
      const fd = lib.accept4(
        this.listenFd,
        this.peerAddr,
        this.peerLen,
        SOCK_NONBLOCK | SOCK_CLOEXEC,
      );
      if (fd < 0) {
        const e = errno();
        if (e === EAGAIN) return;
        if (e === EINTR) continue;
        this.acceptErrors++;
        if (e === EMFILE || e === ENFILE || e === ENOBUFS || e === ENOMEM) {
          // The connection waits in the backlog; level-triggered epoll would spin on it.
          this.ctl(EPOLL_CTL_MOD, this.listenFd, 0, 1);
          this.resting = setTimeout(() => {
            this.resting = undefined;
            if (this.listening) this.ctl(EPOLL_CTL_MOD, this.listenFd, EPOLLIN, 1);
          }, ACCEPT_REST_MS);
          return;
        }
        continue; // ECONNABORTED, EPROTO, …: that connection is gone, take the next
      }
      if (fd >= this.fdCeiling) {
        // Close to the descriptor limit: refuse cleanly rather than starve the runtime.
        lib.close(fd);
        this.refused++;
        continue;
      }
      const peer = decodeSockaddr(this.peerAddr);
      let local = this.fixedLocal;
      if (local === null) {
        this.peerLenView.setUint32(0, 28, true);
        lib.getsockname(fd, this.peerAddr, this.peerLen);
        local = decodeSockaddr(this.peerAddr);
      }
      const gen = this.nextGen;
      this.nextGen = this.nextGen >= 0xffffffff ? 2 : this.nextGen + 1;
      // Not reading until a data listener is set; errors and hang-ups are always reported.
      if (this.ctl(EPOLL_CTL_ADD, fd, 0, gen) < 0) {
        this.acceptErrors++;
        lib.close(fd);
        continue;
      }
      const socket = new FfiSocket(
        this,
        fd,
        gen,
        peer.address,
        peer.port,
        local.address,
        local.port,
      );
      this.conns.set(fd, socket);
      this.accepted++;
      safely(() => this.onConnection(socket));
    }
  }

  /** Connections written to in this turn, flushed together in one microtask. */
  private corkedSockets: FfiSocket[] = [];

  /** Notes a connection with writes to hand to the kernel at the end of this turn. */
  corked(socket: FfiSocket): void {
    if (this.corkedSockets.push(socket) === 1) queueMicrotask(this.uncorkAll);
  }

  private readonly uncorkAll = (): void => {
    const list = this.corkedSockets;
    this.corkedSockets = [];
    for (const socket of list) {
      try {
        socket.uncork();
      } catch (error) {
        this.loopErrors++;
        reportError(error);
      }
    }
  };

  /** Handles `count` events from the events buffer. */
  dispatch(count: number): void {
    const view = this.eventView;
    for (let i = 0; i < count; i++) {
      const at = i * EVENT_SIZE;
      const events = view.getUint32(at, true);
      const fd = view.getUint32(at + EVENT_DATA, true);
      const gen = view.getUint32(at + EVENT_DATA + 4, true);
      if (gen === 0) {
        this.libc.symbols.read(this.wakeFd, this.wakeBytes, 8n);
      } else if (gen === 1) {
        if (this.listening && fd === this.listenFd) {
          try {
            this.accept();
          } catch (error) {
            this.loopErrors++;
            reportError(error);
          }
        }
      } else {
        const socket = this.conns.get(fd);
        if (socket !== undefined && socket.gen === gen) {
          try {
            socket.handle(events);
          } catch (error) {
            this.loopErrors++;
            reportError(error);
          }
        }
      }
    }
  }

  /** The loop: a threaded wait, then events on the main thread, until closed and empty. */
  async run(): Promise<void> {
    const lib = this.libc.symbols;
    let failures = 0;
    while (this.listening || this.conns.size > 0) {
      const n = await lib.epoll_wait_thread(this.epfd, this.eventsPtr, MAX_EVENTS, -1);
      if (n < 0) {
        // errno lives on the pool thread; EINTR is the usual cause. Back off if it persists.
        this.loopErrors++;
        if (++failures > 100) await new Promise((r) => setTimeout(r, 10));
        continue;
      }
      failures = 0;
      const start = performance.now();
      this.dispatch(n);
      for (let b = 0; b < DRAIN_BATCHES; b++) {
        if (!this.listening && this.conns.size === 0) break;
        if (performance.now() - start >= TURN_BUDGET_MS) break;
        const more = lib.epoll_wait(this.epfd, this.eventsPtr, MAX_EVENTS, 0);
        if (more <= 0) break;
        this.dispatch(more);
      }
    }
    lib.close(this.epfd);
    lib.close(this.wakeFd);
    // The kernel was handed raw pointers into these buffers (from another thread): they must
    // outlive every wait, so they are referenced until here.
    this.keepAlive = null;
  }

  /** Stops accepting and releases the port; the loop ends once no connection is left. */
  async close(): Promise<void> {
    if (this.listening) {
      this.listening = false;
      if (this.resting !== undefined) clearTimeout(this.resting);
      this.ctl(EPOLL_CTL_DEL, this.listenFd, 0, 1);
      this.libc.symbols.close(this.listenFd);
      this.listenFd = -1;
      this.wake();
    }
    if (this.conns.size === 0) await this.done;
  }
}

/**
 * The lowest descriptor number not to keep: the soft `RLIMIT_NOFILE` less a reserve of
 * {@link FD_RESERVE} (a quarter of the limit when that is smaller). Descriptors are allocated
 * lowest-first, so an accepted descriptor's number tells how full the table is.
 */
function fdCeiling(lib: Libc): number {
  const rl = new BigUint64Array(2);
  if (lib.getrlimit(RLIMIT_NOFILE, new Uint8Array(rl.buffer)) < 0) return 0x7fffffff;
  const soft = rl[0]! > 0x7fffffffn ? 0x7fffffff : Number(rl[0]);
  return soft - Math.min(FD_RESERVE, Math.floor(soft / 4));
}

/** Settings of the FFI transport beyond {@link listenTcp}'s. */
export interface TcpFfiOptions {
  /**
   * How long `end()` waits for the peer to take the bytes still queued before it closes the
   * connection anyway (reported to the error listener as `ETIMEDOUT`), ms. Default 30,000: a peer
   * that stops reading must not hold a descriptor forever.
   */
  readonly endTimeoutMs?: number;
  /**
   * Data listeners get views of the shared read buffer, valid only until the listener returns
   * (no copy per read: what a listener keeps, it copies). Default false: a fresh copy per read,
   * as node:net gives.
   */
  readonly lendChunks?: boolean;
}

/** A {@link TcpTransport} with the FFI transport's counters. */
export interface TcpFfiTransport extends TcpTransport {
  /** Connections open now. */
  readonly connections: number;
  /** Connections accepted since start. */
  readonly accepted: number;
  /** Failed `accept4` calls (`EMFILE`, `ENFILE`, … rest the listener for 100 ms). */
  readonly acceptErrors: number;
  /**
   * Connections closed as soon as accepted because the process is within 64 descriptors of its
   * limit (kept for the runtime, which fails badly without one).
   */
  readonly refused: number;
  /** Connections closed by an error (reset, failed send, …). */
  readonly socketErrors: number;
  /** Failed waits and exceptions caught in the event loop. */
  readonly loopErrors: number;
}

/**
 * Listens on host:port with `SO_REUSEPORT` (and `SO_REUSEADDR`, backlog 4096) through libc and
 * hands every accepted connection to `onConnection` as a {@link FlowSocket}. Same contract as
 * {@link listenTcp} in `tcp.ts`: `close()` stops accepting and releases the port at once
 * (connections already accepted stay open until closed; it resolves once the port is released, and
 * after the event loop has ended if no connection is left). An IPv6 host (containing `:`) opens an
 * `AF_INET6` socket (`::` is dual-stack: IPv4 peers appear as `::ffff:a.b.c.d`); a host name is
 * resolved once. Rejects with an error whose `code` is e.g. `EADDRINUSE`. `options` is optional,
 * so this function can stand wherever `listenTcp` is expected.
 */
export async function listenTcpReusePort(
  host: string,
  port: number,
  onConnection: (socket: FlowSocket) => void,
  options: TcpFfiOptions = {},
): Promise<TcpFfiTransport> {
  const ffi = libcOnce();
  const { symbols: lib, errno } = ffi;
  const { address, family } = await literalFor(host);
  const where = `${host}:${port}`;
  const bindAddr = encodeSockaddr(lib, family, address, port);
  if (bindAddr === null) throw sysError("parse", 22, where);

  const fd = lib.socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw sysError("socket", errno(), where);
  const opened: number[] = [fd];
  const bail = (call: string, e: number): never => {
    for (const f of opened) lib.close(f);
    throw sysError(call, e, where);
  };
  const one = new Uint8Array([1, 0, 0, 0]);
  if (
    lib.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, one, 4) < 0 ||
    lib.setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, one, 4) < 0
  ) bail("setsockopt", errno());
  lib.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, one, 4); // accepted sockets inherit it (checked)
  if (lib.bind(fd, bindAddr, bindAddr.length) < 0) bail("bind", errno());
  if (lib.listen(fd, BACKLOG) < 0) bail("listen", errno());
  const sa = new Uint8Array(28);
  const saLen = new Uint8Array([28, 0, 0, 0]);
  if (lib.getsockname(fd, sa, saLen) < 0) bail("getsockname", errno());
  const bound = decodeSockaddr(sa);

  const epfd = lib.epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) bail("epoll_create1", errno());
  opened.push(epfd);
  const wakeFd = lib.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wakeFd < 0) bail("eventfd", errno());
  opened.push(wakeFd);

  const wildcard = address === "0.0.0.0" || address === "::";
  const loop = new Loop(
    ffi,
    epfd,
    wakeFd,
    fd,
    family,
    wildcard ? null : bound,
    onConnection,
    fdCeiling(lib),
    options.endTimeoutMs ?? END_TIMEOUT_MS,
    options.lendChunks ?? false,
  );
  if (loop.ctl(EPOLL_CTL_ADD, wakeFd, EPOLLIN, 0) < 0) bail("epoll_ctl", errno());
  if (loop.ctl(EPOLL_CTL_ADD, fd, EPOLLIN, 1) < 0) bail("epoll_ctl", errno());
  loop.done = loop.run().catch((error) => {
    loop.loopErrors++;
    reportError(error);
  });

  return {
    address: bound.address,
    port: bound.port,
    get connections() {
      return loop.conns.size;
    },
    get accepted() {
      return loop.accepted;
    },
    get acceptErrors() {
      return loop.acceptErrors;
    },
    get refused() {
      return loop.refused;
    },
    get socketErrors() {
      return loop.socketErrors;
    },
    get loopErrors() {
      return loop.loopErrors;
    },
    close: () => loop.close(),
  };
}
