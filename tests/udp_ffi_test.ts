/**
 * Tests of the FFI UDP transport (`transport/udp_ffi.ts`): echo over IPv4 and IPv6, the source
 * address and port it decodes, datagrams of every size, bursts, two processes sharing one port with
 * SO_REUSEPORT, and a close that releases the port. Peers are `node:dgram` sockets, so the code under
 * test does not check itself.
 */
import assert from "node:assert/strict";
import dgram from "node:dgram";
import { listenUdpReusePort } from "../transport/udp_ffi.ts";
import type { Source } from "../sip/message.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A `node:dgram` socket bound on host:0 that collects what it receives. */
async function peer(host: string): Promise<{
  socket: dgram.Socket;
  port: number;
  next(timeoutMs?: number): Promise<{ text: string; bytes: Uint8Array; port: number }>;
  close(): Promise<void>;
}> {
  const socket = dgram.createSocket(host.includes(":") ? "udp6" : "udp4");
  const queue: { text: string; bytes: Uint8Array; port: number }[] = [];
  const waiting: ((m: { text: string; bytes: Uint8Array; port: number }) => void)[] = [];
  socket.on("message", (msg: Uint8Array, rinfo: dgram.RemoteInfo) => {
    const m = { text: decoder.decode(msg), bytes: new Uint8Array(msg), port: rinfo.port };
    const w = waiting.shift();
    if (w) w(m);
    else queue.push(m);
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(0, host, () => resolve());
  });
  return {
    socket,
    port: socket.address().port,
    next(timeoutMs = 3000) {
      const ready = queue.shift();
      if (ready) return Promise.resolve(ready);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("no datagram in time")), timeoutMs);
        waiting.push((m) => {
          clearTimeout(timer);
          resolve(m);
        });
      });
    },
    close: () => new Promise((done) => socket.close(() => done())),
  };
}

function sendFrom(socket: dgram.Socket, bytes: Uint8Array, host: string, port: number): void {
  socket.send(bytes, port, host);
}

/** Whether this machine can bind UDP on ::1. */
async function hasIpv6(): Promise<boolean> {
  try {
    const p = await peer("::1");
    await p.close();
    return true;
  } catch {
    return false;
  }
}

/** Whether a plain (non-SO_REUSEPORT) `node:dgram` socket can bind host:port. */
async function canBindPlain(host: string, port: number): Promise<boolean> {
  const socket = dgram.createSocket(host.includes(":") ? "udp6" : "udp4");
  const ok = await new Promise<boolean>((resolve) => {
    socket.once("error", () => resolve(false));
    socket.bind(port, host, () => resolve(true));
  });
  await new Promise<void>((done) => {
    try {
      socket.close(() => done());
    } catch {
      done(); // never bound
    }
  });
  return ok;
}

/** An echo server on host:port that records the sources it saw. */
async function echoServer(host: string, port = 0) {
  const sources: Source[] = [];
  const transport = await listenUdpReusePort(host, port, (bytes, source) => {
    sources.push(source);
    transport.send(bytes, source.address, source.port);
  });
  return { transport, sources };
}

Deno.test("udp_ffi: echo, source decoding, sizes and bursts", async (t) => {
  const v6 = await hasIpv6();

  await t.step("IPv4 echo; source address and port decoded", async () => {
    const { transport, sources } = await echoServer("127.0.0.1");
    const client = await peer("127.0.0.1");
    try {
      assert.equal(transport.address, "127.0.0.1");
      assert.ok(transport.port > 0);
      sendFrom(client.socket, encoder.encode("hello v4"), "127.0.0.1", transport.port);
      const echo = await client.next();
      assert.equal(echo.text, "hello v4");
      assert.equal(echo.port, transport.port);
      assert.deepEqual(sources[0], {
        transport: "udp",
        address: "127.0.0.1",
        port: client.port,
        flowId: 0,
        localAddress: "127.0.0.1",
        localPort: transport.port,
      });
      assert.equal(transport.sendErrors, 0);
    } finally {
      await client.close();
      await transport.close();
    }
  });

  await t.step({
    name: "IPv6 echo on ::1; source address and port decoded",
    ignore: !v6,
    fn: async () => {
      const { transport, sources } = await echoServer("::1");
      const client = await peer("::1");
      try {
        assert.equal(transport.address, "::1");
        sendFrom(client.socket, encoder.encode("hello v6"), "::1", transport.port);
        assert.equal((await client.next()).text, "hello v6");
        assert.equal(sources[0]?.address, "::1");
        assert.equal(sources[0]?.port, client.port);
        assert.equal(sources[0]?.localAddress, "::1");
      } finally {
        await client.close();
        await transport.close();
      }
    },
  });

  await t.step({
    name: "dual-stack :: socket sees an IPv4 peer as ::ffff:a.b.c.d and answers it",
    ignore: !v6,
    fn: async () => {
      const { transport, sources } = await echoServer("::");
      const client = await peer("127.0.0.1");
      try {
        assert.equal(transport.address, "::");
        sendFrom(client.socket, encoder.encode("mapped"), "127.0.0.1", transport.port);
        assert.equal((await client.next()).text, "mapped");
        assert.equal(sources[0]?.address, "::ffff:127.0.0.1");
        assert.equal(sources[0]?.port, client.port);
        // A plain IPv4 address given to send() on the dual-stack socket works too.
        transport.send(encoder.encode("plain v4"), "127.0.0.1", client.port);
        assert.equal((await client.next()).text, "plain v4");
        assert.equal(transport.sendErrors, 0);
      } finally {
        await client.close();
        await transport.close();
      }
    },
  });

  await t.step("datagrams of 0 bytes up to 65,000 bytes arrive whole", async () => {
    const { transport } = await echoServer("127.0.0.1");
    const client = await peer("127.0.0.1");
    try {
      for (const size of [0, 1, 1500, 9000, 65000]) {
        const bytes = new Uint8Array(size).map((_, i) => (i * 7 + size) & 0xff);
        sendFrom(client.socket, bytes, "127.0.0.1", transport.port);
        const echo = await client.next();
        assert.equal(echo.bytes.length, size);
        assert.deepEqual(echo.bytes, bytes);
      }
    } finally {
      await client.close();
      await transport.close();
    }
  });

  await t.step("a burst of 60 datagrams is received in order, each a copy of its own", async () => {
    const got: Uint8Array[] = [];
    const transport = await listenUdpReusePort("127.0.0.1", 0, (bytes) => got.push(bytes.slice()));
    const client = await peer("127.0.0.1");
    try {
      // node:dgram under Deno sends a burst of unawaited send() calls in reverse order: await each.
      for (let i = 0; i < 60; i++) {
        await new Promise((sent) =>
          client.socket.send(encoder.encode(`n${i}`), transport.port, "127.0.0.1", sent)
        );
      }
      const deadline = Date.now() + 3000;
      while (got.length < 60 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      assert.deepEqual(
        got.map((b) => decoder.decode(b)),
        Array.from({ length: 60 }, (_, i) => `n${i}`),
      );
    } finally {
      await client.close();
      await transport.close();
    }
  });

  await t.step("send never throws: bad address, bad port and after close are counted", async () => {
    const transport = await listenUdpReusePort("127.0.0.1", 0, () => {});
    transport.send(encoder.encode("x"), "not an address", 5060);
    transport.send(encoder.encode("x"), "127.0.0.1", 0);
    transport.send(encoder.encode("x"), "::1", 5060); // IPv6 peer of an IPv4 socket
    assert.equal(transport.sendErrors, 3);
    await transport.close();
    transport.send(encoder.encode("x"), "127.0.0.1", 9);
    assert.equal(transport.sendErrors, 4);
    if (v6) {
      const six = await listenUdpReusePort("::1", 0, () => {});
      six.send(encoder.encode("x"), "fe80::1%eth0", 5060); // zones are interface indexes
      six.send(encoder.encode("x"), "127.0.0.1%1", 5060);
      assert.equal(six.sendErrors, 2);
      await six.close();
    }
    await transport.close(); // a second close is harmless
  });

  await t.step("an exception in onDatagram does not stop the receive loop", async () => {
    let calls = 0;
    const errors: unknown[] = [];
    const onError = (e: ErrorEvent) => {
      e.preventDefault();
      errors.push(e.error);
    };
    globalThis.addEventListener("error", onError);
    const transport = await listenUdpReusePort("127.0.0.1", 0, () => {
      calls++;
      throw new Error("handler failed");
    });
    const client = await peer("127.0.0.1");
    try {
      for (let i = 0; i < 2; i++) {
        sendFrom(client.socket, encoder.encode("boom"), "127.0.0.1", transport.port);
        const deadline = Date.now() + 3000;
        while (calls <= i && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      }
      assert.equal(calls, 2);
      assert.equal(errors.length, 2);
    } finally {
      globalThis.removeEventListener("error", onError);
      await client.close();
      await transport.close();
    }
  });
});

Deno.test("udp_ffi: binding and closing", async (t) => {
  await t.step("close releases the port", async () => {
    const { transport } = await echoServer("127.0.0.1");
    const port = transport.port;
    assert.equal(await canBindPlain("127.0.0.1", port), false, "held while open");
    await transport.close();
    assert.equal(await canBindPlain("127.0.0.1", port), true, "free after close");
  });

  await t.step("two sockets in one process can bind the same port", async () => {
    const a = await listenUdpReusePort("127.0.0.1", 0, () => {});
    const b = await listenUdpReusePort("127.0.0.1", a.port, () => {});
    assert.equal(b.port, a.port);
    await a.close();
    await b.close();
  });

  await t.step("a port held without SO_REUSEPORT rejects with EADDRINUSE", async () => {
    const plain = dgram.createSocket("udp4");
    await new Promise<void>((resolve) => plain.bind(0, "127.0.0.1", () => resolve()));
    const port = plain.address().port;
    try {
      await assert.rejects(
        listenUdpReusePort("127.0.0.1", port, () => {}),
        (e: Error & { code?: string }) => e.code === "EADDRINUSE",
      );
    } finally {
      await new Promise<void>((done) => plain.close(() => done()));
    }
  });

  await t.step("a host name is resolved", async () => {
    const transport = await listenUdpReusePort("localhost", 0, () => {});
    assert.ok(transport.address === "127.0.0.1" || transport.address === "::1");
    await transport.close();
  });
});

/** A `deno eval` child echoing `TAG:payload` on host:port; reports its port, then its count. */
function spawnEcho(tag: string, host: string, port: number) {
  const module = new URL("../transport/udp_ffi.ts", import.meta.url).href;
  const code = `
    const { listenUdpReusePort } = await import(${JSON.stringify(module)});
    const enc = new TextEncoder();
    let n = 0;
    const t = await listenUdpReusePort(${JSON.stringify(host)}, ${port}, (bytes, src) => {
      n++;
      const out = new Uint8Array(bytes.length + 2);
      out.set(enc.encode(${JSON.stringify(tag + ":")}));
      out.set(bytes, 2);
      t.send(out, src.address, src.port);
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

Deno.test("udp_ffi: two processes share one port through SO_REUSEPORT", async () => {
  const a = spawnEcho("A", "127.0.0.1", 0);
  let b: ReturnType<typeof spawnEcho> | undefined;
  const clients: Awaited<ReturnType<typeof peer>>[] = [];
  try {
    const port = Number((await a.line()).split(" ")[1]);
    b = spawnEcho("B", "127.0.0.1", port);
    assert.equal(Number((await b.line()).split(" ")[1]), port);
    // The kernel picks the socket by a hash of the 4-tuple: many source sockets reach both.
    for (let i = 0; i < 40; i++) clients.push(await peer("127.0.0.1"));
    const tags: string[] = [];
    for (const c of clients) sendFrom(c.socket, encoder.encode(`c${c.port}`), "127.0.0.1", port);
    for (const c of clients) {
      const echo = await c.next();
      assert.equal(echo.text.slice(2), `c${c.port}`, "each echo comes back to its own socket");
      tags.push(echo.text.slice(0, 1));
      // The same source socket stays with the same process.
      sendFrom(c.socket, encoder.encode("again"), "127.0.0.1", port);
      assert.equal((await c.next()).text, `${echo.text.slice(0, 1)}:again`);
    }
    const fromA = tags.filter((x) => x === "A").length;
    const fromB = tags.filter((x) => x === "B").length;
    assert.equal(fromA + fromB, 40);
    assert.ok(fromA > 0 && fromB > 0, `both processes received (A ${fromA}, B ${fromB})`);
    assert.equal(await a.stop(), `count ${fromA * 2}`);
    assert.equal(await b.stop(), `count ${fromB * 2}`);
    b = undefined;
    assert.equal(await canBindPlain("127.0.0.1", port), true, "port free once both closed");
  } finally {
    for (const c of clients) await c.close();
    for (const p of [a, b]) {
      if (!p) continue;
      try {
        p.child.kill();
      } catch { /* already ended */ }
      await p.child.status.catch(() => {});
    }
  }
});
