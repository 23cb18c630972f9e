import assert from "node:assert/strict";
import { type FrameItem, StreamFramer } from "../sip/frame.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
const fixture = (name: string): Uint8Array =>
  Deno.readFileSync(new URL(`./fixtures/sip/${name}`, import.meta.url));

const FIXTURES = [
  "register.txt",
  "invite_body.txt",
  "compact.txt",
  "response.txt",
  "wsinv.txt",
  "escnull.txt",
];

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Items as comparable text: message bytes decoded as latin1-ish. */
function show(items: readonly FrameItem[]): string[] {
  return items.map((i) =>
    i.type === "message"
      ? "message:" + dec.decode(i.bytes)
      : i.type === "error"
      ? "error:" + i.reason
      : "ping"
  );
}

function feed(framer: StreamFramer, chunks: Uint8Array[]): FrameItem[] {
  const out: FrameItem[] = [];
  for (const c of chunks) out.push(...framer.push(c));
  return out;
}

/** Strips the leading CRLFs a fixture may have (RFC 3261 §7.5). */
function trimmed(b: Uint8Array): Uint8Array {
  let i = 0;
  while (b[i] === 13 || b[i] === 10) i++;
  return b.subarray(i);
}

Deno.test("StreamFramer frames messages at every split point (RFC 3261 §18.3)", async (t) => {
  for (const name of FIXTURES) {
    await t.step(name, () => {
      const bytes = fixture(name);
      // Leading CRLFCRLFs are keep-alive pings on a stream (compact.txt starts with one).
      const pings = Array<string>(Math.floor((bytes.length - trimmed(bytes).length) / 4)).fill(
        "ping",
      );
      const expected = [...pings, "message:" + dec.decode(trimmed(bytes))];
      for (let cut = 0; cut <= bytes.length; cut++) {
        const f = new StreamFramer();
        const got = feed(f, [bytes.subarray(0, cut), bytes.subarray(cut)]);
        assert.deepEqual(show(got), expected, `split at ${cut}`);
        assert.equal(f.pendingSince, 0);
        assert.equal(f.bufferedBytes, 0);
      }
    });
  }
  await t.step("two cuts over two messages back to back", () => {
    const a = fixture("invite_body.txt");
    const b = fixture("register.txt");
    const all = concat(a, b);
    const expected = ["message:" + dec.decode(a), "message:" + dec.decode(b)];
    for (let i = 0; i <= all.length; i += 7) {
      for (let j = i; j <= all.length; j += 13) {
        const got = feed(new StreamFramer(), [
          all.subarray(0, i),
          all.subarray(i, j),
          all.subarray(j),
        ]);
        assert.deepEqual(show(got), expected, `cuts at ${i}, ${j}`);
      }
    }
  });
  await t.step("byte by byte", () => {
    const all = concat(fixture("invite_body.txt"), enc.encode("\r\n\r\n"), fixture("wsinv.txt"));
    const f = new StreamFramer();
    const got = feed(f, [...all].map((b) => Uint8Array.of(b)));
    assert.deepEqual(show(got), [
      "message:" + dec.decode(fixture("invite_body.txt")),
      "ping",
      "message:" + dec.decode(fixture("wsinv.txt")),
    ]);
  });
});

Deno.test("StreamFramer several messages in one chunk, without copies (RFC 3261 §18.3)", () => {
  const parts = FIXTURES.map((n) => trimmed(fixture(n)));
  const all = concat(...parts);
  const got = new StreamFramer().push(all);
  assert.deepEqual(show(got), parts.map((p) => "message:" + dec.decode(p)));
  for (const item of got) {
    assert.equal(
      item.type === "message" && item.bytes.buffer,
      all.buffer,
      "a subarray of the chunk",
    );
  }
});

Deno.test("StreamFramer keep-alives (RFC 5626 §4.4.1, RFC 3261 §7.5)", async (t) => {
  await t.step("CRLFCRLF is a ping", () => {
    assert.deepEqual(show(new StreamFramer().push(enc.encode("\r\n\r\n"))), ["ping"]);
    assert.deepEqual(show(new StreamFramer().push(enc.encode("\r\n\r\n\r\n\r\n"))), [
      "ping",
      "ping",
    ]);
  });
  await t.step("a ping split across chunks", () => {
    const f = new StreamFramer();
    assert.deepEqual(show(feed(f, [enc.encode("\r"), enc.encode("\n\r"), enc.encode("\n")])), [
      "ping",
    ]);
    assert.equal(f.pendingSince, 0);
  });
  await t.step("a single CRLF (pong) is ignored", () => {
    const f = new StreamFramer();
    assert.deepEqual(f.push(enc.encode("\r\n")), []);
    const reg = fixture("register.txt");
    assert.deepEqual(show(f.push(reg)), ["message:" + dec.decode(reg)]);
  });
  await t.step("pings between messages", () => {
    const reg = fixture("register.txt");
    const all = concat(
      enc.encode("\r\n\r\n"),
      reg,
      enc.encode("\r\n\r\n"),
      reg,
      enc.encode("\r\n"),
    );
    assert.deepEqual(show(new StreamFramer().push(all)), [
      "ping",
      "message:" + dec.decode(reg),
      "ping",
      "message:" + dec.decode(reg),
    ]);
  });
});

Deno.test("StreamFramer limits and errors (RFC 3261 §18.3, §20.14)", async (t) => {
  const head = "MESSAGE sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nCall-ID: c\r\n";
  await t.step("missing Content-Length over a stream is an error (§20.14)", () => {
    assert.deepEqual(show(new StreamFramer().push(enc.encode(head + "\r\n"))), [
      "error:missing-content-length",
    ]);
  });
  await t.step("malformed Content-Length is an error", () => {
    for (const v of ["abc", "-1", "", "1 2", "5x"]) {
      const f = new StreamFramer();
      assert.deepEqual(show(f.push(enc.encode(head + `Content-Length: ${v}\r\n\r\n`))), [
        "error:bad-content-length",
      ], v);
      assert.equal(f.failed, true);
      assert.deepEqual(f.push(fixture("register.txt")), [], "stopped after an error");
    }
  });
  await t.step("conflicting Content-Length values are an error", () => {
    const f = new StreamFramer();
    assert.deepEqual(show(f.push(enc.encode(head + "Content-Length: 1\r\nl: 2\r\n\r\nab"))), [
      "error:bad-content-length",
    ]);
  });
  await t.step("compact l: and odd spacing are read", () => {
    const msg = head + "l  :   3  \r\n\r\nabc";
    assert.deepEqual(show(new StreamFramer().push(enc.encode(msg))), ["message:" + msg]);
  });
  await t.step("Content-Length over the limit", () => {
    const f = new StreamFramer({ maxMessageSize: 1000 });
    assert.deepEqual(show(f.push(enc.encode(head + "Content-Length: 2000\r\n\r\n"))), [
      "error:message-too-large",
    ]);
  });
  await t.step("headers that never end, over the limit, in one chunk or many", () => {
    const big = enc.encode(head + "X: " + "a".repeat(2000));
    assert.deepEqual(show(new StreamFramer({ maxMessageSize: 1000 }).push(big)), [
      "error:message-too-large",
    ]);
    const f = new StreamFramer({ maxMessageSize: 1000 });
    const chunks: Uint8Array[] = [];
    for (let i = 0; i < big.length; i += 100) chunks.push(big.subarray(i, i + 100));
    assert.deepEqual(show(feed(f, chunks)), ["error:message-too-large"]);
  });
  await t.step("a message of exactly the limit passes", () => {
    const reg = fixture("register.txt");
    const f = new StreamFramer({ maxMessageSize: reg.length });
    assert.deepEqual(show(feed(f, [reg.subarray(0, 10), reg.subarray(10)])), [
      "message:" + dec.decode(reg),
    ]);
  });
});

Deno.test("StreamFramer pendingSince and idle memory (RFC 3261 §18.3 timeouts)", () => {
  let now = 1000;
  const f = new StreamFramer({ now: () => now });
  const reg = fixture("invite_body.txt");
  assert.equal(f.pendingSince, 0);
  f.push(reg.subarray(0, 50));
  assert.equal(f.pendingSince, 1000);
  now = 2000;
  f.push(reg.subarray(50, reg.length - 10));
  assert.equal(f.pendingSince, 1000, "the start of the partial message");
  assert.equal(f.bufferedBytes, reg.length - 10);
  const done = f.push(reg.subarray(reg.length - 10));
  assert.equal(done.length, 1);
  assert.equal(f.pendingSince, 0);
  assert.equal(f.bufferedBytes, 0);
});

Deno.test("StreamFramer random chunking of a long stream (RFC 3261 §18.3, RFC 5626 §4.4.1)", () => {
  let x = 0x9e3779b9;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const pieces = FIXTURES.map((n) => trimmed(fixture(n)));
  let lone = 0;
  for (let round = 0; round < 300; round++) {
    const parts: Uint8Array[] = [];
    const expected: string[] = [];
    // CRLFs between messages pair up: every second one completes a CRLFCRLF ping.
    let crlfs = 0;
    for (let k = 0; k < 8; k++) {
      const r = rnd() % 6;
      if (r === 0 || r === 1) {
        const ping = r === 0;
        parts.push(enc.encode(ping ? "\r\n\r\n" : "\r\n"));
        if (!ping) lone++;
        for (let c = ping ? 2 : 1; c > 0; c--) {
          if (++crlfs === 2) {
            expected.push("ping");
            crlfs = 0;
          }
        }
      } else {
        const p = pieces[rnd() % pieces.length]!;
        parts.push(p);
        expected.push("message:" + dec.decode(p));
        crlfs = 0;
      }
    }
    const all = concat(...parts);
    const chunks: Uint8Array[] = [];
    for (let i = 0; i < all.length;) {
      const size = 1 + rnd() % 700;
      chunks.push(all.slice(i, i + size));
      i += size;
    }
    const f = new StreamFramer();
    assert.deepEqual(show(feed(f, chunks)), expected, `round ${round}`);
    assert.equal(f.pendingSince, 0);
  }
  assert.ok(lone > 100, "lone CRLFs were exercised");
});

Deno.test("StreamFramer never throws on junk (RFC 3261 §18.3)", () => {
  let x = 0x7f4a7c15;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const base = fixture("invite_body.txt");
  for (let n = 0; n < 2000; n++) {
    const f = new StreamFramer({ maxMessageSize: 300 + rnd() % 600 });
    const b = base.slice();
    for (let k = rnd() % 8; k > 0; k--) {
      b[rnd() % b.length] = [10, 13, 32, 58, 0x6c, 0x30][rnd() % 6]!;
    }
    for (let i = 0; i < b.length;) {
      const size = 1 + rnd() % 200;
      for (const item of f.push(b.subarray(i, i + size))) {
        if (item.type === "message") assert.ok(item.bytes.length <= 900);
      }
      i += size;
    }
  }
});
