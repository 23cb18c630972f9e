/**
 * SIP over UDP (RFC 3261 §18) on a socket opened through libc by FFI, so that several worker
 * processes can share one UDP port with `SO_REUSEPORT` (the kernel spreads datagrams over the
 * sockets by a hash of the 4-tuple). Deno's own datagram APIs cannot do that: `Deno.listenDatagram`
 * with `reuseAddress` hands every datagram to the last binder, and `node:dgram` ignores `reusePort`.
 *
 * Receiving: the socket is blocking; one `recvmmsg(…, 64, MSG_WAITFORONE)` at a time runs as a
 * `nonblocking` FFI call on a thread of Deno's blocking pool (the event loop never waits on it), and
 * when it returns a batch, more batches are drained synchronously with `MSG_DONTWAIT` (a cheap call
 * on the main thread that never blocks) before the next threaded wait. Sending: the datagrams sent in
 * one turn of the event loop leave together in `sendmmsg(…, MSG_DONTWAIT)` calls of up to 64 when the
 * turn's synchronous work is done (a microtask), so that a batch received and answered at once (e.g.
 * 64 503s under overload) costs one system call, not 64; a full send buffer (`EAGAIN`) is a drop,
 * counted in `sendErrors`.
 * `close()` shuts the socket down, which wakes the pending receive, and closes the descriptor after
 * that receive has returned (so the descriptor number is never reused under a call in flight).
 *
 * Needs `--allow-ffi` (or `--allow-all`); Deno 2.9.6 needs no `--unstable-ffi` for `Deno.dlopen`.
 * Linux x86_64/aarch64 only (struct layouts, constants, `libc.so.6`).
 *
 * @module
 */
import { type OpenLibc, openLibc } from "./_libc.ts";
import { AF_INET, AF_INET6, formatIPv4, formatIPv6, literalFor } from "./_sockaddr.ts";
import type { Source } from "../sip/message.ts";
import type { UdpTransport } from "./udp.ts";

export type { UdpTransport } from "./udp.ts";

const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0x80000;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_REUSEPORT = 15;
const SHUT_RDWR = 2;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const MSG_WAITFORONE = 0x10000;
const EINTR = 4;
const EAGAIN = 11;

/** Datagrams per `recvmmsg` call. */
const BATCH = 64;
/** Bytes per receive slot: the largest UDP payload fits, so nothing is ever truncated. */
const SLOT = 65536;
/** Bytes per send slot: a datagram up to this size is copied into the wired send batch. */
const OUT_SLOT = 2048;
/** Room for a `sockaddr_in6` (28 bytes), rounded up. */
const NAME = 32;
/** `sizeof(struct mmsghdr)` on LP64 Linux: a 56-byte `msghdr`, the `msg_len`, padding. */
const MMSGHDR = 64;
/** Synchronous batches drained after each threaded wait before yielding to the event loop. */
const DRAIN_BATCHES = 8;
/** Kernel buffer sizes asked for (the kernel caps them at net.core.[rw]mem_max). */
const RCVBUF = 4 << 20;
const SNDBUF = 1 << 20;
/** Encoded destination addresses kept for `send`; the cache is emptied when it reaches this size. */
const DEST_CACHE = 4096;

const SYMBOLS = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  inet_pton: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  recvmmsg: { parameters: ["i32", "pointer", "u32", "i32", "pointer"], result: "i32" },
  recvmmsg_wait: {
    name: "recvmmsg",
    parameters: ["i32", "pointer", "u32", "i32", "pointer"],
    result: "i32",
    nonblocking: true,
  },
  sendmmsg: { parameters: ["i32", "pointer", "u32", "i32"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

type Libc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let libc: OpenLibc<typeof SYMBOLS> | undefined;

/** libc with this module's symbols, opened once per isolate. */
function libcOnce(): OpenLibc<typeof SYMBOLS> {
  return libc ??= openLibc(SYMBOLS, "udp_ffi");
}

const encoder = new TextEncoder();

/**
 * Encodes `address`:`port` as a `sockaddr_in` or `sockaddr_in6`, or returns null if not an IP
 * literal. On an IPv6 socket an IPv4 address becomes IPv4-mapped, and a numeric zone (`fe80::1%2`,
 * as sources are reported) sets `sin6_scope_id`.
 */
function encodeSockaddr(
  lib: Libc,
  family: number,
  address: string,
  port: number,
): Uint8Array | null {
  if (family === AF_INET) {
    const sa = new Uint8Array(16);
    if (lib.inet_pton(AF_INET, encoder.encode(`${address}\0`), sa.subarray(4, 8)) !== 1) {
      return null;
    }
    sa[0] = AF_INET; // sin_family, little-endian u16
    sa[2] = port >> 8; // sin_port, network order
    sa[3] = port & 0xff;
    return sa;
  }
  const sa = new Uint8Array(28);
  const addr = sa.subarray(8, 24);
  const zoneAt = address.indexOf("%");
  const bare = zoneAt < 0 ? address : address.slice(0, zoneAt);
  const text = encoder.encode(`${bare}\0`);
  if (lib.inet_pton(AF_INET6, text, addr) !== 1) {
    // An IPv4 peer of a dual-stack socket: send to its IPv4-mapped address.
    if (zoneAt >= 0 || lib.inet_pton(AF_INET, text, addr.subarray(12, 16)) !== 1) return null;
    addr[10] = 0xff;
    addr[11] = 0xff;
  }
  if (zoneAt >= 0) {
    const zone = address.slice(zoneAt + 1);
    if (!/^\d{1,10}$/.test(zone) || Number(zone) > 0xffffffff) return null;
    new DataView(sa.buffer).setUint32(24, Number(zone), true); // sin6_scope_id, host order
  }
  sa[0] = AF_INET6;
  sa[2] = port >> 8;
  sa[3] = port & 0xff;
  return sa;
}

/** Throws an error that names the failed call, the errno and the address. */
function fail(call: string, errno: number, host: string, port: number): never {
  const names: Record<number, string> = {
    1: "EPERM",
    13: "EACCES",
    22: "EINVAL",
    97: "EAFNOSUPPORT",
    98: "EADDRINUSE",
    99: "EADDRNOTAVAIL",
  };
  const code = names[errno] ?? `errno ${errno}`;
  const error = new Error(`udp_ffi: ${call} ${host}:${port} failed: ${code}`);
  (error as Error & { code: string }).code = code;
  throw error;
}

/**
 * BATCH slots of `slot` bytes of data and of addresses, with the iovecs and mmsghdrs that point at
 * them, wired once for `recvmmsg`/`sendmmsg` (a send sets each datagram's lengths itself). The
 * arrays in `keep` must stay referenced while the kernel may use the pointers.
 */
function wiredBatch(slot: number) {
  const data = new Uint8Array(BATCH * slot);
  const names = new Uint8Array(BATCH * NAME);
  const iovs = new Uint8Array(BATCH * 16);
  const hdrs = new Uint8Array(BATCH * MMSGHDR);
  const iovView = new DataView(iovs.buffer);
  const hdrView = new DataView(hdrs.buffer);
  const dataAt = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(data)));
  const namesAt = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(names)));
  const iovsAt = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(iovs)));
  for (let i = 0; i < BATCH; i++) {
    iovView.setBigUint64(i * 16, dataAt + BigInt(i * slot), true); // iov_base
    iovView.setBigUint64(i * 16 + 8, BigInt(slot), true); // iov_len
    const h = i * MMSGHDR;
    hdrView.setBigUint64(h, namesAt + BigInt(i * NAME), true); // msg_name
    hdrView.setUint32(h + 8, NAME, true); // msg_namelen
    hdrView.setBigUint64(h + 16, iovsAt + BigInt(i * 16), true); // msg_iov
    hdrView.setBigUint64(h + 24, 1n, true); // msg_iovlen
  }
  const hdrsPtr = Deno.UnsafePointer.of(hdrs);
  return { data, names, iovView, hdrView, dataAt, hdrsPtr, keep: [data, names, iovs, hdrs] };
}

/**
 * Binds a UDP socket on host:port with `SO_REUSEPORT` (and `SO_REUSEADDR`), so every process of the
 * same user that binds the same address and port shares its datagrams, and calls `onDatagram` for
 * each datagram received, with a view of the receive buffer that is reused once `onDatagram`
 * returns: what keeps the bytes longer copies them (a refused datagram is never copied). Same contract as {@link listenUdp} in `udp.ts`: `send` never throws
 * (failures and `EAGAIN` drops are counted in `sendErrors`), `close` resolves once the socket is
 * closed and the port released. An IPv6 host (containing `:`) opens a dual-stack `AF_INET6` socket
 * (IPv4 peers appear as `::ffff:a.b.c.d`); `host` may also be a name, resolved once.
 *
 * Rejects with an error whose `code` is e.g. `EADDRINUSE` when the port is held by a socket without
 * `SO_REUSEPORT` or by another user.
 */
export async function listenUdpReusePort(
  host: string,
  port: number,
  onDatagram: (bytes: Uint8Array, source: Source) => void,
): Promise<UdpTransport> {
  const { symbols: lib, errno } = libcOnce();
  const { address, family } = await literalFor(host);
  const bindAddr = encodeSockaddr(lib, family, address, port);
  if (bindAddr === null) fail("parse", 22, host, port);

  const fd = lib.socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) fail("socket", errno(), host, port);
  const int = new Uint8Array(4);
  const setInt = (option: number, value: number) => {
    new DataView(int.buffer).setInt32(0, value, true);
    return lib.setsockopt(fd, SOL_SOCKET, option, int, 4);
  };
  if (setInt(SO_REUSEADDR, 1) < 0 || setInt(SO_REUSEPORT, 1) < 0) {
    const e = errno();
    lib.close(fd);
    fail("setsockopt", e, host, port);
  }
  setInt(SO_RCVBUF, RCVBUF); // best effort: the kernel caps it
  setInt(SO_SNDBUF, SNDBUF);
  if (lib.bind(fd, bindAddr, bindAddr.length) < 0) {
    const e = errno();
    lib.close(fd);
    fail("bind", e, host, port);
  }
  const local = new Uint8Array(28);
  const localLen = new Uint8Array(4);
  new DataView(localLen.buffer).setUint32(0, local.length, true);
  lib.getsockname(fd, local, localLen);
  const localPort = (local[2]! << 8) | local[3]!;
  const localAddress = family === AF_INET ? formatIPv4(local, 4) : formatIPv6(local, 8);

  // Receive buffers: BATCH slots of data, addresses, iovecs and mmsghdrs, wired once.
  const { data, names, hdrView, hdrsPtr, keep: inKeep } = wiredBatch(SLOT);

  const keepAlive: Uint8Array[] = [...inKeep];
  let closing = false;
  let sendErrors = 0;
  const sourceCache = new Map<number, string>();

  /** Hands the first `count` received datagrams to `onDatagram`. */
  const dispatch = (count: number) => {
    for (let i = 0; i < count; i++) {
      const h = i * MMSGHDR;
      const length = hdrView.getUint32(h + 56, true); // msg_len
      const nameLen = hdrView.getUint32(h + 8, true);
      hdrView.setUint32(h + 8, NAME, true);
      const n = i * NAME;
      const peerPort = (names[n + 2]! << 8) | names[n + 3]!;
      let peer: string;
      if (nameLen >= 28 && names[n] === AF_INET6) {
        peer = formatIPv6(names, n + 8);
        const scope = names[n + 24]! | (names[n + 25]! << 8) | (names[n + 26]! << 16) |
          (names[n + 27]! << 24);
        if (scope !== 0) peer += `%${scope >>> 0}`; // link-local: the interface index
      } else {
        // IPv4 addresses are cached by their 32-bit value: the common case costs a map lookup.
        const key = ((names[n + 4]! << 24) | (names[n + 5]! << 16) | (names[n + 6]! << 8) |
          names[n + 7]!) >>> 0;
        peer = sourceCache.get(key) ?? formatIPv4(names, n + 4);
        if (sourceCache.size < DEST_CACHE) sourceCache.set(key, peer);
      }
      // A view of the receive slot, valid until `onDatagram` returns (see listenUdpReusePort).
      const bytes = data.subarray(i * SLOT, i * SLOT + length);
      try {
        onDatagram(bytes, {
          transport: "udp",
          address: peer,
          port: peerPort,
          flowId: 0,
          localAddress,
          localPort,
        });
      } catch (error) {
        reportError(error); // as an uncaught exception of an event listener would be
      }
      if (closing) return;
    }
    // What was sent while handling the batch leaves now, in one system call with the batch's other
    // replies (`send` copied each, so the receive slots may be overwritten next).
    flush();
  };

  const receiving = (async () => {
    while (!closing && keepAlive.length > 0) {
      const got = await lib.recvmmsg_wait(fd, hdrsPtr, BATCH, MSG_WAITFORONE, null);
      if (closing) break;
      if (got < 0) {
        // errno lives on the pool thread: ask again synchronously to learn it here.
        const retry = lib.recvmmsg(fd, hdrsPtr, BATCH, MSG_DONTWAIT, null);
        if (retry > 0) dispatch(retry);
        else if (retry < 0 && errno() !== EAGAIN && errno() !== EINTR) break; // EBADF & co.
        continue;
      }
      if (got === 0) continue;
      dispatch(got);
      for (let b = 0; b < DRAIN_BATCHES && !closing; b++) {
        const more = lib.recvmmsg(fd, hdrsPtr, BATCH, MSG_DONTWAIT, null);
        if (more <= 0) {
          const e = errno();
          if (more < 0 && e === EINTR) continue;
          break; // EAGAIN: empty, back to the threaded wait
        }
        // A partial batch does not end the drain: more may have come while it was handled, and a
        // threaded wait per batch costs a hand-off between threads (under load, ~60 datagrams).
        dispatch(more);
      }
    }
  })();

  // Destination addresses encoded once: by address, then port (no key string built per send).
  const destinations = new Map<string, Map<number, Uint8Array | null>>();
  let destinationCount = 0;
  let closed: Promise<void> | undefined;

  // Send batch, wired once like the receive side: a datagram up to OUT_SLOT bytes and its address
  // are copied into slot i of `outData`/`outNames`, whose addresses the iovecs and mmsghdrs already
  // hold, so sending one costs two small copies and two lengths, not a pointer lookup per buffer
  // (Deno.UnsafePointer.of records each buffer in a WeakMap: dearer than the copy). A larger one
  // (rare: RFC 3261 §18.1.1 keeps UDP messages under the MTU) is pointed at where it is, and kept
  // referenced until its `sendmmsg`.
  const {
    data: outData,
    names: outNames,
    iovView: outIovView,
    hdrView: outHdrView,
    dataAt: outDataAt,
    hdrsPtr: outHdrsPtr,
    keep: outKeep,
  } = wiredBatch(OUT_SLOT);
  keepAlive.push(...outKeep);
  /** Datagrams in the send batch, and the large ones pointed at in place (referenced until sent). */
  let outCount = 0;
  const outLarge: Uint8Array[] = [];

  /** Sends the datagrams of this turn. */
  const flush = (): void => {
    const count = outCount;
    if (count === 0) return;
    outCount = 0;
    if (closing) {
      sendErrors += count;
      outLarge.length = 0;
      return;
    }
    let from = 0;
    while (from < count) {
      const sent = lib.sendmmsg(
        fd,
        from === 0 ? outHdrsPtr : Deno.UnsafePointer.offset(outHdrsPtr!, from * MMSGHDR),
        count - from,
        MSG_DONTWAIT | MSG_NOSIGNAL,
      );
      if (sent > 0) {
        from += sent;
        continue;
      }
      const e = sent < 0 ? errno() : 0;
      if (e === EINTR) continue;
      if (e === EAGAIN) {
        sendErrors += count - from; // the send buffer is full: the rest are dropped
        break;
      }
      // An error on the first datagram left (unreachable, bad address): it is dropped, the rest go.
      sendErrors++;
      from++;
    }
    if (outLarge.length > 0) {
      // Slots that pointed at a large datagram point back at their own part of `outData`.
      for (let i = 0; i < count; i++) {
        outIovView.setBigUint64(i * 16, outDataAt + BigInt(i * OUT_SLOT), true);
      }
      outLarge.length = 0;
    }
  };

  /** The encoded sockaddr of address:port (null if it is not one), cached. */
  const destination = (address: string, port: number): Uint8Array | null => {
    let byPort = destinations.get(address);
    if (byPort === undefined) {
      if (destinationCount >= DEST_CACHE) {
        destinations.clear();
        destinationCount = 0;
      }
      byPort = new Map();
      destinations.set(address, byPort);
    }
    let sa = byPort.get(port);
    if (sa === undefined) {
      sa = port > 0 && port < 65536 ? encodeSockaddr(lib, family, address, port) : null;
      byPort.set(port, sa);
      destinationCount++;
    }
    return sa;
  };

  return {
    address: localAddress,
    port: localPort,
    get sendErrors() {
      return sendErrors;
    },
    send(bytes, toAddress, toPort) {
      if (closing) {
        sendErrors++;
        return;
      }
      const sa = destination(toAddress, toPort);
      if (sa === null) {
        sendErrors++;
        return;
      }
      const i = outCount++;
      if (i === 0) queueMicrotask(flush);
      const length = bytes.length;
      if (length <= OUT_SLOT) {
        outData.set(bytes, i * OUT_SLOT);
      } else {
        outLarge.push(bytes);
        outIovView.setBigUint64(
          i * 16,
          BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes))),
          true,
        );
      }
      outIovView.setUint32(i * 16 + 8, length, true); // iov_len (the high half stays 0)
      outNames.set(sa, i * NAME);
      outHdrView.setUint32(i * MMSGHDR + 8, sa.length, true); // msg_namelen
      if (outCount === BATCH) flush();
    },
    close() {
      closed ??= (async () => {
        flush(); // what was sent before close leaves
        closing = true;
        lib.shutdown(fd, SHUT_RDWR); // wakes the pending recvmmsg (ENOTCONN is expected, harmless)
        await receiving;
        lib.close(fd);
        // The kernel was handed raw pointers into these buffers: they must outlive every receive
        // call, so they are referenced until here (an iovec array collected early is written into
        // after it was freed).
        keepAlive.length = 0;
      })();
      return closed;
    },
  };
}
