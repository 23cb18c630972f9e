import assert from "node:assert/strict";
import { parseMessage } from "../sip/parse.ts";
import {
  buildResponse,
  canonicalHeaderName,
  quickResponse,
  serializeRequest,
} from "../sip/serialize.ts";
import { header, headerAll, tagOf } from "../sip/headers.ts";
import type { SipMessage, SipRequest } from "../sip/message.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
const fixture = (name: string): Uint8Array =>
  Deno.readFileSync(new URL(`./fixtures/sip/${name}`, import.meta.url));

function parse(bytes: Uint8Array): SipMessage {
  const r = parseMessage(bytes);
  if (!r.ok) assert.fail(r.reason);
  return r.value;
}

function request(bytes: Uint8Array): SipRequest {
  const m = parse(bytes);
  assert.equal(m.kind, "request");
  return m as SipRequest;
}

const TWO_VIAS = [
  "REGISTER sip:example.com SIP/2.0",
  "Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1, SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKp0",
  "v: SIP/2.0/TCP 192.0.2.7:5060;branch=z9hG4bKc;rport",
  "Max-Forwards: 69",
  "t: Bob <sip:bob@example.com>",
  "f: Bob <sip:bob@example.com>;tag=ff1",
  "i: call-1@host",
  "CSeq: 7 REGISTER",
  "Contact: <sip:bob@192.0.2.7>",
  "l: 0",
  "",
  "",
].join("\r\n");

Deno.test("buildResponse() (RFC 3261 §8.2.6.2)", async (t) => {
  await t.step(
    "copies Via (in order), From, To, Call-ID, CSeq; adds To tag; Content-Length",
    () => {
      const req = request(enc.encode(TWO_VIAS));
      const out = buildResponse(req, 200, "OK", {
        toTag: "srv1",
        headers: [["contact", "<sip:bob@192.0.2.7>;expires=3600"], [
          "date",
          "Sat, 13 Nov 2010 23:29:00 GMT",
        ]],
      });
      const text = dec.decode(out);
      assert.equal(
        text,
        [
          "SIP/2.0 200 OK",
          "Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1, SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKp0",
          "Via: SIP/2.0/TCP 192.0.2.7:5060;branch=z9hG4bKc;rport",
          "From: Bob <sip:bob@example.com>;tag=ff1",
          "To: Bob <sip:bob@example.com>;tag=srv1",
          "Call-ID: call-1@host",
          "CSeq: 7 REGISTER",
          "Contact: <sip:bob@192.0.2.7>;expires=3600",
          "Date: Sat, 13 Nov 2010 23:29:00 GMT",
          "Content-Length: 0",
          "",
          "",
        ].join("\r\n"),
      );
      const back = parse(out);
      assert.equal(back.kind, "response");
      assert.deepEqual(headerAll(back, "via").length, 3);
    },
  );
  await t.step("topVia replaces the first Via value only (RFC 3581 §4)", () => {
    const req = request(enc.encode(TWO_VIAS));
    const top = "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1;received=192.0.2.1";
    const back = parse(buildResponse(req, 100, "Trying", { topVia: top }));
    assert.deepEqual(headerAll(back, "via"), [
      top,
      "SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKp0",
      "SIP/2.0/TCP 192.0.2.7:5060;branch=z9hG4bKc;rport",
    ]);
  });
  await t.step("an existing To tag is kept, not doubled (§8.2.6.2)", () => {
    const req = request(
      enc.encode(
        TWO_VIAS.replace("t: Bob <sip:bob@example.com>", "t: <sip:bob@example.com>;tag=old"),
      ),
    );
    const back = parse(buildResponse(req, 200, "OK", { toTag: "new" }));
    assert.equal(header(back, "to"), "<sip:bob@example.com>;tag=old");
  });
  await t.step("no toTag: To copied as is", () => {
    const back = parse(buildResponse(request(enc.encode(TWO_VIAS)), 400, "Bad Request"));
    assert.equal(tagOf(header(back, "to")!), null);
  });
  await t.step("body and canonical header names (WWW-Authenticate, Call-ID, CSeq)", () => {
    const req = request(fixture("register.txt"));
    const body = enc.encode("hello");
    const out = buildResponse(req, 401, "Unauthorized", {
      toTag: "x",
      headers: [["www-authenticate", 'Digest realm="a", nonce="b", algorithm=SHA-256'], [
        "content-type",
        "text/plain",
      ]],
      body,
    });
    const text = dec.decode(out);
    assert.match(text, /\r\nWWW-Authenticate: Digest realm="a", nonce="b", algorithm=SHA-256\r\n/);
    assert.match(text, /\r\nCall-ID: /);
    assert.match(text, /\r\nCSeq: 1826 REGISTER\r\n/);
    assert.ok(text.endsWith("Content-Length: 5\r\n\r\nhello"));
    assert.equal(dec.decode(parse(out).body), "hello");
  });
  await t.step("canonicalHeaderName()", () => {
    assert.equal(canonicalHeaderName("call-id"), "Call-ID");
    assert.equal(canonicalHeaderName("CSEQ"), "CSeq");
    assert.equal(canonicalHeaderName("X-Custom"), "X-Custom");
  });
});

Deno.test("serializeRequest() (RFC 3261 §7.1)", async (t) => {
  await t.step("round trip through parseMessage", () => {
    const body = enc.encode("v=0\r\n");
    const out = serializeRequest("MESSAGE", "sip:bob@example.com", [
      ["via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK9"],
      ["to", "<sip:bob@example.com>"],
      ["from", "<sip:alice@example.com>;tag=1"],
      ["call-id", "c1"],
      ["cseq", "1 MESSAGE"],
    ], body);
    const m = request(out);
    assert.equal(m.method, "MESSAGE");
    assert.equal(header(m, "content-length"), "5");
    assert.equal(dec.decode(m.body), "v=0\r\n");
    assert.match(dec.decode(out), /^MESSAGE sip:bob@example.com SIP\/2.0\r\nVia: /);
  });
  await t.step("a given Content-Length is kept (for tests of wrong lengths)", () => {
    const out = dec.decode(serializeRequest("OPTIONS", "sip:x", [["Content-Length", "10"]]));
    assert.equal(out, "OPTIONS sip:x SIP/2.0\r\nContent-Length: 10\r\n\r\n");
  });
});

Deno.test("quickResponse() without a full parse (RFC 3261 §8.2.6.2, §21.5.4 503)", async (t) => {
  await t.step("copies the same headers as buildResponse", () => {
    const raw = enc.encode(TWO_VIAS);
    const quick = parse(quickResponse(raw, 503, "Service Unavailable", [["retry-after", "5"]])!);
    const full = parse(
      buildResponse(request(raw), 503, "Service Unavailable", { headers: [["Retry-After", "5"]] }),
    );
    assert.equal(quick.kind === "response" && quick.status, 503);
    for (const name of ["via", "from", "to", "call-id", "cseq", "retry-after", "content-length"]) {
      assert.deepEqual(headerAll(quick, name), headerAll(full, name), name);
    }
    assert.equal(header(quick, "contact"), undefined);
    assert.equal(header(quick, "max-forwards"), undefined);
  });
  await t.step("compact names are kept verbatim", () => {
    const text = dec.decode(quickResponse(enc.encode(TWO_VIAS), 503, "Service Unavailable")!);
    assert.match(text, /\r\nv: SIP\/2.0\/TCP/);
    assert.match(text, /\r\ni: call-1@host\r\n/);
    assert.ok(text.endsWith("Content-Length: 0\r\n\r\n"));
  });
  await t.step("folded lines are copied with their header (§7.3.1)", () => {
    const q = quickResponse(fixture("wsinv.txt"), 503, "Service Unavailable")!;
    const m = parse(q);
    assert.equal(header(m, "cseq"), "0009 INVITE");
    assert.equal(headerAll(m, "via").length, 3);
    assert.equal(m.body.length, 0);
  });
  await t.step("toTag is added when To has none", () => {
    const m = parse(quickResponse(fixture("register.txt"), 503, "Service Unavailable", [], "t1")!);
    assert.equal(tagOf(header(m, "to")!), "t1");
    const m2 = parse(quickResponse(fixture("wsinv.txt"), 503, "Service Unavailable", [], "t1")!);
    assert.equal(tagOf(header(m2, "to")!), "1918181833n");
  });
  await t.step("null without Via or CSeq, or when the input is a response", () => {
    for (const line of ["CSeq: 1 REGISTER\r\n", "Via: SIP/2.0/UDP a;branch=z9hG4bK1\r\n"]) {
      const raw = enc.encode(
        `REGISTER sip:x SIP/2.0\r\n${line}From: <sip:a@x>;tag=1\r\nTo: <sip:a@x>\r\ni: c\r\n\r\n`,
      );
      assert.equal(quickResponse(raw, 503, "x"), null, line);
    }
    assert.equal(quickResponse(fixture("response.txt"), 503, "x"), null);
    assert.equal(quickResponse(new Uint8Array(), 503, "x"), null);
    assert.equal(quickResponse(enc.encode("REGISTER sip:x SIP/2.0"), 503, "x"), null);
  });
  await t.step(
    "a request missing From, To or Call-ID still gets its answer (RFC 4475 §3.3.1)",
    () => {
      const raw = enc.encode(TWO_VIAS.replace("i: call-1@host\r\n", ""));
      const text = dec.decode(quickResponse(raw, 400, "Missing Call-ID header", [], "t9")!);
      assert.match(text, /^SIP\/2\.0 400 Missing Call-ID header\r\n/);
      assert.doesNotMatch(text, /\r\ni:/i);
      const bare = enc.encode("X sip:a SIP/2.0\r\nv: SIP/2.0/UDP a\r\nCSeq: 1 X\r\n\r\n");
      const small = dec.decode(quickResponse(bare, 400, "Bad", [], "t9")!);
      assert.equal(
        small,
        "SIP/2.0 400 Bad\r\nv: SIP/2.0/UDP a\r\nCSeq: 1 X\r\nContent-Length: 0\r\n\r\n",
      );
    },
  );
  await t.step("Via-like names are not confused (Viax:, Tox:)", () => {
    const raw = enc.encode(
      TWO_VIAS.replace("Max-Forwards: 69", "Vias: nope\r\nTox: nope\r\nCSeqx: nope"),
    );
    const text = dec.decode(quickResponse(raw, 503, "x")!);
    assert.doesNotMatch(text, /nope/);
  });
});

Deno.test("quickResponse() never throws on damaged input (RFC 4475 §3.1.2)", () => {
  let x = 0x51ed270b;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const base = enc.encode(TWO_VIAS);
  for (let n = 0; n < 5000; n++) {
    const b = base.slice(0, rnd() % (base.length + 1));
    for (let k = rnd() % 6; k > 0; k--) {
      b[rnd() % Math.max(1, b.length)] = [10, 13, 32, 58, 0x76, 0xff][rnd() % 6]!;
    }
    const out = quickResponse(b, 503, "Service Unavailable", [["Retry-After", "3"]], "t");
    if (out !== null) assert.ok(dec.decode(out).startsWith("SIP/2.0 503 Service Unavailable\r\n"));
  }
});
