/**
 * Tests of the FFI TCP transport (`transport/tcp_ffi.ts`): echo, address decoding over IPv4 and IPv6,
 * an 8 MB write to a slow reader (partial writes, EAGAIN, EPOLLOUT), pause/resume, end() flushing
 * before the FIN, destroy, peer close, two processes sharing one port with SO_REUSEPORT, a close that
 * releases the port, and 1,000 connections opened and closed without a descriptor leak. Peers are
 * `node:net` sockets or `Deno.connect` connections, so the code under test does not check itself.
 */
import assert from "node:assert/strict";
import net from "node:net";
import type { FlowSocket, listenTcp } from "../transport/tcp.ts";
import { listenTcpReusePort } from "../transport/tcp_ffi.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// Same signature as listenTcp: the server selects one or the other by a flag.
const _sameSignature: typeof listenTcp = listenTcpReusePort;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until `check()` holds, polling every 5 ms; fails after `ms`. */
async function until(check: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** A `node:net` client connected to host:port that collects what it receives. */
async function client(host: string, port: number) {
  const socket = net.connect({ host, port });
  const chunks: Uint8Array[] = [];
  let ended = false;
  let closed = false;
  socket.on("data", (d: Uint8Array) => chunks.push(new Uint8Array(d)));
  socket.on("end", () => ended = true);
  socket.on("close", () => closed = true);
  socket.on("error", () => {});
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", () => resolve());
    socket.once("error", reject);
  });
  return {
    socket,
    get ended() {
      return ended;
    },
    get closed() {
      return closed;
    },
    text: () => decoder.decode(concat(chunks)),
    bytes: () => concat(chunks),
    byteLength: () => chunks.reduce((n, c) => n + c.length, 0),
  };
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** A server whose accepted sockets are handed to the test as they come. */
async function server(host = "127.0.0.1", port = 0, setup?: (s: FlowSocket) => void) {
  const sockets: FlowSocket[] = [];
  const transport = await listenTcpReusePort(host, port, (s) => {
    sockets.push(s);
    setup?.(s);
  });
  return { transport, sockets };
}

/** Whether this machine can listen on ::1. */
function hasIpv6(): boolean {
  try {
    const l = Deno.listen({ hostname: "::1", port: 0 });
    l.close();
    return true;
  } catch {
    return false;
  }
}

/** Whether a listener without SO_REUSEPORT can bind host:port. */
function canBindPlain(host: string, port: number): boolean {
  try {
    Deno.listen({ hostname: host, port }).close();
    return true;
  } catch {
    return false;
  }
}

function openFds(): number {
  return [...Deno.readDirSync("/proc/self/fd")].length;
}

Deno.test("tcp_ffi: data, back-pressure and closing", async (t) => {
  const v6 = hasIpv6();

  await t.step("IPv4 echo; remote and local address and port decoded", async () => {
    const { transport, sockets } = await server("127.0.0.1", 0, (s) => {
      s.on("data", (chunk) => s.write(chunk));
    });
    const c = await client("127.0.0.1", transport.port);
    try {
      assert.equal(transport.address, "127.0.0.1");
      c.socket.write("hello v4");
      await until(() => c.text() === "hello v4", "echo");
      const s = sockets[0]!;
      assert.equal(s.remoteAddress, "127.0.0.1");
      assert.equal(s.remotePort, c.socket.localPort);
      assert.equal(s.localAddress, "127.0.0.1");
      assert.equal(s.localPort, transport.port);
      assert.equal(s.writableLength, 0);
      // Strings are written as UTF-8.
      s.write("é");
      await until(() => c.text() === "hello v4é", "string write");
    } finally {
      c.socket.destroy();
      await transport.close();
    }
  });

  await t.step({
    name: "IPv6: ::1 decoded; a dual-stack :: listener sees IPv4 peers as ::ffff:a.b.c.d",
    ignore: !v6,
    fn: async () => {
      const six = await server("::1");
      const c = await client("::1", six.transport.port);
      try {
        await until(() => six.sockets.length === 1, "accept");
        assert.equal(six.transport.address, "::1");
        assert.equal(six.sockets[0]!.remoteAddress, "::1");
        assert.equal(six.sockets[0]!.remotePort, c.socket.localPort);
        assert.equal(six.sockets[0]!.localAddress, "::1");
      } finally {
        c.socket.destroy();
        await six.transport.close();
      }
      const dual = await server("::");
      const c4 = await client("127.0.0.1", dual.transport.port);
      try {
        await until(() => dual.sockets.length === 1, "accept");
        assert.equal(dual.sockets[0]!.remoteAddress, "::ffff:127.0.0.1");
        assert.equal(dual.sockets[0]!.remotePort, c4.socket.localPort);
        assert.equal(dual.sockets[0]!.localAddress, "::ffff:127.0.0.1");
        assert.equal(dual.sockets[0]!.localPort, dual.transport.port);
      } finally {
        c4.socket.destroy();
        await dual.transport.close();
      }
    },
  });

  await t.step("8 MB written at once to a slow reader arrives intact", async () => {
    const size = 8 << 20;
    const payload = new Uint8Array(size);
    for (let i = 0; i < size; i++) payload[i] = (i * 31 + (i >> 13)) & 0xff;
    let queuedAfterWrite = -1;
    let wrote = true;
    const { transport } = await server("127.0.0.1", 0, (s) => {
      wrote = s.write(payload);
      queuedAfterWrite = s.writableLength;
    });
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: transport.port });
    try {
      const got = new Uint8Array(size);
      let at = 0;
      const buf = new Uint8Array(65536);
      await sleep(100); // let the kernel buffers fill first
      for (let reads = 0; at < size; reads++) {
        const n = await conn.read(buf);
        if (n === null) break;
        got.set(buf.subarray(0, n), at);
        at += n;
        if (reads % 8 === 0) await sleep(2); // slow reader
      }
      assert.ok(queuedAfterWrite > 0, "the kernel did not take 8 MB at once: bytes were queued");
      assert.equal(wrote, false, "write() reports back-pressure");
      assert.equal(at, size);
      assert.ok(got.every((b, i) => b === payload[i]), "bytes arrive intact and in order");
    } finally {
      conn.close();
      await transport.close();
    }
  });

  await t.step("several writes queued behind a partial write keep their order", async () => {
    const { transport } = await server("127.0.0.1", 0, (s) => {
      s.write(new Uint8Array(4 << 20).fill(0x61));
      for (let i = 0; i < 100; i++) s.write(`<${i}>`);
      s.end();
    });
    const c = await client("127.0.0.1", transport.port);
    try {
      await until(() => c.closed, "end of stream", 10000);
      const text = c.text();
      assert.equal(
        text.length,
        (4 << 20) + Array.from({ length: 100 }, (_, i) => `<${i}>`).join("").length,
      );
      assert.ok(text.endsWith(Array.from({ length: 100 }, (_, i) => `<${i}>`).join("")));
    } finally {
      await transport.close();
    }
  });

  await t.step("bytes sent before the data listener is set are not lost", async () => {
    const seen: string[] = [];
    const { transport, sockets } = await server();
    const c = await client("127.0.0.1", transport.port);
    try {
      c.socket.write("early");
      await until(() => sockets.length === 1, "accept");
      await sleep(50);
      sockets[0]!.on("data", (chunk) => seen.push(decoder.decode(chunk)));
      await until(() => seen.join("") === "early", "early bytes");
    } finally {
      c.socket.destroy();
      await transport.close();
    }
  });

  await t.step("end() flushes queued bytes, then FIN; done and close run once", async () => {
    const size = 3 << 20;
    let done = 0;
    let closes = 0;
    let writeAfterEnd: boolean | undefined;
    const { transport } = await server("127.0.0.1", 0, (s) => {
      s.on("close", () => closes++);
      s.write(new Uint8Array(size).fill(0x62));
      s.end(() => done++);
      writeAfterEnd = s.write("late");
    });
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: transport.port });
    try {
      await sleep(100);
      let total = 0;
      const buf = new Uint8Array(65536);
      while (true) {
        const n = await conn.read(buf);
        if (n === null) break; // FIN after the last byte
        total += n;
      }
      assert.equal(total, size);
      await until(() => closes === 1 && done === 1, "done and close");
      await sleep(50);
      assert.equal(closes, 1);
      assert.equal(done, 1);
      assert.equal(writeAfterEnd, false);
      assert.equal(transport.connections, 0);
    } finally {
      conn.close();
      await transport.close();
    }
  });

  await t.step("end() to a peer that never reads gives up after endTimeoutMs", async () => {
    const errors: string[] = [];
    let closes = 0;
    let done = 0;
    const transport = await listenTcpReusePort("127.0.0.1", 0, (s) => {
      s.on("error", (e) => errors.push((e as Error & { code: string }).code));
      s.on("close", () => closes++);
      s.write(new Uint8Array(16 << 20));
      s.end(() => done++);
    }, { endTimeoutMs: 200 });
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: transport.port });
    try {
      await until(() => transport.accepted === 1, "accept");
      assert.equal(transport.connections, 1, "still flushing");
      await until(() => closes === 1, "close after the deadline", 3000);
      assert.deepEqual(errors, ["ETIMEDOUT"]);
      assert.equal(done, 1);
      assert.equal(transport.connections, 0);
    } finally {
      conn.close();
      await transport.close();
    }
  });

  await t.step("destroy() closes at once; the peer sees the end; close runs once", async () => {
    let closes = 0;
    const { transport, sockets } = await server("127.0.0.1", 0, (s) => {
      s.on("close", () => closes++);
    });
    const c = await client("127.0.0.1", transport.port);
    try {
      await until(() => sockets.length === 1, "accept");
      const s = sockets[0]!;
      s.destroy();
      s.destroy(); // harmless
      assert.equal(s.write("after"), false);
      assert.equal(transport.connections, 0);
      await until(() => c.closed, "peer closed");
      await sleep(20);
      assert.equal(closes, 1);
    } finally {
      await transport.close();
    }
  });

  await t.step("peer close fires close once (FIN and reset)", async () => {
    let closes = 0;
    let errors = 0;
    const { transport } = await server("127.0.0.1", 0, (s) => {
      s.on("data", () => {});
      s.on("error", () => errors++);
      s.on("close", () => closes++);
    });
    try {
      const a = await client("127.0.0.1", transport.port);
      a.socket.end();
      await until(() => closes === 1, "close after FIN");
      const b = await client("127.0.0.1", transport.port);
      await until(() => transport.connections === 1, "accept");
      b.socket.resetAndDestroy();
      await until(() => closes === 2, "close after reset");
      await sleep(50);
      assert.equal(closes, 2);
      assert.ok(errors <= 1);
      assert.equal(transport.connections, 0);
    } finally {
      await transport.close();
    }
  });

  await t.step("setKeepAlive sets SO_KEEPALIVE without disturbing the flow", async () => {
    const { transport, sockets } = await server("127.0.0.1", 0, (s) => {
      s.setKeepAlive(true, 60_000);
      s.on("data", (chunk) => s.write(chunk));
    });
    const c = await client("127.0.0.1", transport.port);
    try {
      c.socket.write("ka");
      await until(() => c.text() === "ka", "echo");
      sockets[0]!.setKeepAlive(false, 0);
    } finally {
      c.socket.destroy();
      await transport.close();
    }
  });
});

Deno.test("tcp_ffi: errors stay inside the transport", async (t) => {
  await t.step("an exception in a listener is reported; the loop goes on", async () => {
    const errors: unknown[] = [];
    const onError = (e: ErrorEvent) => {
      e.preventDefault();
      errors.push(e.error);
    };
    globalThis.addEventListener("error", onError);
    const { transport } = await server("127.0.0.1", 0, (s) => {
      s.on("data", (chunk) => {
        if (decoder.decode(chunk) === "boom") throw new Error("listener failed");
        s.write(chunk);
      });
    });
    try {
      const c = await client("127.0.0.1", transport.port);
      c.socket.write("boom");
      await until(() => errors.length === 1, "reported error");
      c.socket.write("next");
      await until(() => c.text() === "next", "echo after the exception");
      c.socket.destroy();
      const d = await client("127.0.0.1", transport.port);
      d.socket.write("new");
      await until(() => d.text() === "new", "a new connection is served");
      d.socket.destroy();
      assert.equal(transport.loopErrors, 0);
    } finally {
      globalThis.removeEventListener("error", onError);
      await transport.close();
    }
  });

  await t.step("accepted sockets have TCP_NODELAY (inherited from the listener)", async () => {
    const lib = Deno.dlopen("libc.so.6", {
      getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
    });
    const { transport, sockets } = await server();
    const c = await client("127.0.0.1", transport.port);
    try {
      await until(() => sockets.length === 1, "accept");
      const fd = (sockets[0] as unknown as { fd: number }).fd;
      const value = new Uint8Array(4);
      assert.equal(lib.symbols.getsockopt(fd, 6, 1, value, new Uint8Array([4, 0, 0, 0])), 0);
      assert.equal(value[0], 1);
    } finally {
      c.socket.destroy();
      await transport.close();
      lib.close();
    }
  });

  await t.step(
    "near the descriptor limit connections are refused, then accepted again",
    async () => {
      // A child with 40 descriptors (~23 in use by Deno): the transport keeps 10 free, closes what it
      // cannot keep, and accepts again once connections close. The child must not fail.
      const module = new URL("../transport/tcp_ffi.ts", import.meta.url).href;
      const code = `
      const { listenTcpReusePort } = await import(${JSON.stringify(module)});
      const socks = [];
      const t = await listenTcpReusePort("127.0.0.1", 0, (s) => {
        socks.push(s);
        s.on("data", (c) => s.write(c));
      });
      console.log("ready " + t.port);
      for await (const chunk of Deno.stdin.readable) {
        const cmd = new TextDecoder().decode(chunk).trim();
        if (cmd === "free") { for (const s of socks.splice(0)) s.destroy(); }
        console.log("stats " + t.connections + " " + t.refused + " " + t.loopErrors);
      }
      await t.close();
    `;
      const child = new Deno.Command("sh", {
        args: ["-c", `ulimit -n 40 && exec "$0" eval "$1"`, Deno.execPath(), code],
        stdin: "piped",
        stdout: "piped",
        stderr: "inherit",
      }).spawn();
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      const writer = child.stdin.getWriter();
      const line = async () => {
        const r = await reader.read();
        if (r.done) throw new Error("child ended early");
        return r.value.trim().split(" ");
      };
      const clients: Awaited<ReturnType<typeof client>>[] = [];
      try {
        const port = Number((await line())[1]);
        for (let i = 0; i < 30; i++) clients.push(await client("127.0.0.1", port));
        await until(() => clients.filter((c) => c.closed).length >= 20, "refused ones closed");
        await writer.write(encoder.encode("stats\n"));
        const [, open, refused, loopErrors] = (await line()).map(Number);
        assert.ok(open! > 0 && open! < 15, `the child kept a few (${open} open)`);
        assert.equal(open! + refused!, 30, "the others were refused");
        assert.equal(loopErrors, 0);
        await writer.write(encoder.encode("free\n"));
        await line();
        const again = await client("127.0.0.1", port);
        clients.push(again);
        again.socket.write("again");
        await until(() => again.text() === "again", "a new connection is served");
      } finally {
        for (const c of clients) c.socket.destroy();
        await writer.close().catch(() => {});
        await reader.cancel().catch(() => {});
        try {
          child.kill();
        } catch { /* ended */ }
        await child.status;
      }
    },
  );
});

Deno.test("tcp_ffi: binding, closing and descriptors", async (t) => {
  await t.step("close releases the port; accepted connections stay open", async () => {
    const { transport, sockets } = await server("127.0.0.1", 0, (s) => {
      s.on("data", (chunk) => s.write(chunk));
    });
    const port = transport.port;
    assert.equal(canBindPlain("127.0.0.1", port), false, "held while open");
    const c = await client("127.0.0.1", port);
    await until(() => sockets.length === 1, "accept");
    await transport.close();
    // The accepted connection still works after the listener is gone.
    c.socket.write("still here");
    await until(() => c.text() === "still here", "echo after close");
    await assert.rejects(client("127.0.0.1", port), "no longer accepting");
    c.socket.destroy();
    await until(() => transport.connections === 0, "connection closed");
    assert.equal(canBindPlain("127.0.0.1", port), true, "free after close");
    await transport.close(); // a second close is harmless
  });

  await t.step(
    "two listeners in one process share a port; a plain holder gives EADDRINUSE",
    async () => {
      const a = await listenTcpReusePort("127.0.0.1", 0, () => {});
      const b = await listenTcpReusePort("127.0.0.1", a.port, () => {});
      assert.equal(b.port, a.port);
      await a.close();
      await b.close();
      const plain = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      try {
        await assert.rejects(
          listenTcpReusePort("127.0.0.1", (plain.addr as Deno.NetAddr).port, () => {}),
          (e: Error & { code?: string }) => e.code === "EADDRINUSE",
        );
      } finally {
        plain.close();
      }
    },
  );

  await t.step("1,000 connections accepted and closed without a descriptor leak", async () => {
    const before = openFds();
    let closes = 0;
    const { transport, sockets } = await server("127.0.0.1", 0, (s) => {
      s.on("data", (chunk) => s.write(chunk));
      s.on("close", () => closes++);
    });
    const clients: Awaited<ReturnType<typeof client>>[] = [];
    for (let i = 0; i < 1000; i += 100) {
      clients.push(
        ...await Promise.all(
          Array.from({ length: 100 }, () => client("127.0.0.1", transport.port)),
        ),
      );
    }
    await until(() => transport.connections === 1000, "1,000 accepted");
    assert.equal(new Set(sockets.map((s) => s.remotePort)).size, 1000);
    // Half are closed by the clients, a quarter by destroy(), a quarter by end().
    clients.slice(0, 500).forEach((c) => c.socket.end());
    sockets.slice(500, 750).forEach((s) => s.destroy());
    sockets.slice(750).forEach((s) => s.end());
    await until(() => closes === 1000 && clients.every((c) => c.closed), "all closed", 10000);
    assert.equal(transport.connections, 0);
    await transport.close();
    await sleep(50);
    assert.equal(openFds(), before, "as many descriptors open as before");
  });
});

/** A `deno eval` child answering each connection with `TAG`; reports its port, then its count. */
function spawnServer(tag: string, port: number) {
  const module = new URL("../transport/tcp_ffi.ts", import.meta.url).href;
  const code = `
    const { listenTcpReusePort } = await import(${JSON.stringify(module)});
    let n = 0;
    const t = await listenTcpReusePort("127.0.0.1", ${port}, (s) => {
      n++;
      s.write(${JSON.stringify(tag)});
      s.end();
    });
    console.log("ready " + t.port);
    for await (const _ of Deno.stdin.readable) { /* until the test closes stdin */ }
    await t.close();
    console.log("count " + n);
  `;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", code],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  const line = async (): Promise<string> => {
    while (!buffered.includes("\n")) {
      const r = await reader.read();
      if (r.done) throw new Error(`child ${tag} ended early`);
      buffered += r.value;
    }
    const at = buffered.indexOf("\n");
    const out = buffered.slice(0, at);
    buffered = buffered.slice(at + 1);
    return out;
  };
  return {
    child,
    line,
    async stop(): Promise<string> {
      await child.stdin.close();
      const last = await line();
      await reader.cancel();
      await child.status;
      return last;
    },
  };
}

Deno.test("tcp_ffi: two processes share one port through SO_REUSEPORT", async () => {
  const a = spawnServer("A", 0);
  let b: ReturnType<typeof spawnServer> | undefined;
  try {
    const port = Number((await a.line()).split(" ")[1]);
    b = spawnServer("B", port);
    assert.equal(Number((await b.line()).split(" ")[1]), port);
    const tags: string[] = [];
    for (let i = 0; i < 40; i++) {
      const c = await client("127.0.0.1", port);
      await until(() => c.closed, "answer and FIN");
      tags.push(c.text());
    }
    const fromA = tags.filter((x) => x === "A").length;
    const fromB = tags.filter((x) => x === "B").length;
    assert.equal(fromA + fromB, 40);
    assert.ok(fromA > 0 && fromB > 0, `both processes accepted (A ${fromA}, B ${fromB})`);
    assert.equal(await a.stop(), `count ${fromA}`);
    assert.equal(await b.stop(), `count ${fromB}`);
    b = undefined;
    assert.equal(canBindPlain("127.0.0.1", port), true, "port free once both closed");
  } finally {
    for (const p of [a, b]) {
      if (!p) continue;
      try {
        p.child.kill();
      } catch { /* already ended */ }
      await p.child.status.catch(() => {});
    }
  }
});
