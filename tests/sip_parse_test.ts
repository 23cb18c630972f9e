import assert from "node:assert/strict";
import { findHeaderEnd, parseMessage } from "../sip/parse.ts";
import { scanFirstLine } from "../sip/first_line.ts";
import {
  header,
  headerAll,
  parseContacts,
  parseCSeq,
  parseNameAddr,
  parseUri,
  parseVia,
  tagOf,
} from "../sip/headers.ts";
import type { SipMessage, SipRequest } from "../sip/message.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
const fixture = (name: string): Uint8Array =>
  Deno.readFileSync(new URL(`./fixtures/sip/${name}`, import.meta.url));
/** Builds a message from lines joined with CRLF. */
const msg = (...lines: string[]): Uint8Array => enc.encode(lines.join("\r\n"));

function ok(bytes: Uint8Array): SipMessage {
  const r = parseMessage(bytes);
  if (!r.ok) assert.fail(`parse failed: ${r.reason}`);
  return r.value;
}

function req(bytes: Uint8Array): SipRequest {
  const m = ok(bytes);
  assert.equal(m.kind, "request");
  return m as SipRequest;
}

const BASE = [
  "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1",
  "To: <sip:bob@example.com>",
  "From: <sip:bob@example.com>;tag=1",
  "Call-ID: abc@host",
  "CSeq: 1 REGISTER",
  "Max-Forwards: 70",
];

Deno.test("parseMessage() reads a typical REGISTER (RFC 3261 §7, §10.2)", () => {
  const m = req(fixture("register.txt"));
  assert.equal(m.method, "REGISTER");
  assert.equal(m.uri, "sip:registrar.biloxi.example.com");
  assert.equal(m.version, "SIP/2.0");
  assert.equal(m.body.length, 0);
  assert.equal(header(m, "call-id"), "843817637684230@998sdasdh09");
  assert.equal(header(m, "expires"), "7200");
  assert.equal(headerAll(m, "allow").length, 10);
  assert.deepEqual(headerAll(m, "supported"), ["path", "outbound", "gruu"]);
});

Deno.test("parseMessage() start lines (RFC 3261 §7.1, §7.2, §7.5)", async (t) => {
  await t.step("leading CRLFs before the start line are ignored (§7.5)", () => {
    const m = req(fixture("compact.txt"));
    assert.equal(m.uri, "sips:ss2.biloxi.example.com");
  });
  await t.step("version is case-insensitive (§7.1)", () => {
    const m = req(msg("REGISTER sip:example.com sip/2.0", ...BASE, "", ""));
    assert.equal(m.version, "sip/2.0");
  });
  await t.step("another SIP version gives 505 (§8.2.2; RFC 4475 §3.1.2.16)", () => {
    const r = parseMessage(msg("REGISTER sip:example.com SIP/7.0", ...BASE, "", ""));
    assert.equal(r.ok, false);
    if (!r.ok) assert.equal(r.status, 505);
  });
  await t.step("garbage version gives 400", () => {
    const r = parseMessage(msg("REGISTER sip:example.com HTTP/1.1x", ...BASE, "", ""));
    assert.equal(r.ok ? 0 : r.status, 400);
  });
  await t.step("unknown method token parses (RFC 4475 §3.1.1.2 intmeth)", () => {
    const m = req(
      msg(
        "!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0",
        ...BASE.slice(0, 4),
        "CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~",
        "",
        "",
      ),
    );
    assert.equal(m.method, "!interesting-Method0123456789_*+`.%indeed'~");
  });
  await t.step("escaped method is just a token (RFC 4475 §3.1.1.5 esc02)", () => {
    const m = req(
      msg(
        "RE%47IST%45R sip:example.com SIP/2.0",
        ...BASE.slice(0, 4),
        "CSeq: 1 RE%47IST%45R",
        "",
        "",
      ),
    );
    assert.equal(m.method, "RE%47IST%45R");
  });
  await t.step("spaces in the Request-URI are rejected (RFC 4475 §3.1.2.7)", () => {
    const r = parseMessage(msg("REGISTER sip:exa mple.com SIP/2.0", ...BASE, "", ""));
    assert.equal(r.ok, false);
  });
  await t.step("request line with missing parts is rejected (§7.1)", () => {
    assert.equal(parseMessage(msg("REGISTER sip:example.com", ...BASE, "", "")).ok, false);
    assert.equal(parseMessage(msg("REGISTER", ...BASE, "", "")).ok, false);
  });
  await t.step("status line, empty reason phrase (RFC 4475 §3.1.1.13 noreason)", () => {
    const m = ok(msg("SIP/2.0 100 ", ...BASE, "", ""));
    assert.equal(m.kind, "response");
    if (m.kind === "response") {
      assert.equal(m.status, 100);
      assert.equal(m.reason, "");
    }
  });
  await t.step("status line, UTF-8 reason phrase (RFC 4475 §3.1.1.12 unreason)", () => {
    const m = ok(
      msg("SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - простое", ...BASE, "", ""),
    );
    assert.equal(
      m.kind === "response" && m.reason,
      "= 2**3 * 5**2 но сто девяносто девять - простое",
    );
  });
  await t.step("response fixture", () => {
    const m = ok(fixture("response.txt"));
    assert.equal(m.kind === "response" && m.status, 200);
    assert.equal(tagOf(header(m, "to")!), "2493k59kd");
  });
  await t.step("bad status code is rejected (§7.2)", () => {
    assert.equal(parseMessage(msg("SIP/2.0 2000 OK", ...BASE, "", "")).ok, false);
    assert.equal(parseMessage(msg("SIP/2.0 OK", ...BASE, "", "")).ok, false);
    assert.equal(parseMessage(msg("SIP/2.0 099 Low", ...BASE, "", "")).ok, false);
  });
});

Deno.test("parseMessage() headers (RFC 3261 §7.3)", async (t) => {
  await t.step(
    "odd whitespace, folding, mixed case and compact forms (RFC 4475 §3.1.1.1 wsinv)",
    () => {
      const m = req(fixture("wsinv.txt"));
      assert.equal(m.method, "INVITE");
      assert.equal(header(m, "max-forwards"), "0068");
      assert.equal(header(m, "cseq"), "0009 INVITE");
      assert.deepEqual(parseCSeq(header(m, "cseq")!), {
        ok: true,
        value: { seq: 9, method: "INVITE" },
      });
      assert.equal(header(m, "newfangledheader"), "newfangled value continued newfangled value");
      assert.equal(header(m, "subject"), "");
      assert.equal(header(m, "unknownheaderwithunusualvalue"), ";;,,;;,;");
      assert.equal(tagOf(header(m, "to")!), "1918181833n");
      assert.equal(tagOf(header(m, "from")!), "98asjd8");
      const from = parseNameAddr(header(m, "from")!, "From");
      assert.ok(from.ok);
      assert.equal(from.value.displayName, 'J Rosenberg \\"');
      const vias = headerAll(m, "via");
      assert.equal(vias.length, 3);
      const v0 = parseVia(vias[0]!);
      assert.ok(v0.ok);
      assert.equal(v0.value.host, "192.0.2.2");
      assert.equal(v0.value.branch, "390skdjuw");
      const v1 = parseVia(vias[1]!);
      assert.ok(v1.ok);
      assert.equal(v1.value.transport, "TCP");
      assert.equal(v1.value.branch, "z9hG4bK9ikj8");
      const v2 = parseVia(vias[2]!);
      assert.ok(v2.ok);
      assert.equal(v2.value.branch, "z9hG4bK30239");
      const c = parseContacts(m);
      assert.ok(c.ok && !c.value.star);
      if (c.ok && !c.value.star) {
        assert.equal(c.value.contacts[0]?.displayName, 'Quoted string ""');
        assert.equal(c.value.contacts[0]?.params.get("q"), "0.33");
        assert.equal(c.value.contacts[0]?.params.get("secondparam"), null);
      }
      assert.equal(m.body.length, 150);
      assert.ok(dec.decode(m.body).startsWith("v=0\r\n"));
    },
  );
  await t.step("compact forms are expanded (§7.3.3)", () => {
    const m = req(fixture("compact.txt"));
    const names = m.headers.map((h) => h.name);
    assert.deepEqual(names, [
      "via",
      "max-forwards",
      "from",
      "to",
      "call-id",
      "cseq",
      "contact",
      "supported",
      "content-length",
    ]);
    const more = req(
      msg(
        "SUBSCRIBE sip:x@example.com SIP/2.0",
        ...BASE.slice(0, 4),
        "CSeq: 1 SUBSCRIBE",
        "o: presence",
        "u: dialog",
        "r: <sip:c@d>",
        "b: <sip:e@f>",
        "x: 1800",
        "y: abc",
        "a: *;audio",
        "j: *;video",
        "d: proxy",
        "e: gzip",
        "c: text/plain",
        "",
        "",
      ),
    );
    assert.deepEqual(more.headers.slice(5).map((h) => h.name), [
      "event",
      "allow-events",
      "refer-to",
      "referred-by",
      "session-expires",
      "identity",
      "accept-contact",
      "reject-contact",
      "request-disposition",
      "content-encoding",
      "content-type",
    ]);
  });
  await t.step("escaped characters and %00 in URIs parse (RFC 4475 §3.1.1.4 escnull)", () => {
    const m = req(fixture("escnull.txt"));
    const c = parseContacts(m);
    assert.ok(c.ok && !c.value.star && c.value.contacts.length === 2);
  });
  await t.step("header line without a colon gives 400 (§7.3.1)", () => {
    const r = parseMessage(
      msg("REGISTER sip:example.com SIP/2.0", ...BASE, "Bogus header", "", ""),
    );
    assert.equal(r.ok ? 0 : r.status, 400);
  });
  await t.step("a first header line that is a continuation gives 400 (§7.3.1)", () => {
    const r = parseMessage(msg("REGISTER sip:example.com SIP/2.0", " folded", ...BASE, "", ""));
    assert.equal(r.ok, false);
  });
  await t.step("non-token header name gives 400 (§7.3.1)", () => {
    const r = parseMessage(msg("REGISTER sip:example.com SIP/2.0", ...BASE, "Bad Name: x", "", ""));
    assert.equal(r.ok, false);
  });
});

Deno.test("parseMessage() mandatory headers of a request (RFC 3261 §8.1.1, §8.2.2)", async (t) => {
  for (
    const [line, name] of [[0, "Via"], [1, "To"], [2, "From"], [3, "Call-ID"], [4, "CSeq"]] as const
  ) {
    await t.step(`missing ${name} gives 400 "Missing ${name} header"`, () => {
      const hs = BASE.filter((_, i) => i !== line);
      const r = parseMessage(msg("REGISTER sip:example.com SIP/2.0", ...hs, "", ""));
      assert.equal(r.ok, false);
      if (!r.ok) {
        assert.equal(r.status, 400);
        assert.equal(r.reason, `Missing ${name} header`);
        assert.equal(r.header, name);
      }
    });
  }
  await t.step("missing Max-Forwards is tolerated", () => {
    req(msg("REGISTER sip:example.com SIP/2.0", ...BASE.slice(0, 5), "", ""));
  });
  await t.step("CSeq method must match the request method (RFC 4475 §3.1.2.x mismatch01)", () => {
    const r = parseMessage(msg("OPTIONS sip:example.com SIP/2.0", ...BASE, "", ""));
    assert.equal(r.ok, false);
    if (!r.ok) assert.equal(r.header, "CSeq");
  });
  await t.step("malformed CSeq gives 400 (§20.16)", () => {
    const hs = BASE.map((h) => h.startsWith("CSeq") ? "CSeq: 2147483648 REGISTER" : h);
    const r = parseMessage(msg("REGISTER sip:example.com SIP/2.0", ...hs, "", ""));
    assert.equal(r.ok ? "" : r.header, "CSeq");
  });
});

Deno.test("parseMessage() body by Content-Length (RFC 3261 §7.4, §18.3, §20.14)", async (t) => {
  const head = ["MESSAGE sip:example.com SIP/2.0", ...BASE.slice(0, 4), "CSeq: 1 MESSAGE"];
  await t.step("exact Content-Length", () => {
    const m = req(msg(...head, "Content-Length: 5", "", "hello"));
    assert.equal(dec.decode(m.body), "hello");
  });
  await t.step("longer datagram is cut at Content-Length (RFC 4475 §3.1.1.8 dblreq)", () => {
    const m = req(msg(...head, "Content-Length: 5", "", "hello and more"));
    assert.equal(dec.decode(m.body), "hello");
  });
  await t.step("Content-Length larger than the bytes gives 400 (§18.3)", () => {
    const r = parseMessage(msg(...head, "Content-Length: 50", "", "hello"));
    assert.equal(r.ok ? 0 : r.status, 400);
  });
  await t.step("absent Content-Length over a datagram: rest of the datagram (§18.3)", () => {
    const m = req(msg(...head, "", "hello"));
    assert.equal(dec.decode(m.body), "hello");
  });
  await t.step("malformed Content-Length gives 400", () => {
    assert.equal(parseMessage(msg(...head, "Content-Length: five", "", "hello")).ok, false);
    assert.equal(parseMessage(msg(...head, "Content-Length: -1", "", "hello")).ok, false);
  });
  await t.step("conflicting Content-Length values give 400", () => {
    assert.equal(parseMessage(msg(...head, "Content-Length: 5", "l: 4", "", "hello")).ok, false);
  });
  await t.step("compact l: is used for the body", () => {
    const m = req(msg(...head, "l: 3", "", "hello"));
    assert.equal(dec.decode(m.body), "hel");
  });
  await t.step("binary body bytes are kept as is", () => {
    const h = enc.encode([...head, "Content-Length: 4", "", ""].join("\r\n"));
    const all = new Uint8Array(h.length + 4);
    all.set(h);
    all.set([0xff, 0x00, 0x80, 0x0d], h.length);
    assert.deepEqual([...req(all).body], [0xff, 0x00, 0x80, 0x0d]);
  });
  await t.step("body of an INVITE fixture", () => {
    assert.equal(req(fixture("invite_body.txt")).body.length, 151);
  });
});

Deno.test("parseMessage() never throws on damaged input (RFC 4475 §3.1.2)", () => {
  const base = fixture("wsinv.txt");
  let seed = 12345;
  const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
  for (let n = 0; n < 3000; n++) {
    const b = base.slice(0, rnd() % (base.length + 1));
    for (let k = rnd() % 6; k > 0; k--) b[rnd() % Math.max(1, b.length)] = rnd() & 0xff;
    parseMessage(b);
    scanFirstLine(b);
  }
  for (
    const s of ["", "\r\n", "\r\n\r\n", " ", ":", "SIP/", "SIP/2.0", "A B C\r\n\r\n", "\r\n\r\nX"]
  ) {
    parseMessage(enc.encode(s));
    scanFirstLine(enc.encode(s));
  }
});

Deno.test("scanFirstLine() reads only the first line (RFC 3261 §7.1, §7.2)", async (t) => {
  await t.step("known methods are interned", () => {
    const a = scanFirstLine(fixture("register.txt"));
    const b = scanFirstLine(enc.encode("REGISTER sip:x SIP/2.0\r\n"));
    assert.deepEqual(a, { kind: "request", method: "REGISTER" });
    assert.equal(a, b);
  });
  await t.step("unknown method", () => {
    assert.deepEqual(scanFirstLine(enc.encode("FOO sip:x SIP/2.0\r\n")), {
      kind: "request",
      method: "FOO",
    });
  });
  await t.step("leading CRLFs skipped (§7.5)", () => {
    assert.deepEqual(scanFirstLine(fixture("compact.txt")), {
      kind: "request",
      method: "REGISTER",
    });
  });
  await t.step("response", () => {
    assert.deepEqual(scanFirstLine(fixture("response.txt")), { kind: "response", status: 200 });
    assert.deepEqual(scanFirstLine(enc.encode("SIP/2.0 503 Service Unavailable\r\n")), {
      kind: "response",
      status: 503,
    });
  });
  await t.step("invalid", () => {
    for (
      const s of [
        "",
        "\r\n",
        "REGISTER\r\n",
        "REGISTER sip:x\r\n",
        "SIP/2.0 20 OK\r\n",
        "<> sip:x SIP/2.0",
        "SIP/2.0 2000",
      ]
    ) {
      assert.deepEqual(scanFirstLine(enc.encode(s)), { kind: "invalid" }, s);
    }
  });
});

Deno.test("findHeaderEnd() finds the first CRLFCRLF at or after `from` (RFC 3261 §7)", () => {
  const naive = (b: Uint8Array, from: number) => {
    for (let i = from; i + 3 < b.length; i++) {
      if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) return i;
    }
    return -1;
  };
  let seed = 7;
  const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
  const alphabet = [13, 10, 65];
  for (let t = 0; t < 50000; t++) {
    const b = Uint8Array.from({ length: rnd() % 12 }, () => alphabet[rnd() % 3]!);
    const from = b.length > 0 ? rnd() % b.length : 0;
    assert.equal(findHeaderEnd(b, from), naive(b, from), `${[...b]} from ${from}`);
  }
});

Deno.test("parseMessage() and decoders on RFC 4475 cases a registrar meets", async (t) => {
  const hs = BASE.slice(0, 4);
  await t.step("§3.1.1.6 lwsdisp: no LWS between display name and <", () => {
    const m = req(
      msg(
        "OPTIONS sip:user@example.com SIP/2.0",
        "To: sip:user@example.com",
        "From: caller<sip:caller@example.com>;tag=323",
        "Call-ID: lwsdisp.1234abcd@funky.example.com",
        "CSeq: 60 OPTIONS",
        "Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw",
        "l: 0",
        "",
        "",
      ),
    );
    const from = parseNameAddr(header(m, "from")!, "From");
    assert.ok(from.ok);
    assert.equal(from.value.displayName, "caller");
    assert.equal(from.value.uri, "sip:caller@example.com");
    assert.equal(from.value.params.get("tag"), "323");
  });
  await t.step("§3.1.1.10 transports: unknown Via transports parse", () => {
    for (
      const v of [
        "SIP/2.0/SCTP t3.example.com;branch=z9hG4bKsctp",
        "SIP/2.0/TLS t4.example.com:5061;branch=z9hG4bKtls",
        "SIP/2.0/UNKNOWN t5.example.com;branch=z9hG4bKunkn",
      ]
    ) {
      const r = parseVia(v);
      assert.ok(r.ok, v);
    }
  });
  await t.step("§3.1.2.8 lwsstart: several SP in the request line give 400", () => {
    assert.equal(
      parseMessage(msg("REGISTER  sip:example.com  SIP/2.0", ...BASE, "", "")).ok,
      false,
    );
  });
  await t.step("§3.1.2.9 trws: SP at the end of the request line gives 400", () => {
    assert.equal(parseMessage(msg("REGISTER sip:example.com SIP/2.0 ", ...BASE, "", "")).ok, false);
  });
  await t.step("§3.1.2.4 scalar02: an overlarge CSeq gives 400", () => {
    const r = parseMessage(
      msg("REGISTER sip:example.com SIP/2.0", ...hs, "CSeq: 36893488147419103232 REGISTER", "", ""),
    );
    assert.equal(r.ok ? "" : r.header, "CSeq");
  });
  await t.step("§3.1.2.6 quotbal: an unterminated quoted display name is malformed", () => {
    assert.equal(parseNameAddr('"Mr. J. User <sip:j.user@example.com>', "To").ok, false);
  });
  await t.step("§3.1.2.10 ltgtruri: <> around the Request-URI is not a URI", () => {
    const m = req(msg("REGISTER <sip:example.com> SIP/2.0", ...BASE, "", ""));
    assert.equal(parseUri(m.uri).ok, false);
  });
  await t.step(
    "§3.1.2.3 ncl / §3.1.2.2 clerr: negative or excessive Content-Length gives 400",
    () => {
      const head = ["MESSAGE sip:example.com SIP/2.0", ...hs, "CSeq: 1 MESSAGE"];
      assert.equal(parseMessage(msg(...head, "Content-Length: -999", "", "")).ok, false);
      assert.equal(parseMessage(msg(...head, "Content-Length: 9999", "", "short")).ok, false);
    },
  );
});

Deno.test("parseMessage() rejects what the fuzzer found slipping through", async (t) => {
  await t.step("a control character inside the Request-URI is a 400 (RFC 3261 §25.1)", () => {
    for (const ctl of ["\u000b", "\u0000", "\u007f", "\u000c"]) {
      const r = parseMessage(msg(`REGISTER sip:a${ctl}b@example.com SIP/2.0`, ...BASE, "", ""));
      assert.equal(r.ok, false, JSON.stringify(ctl));
      if (!r.ok) assert.equal(r.status, 400);
    }
  });
  await t.step(
    "a second To, From, CSeq or Call-ID line is a 400 (RFC 3261 §7.3, RFC 4475 §3.3.8)",
    () => {
      for (
        const extra of [
          "To: <sip:eve@example.com>",
          "f: <sip:eve@example.com>;tag=2",
          "CSeq: 2 REGISTER",
          "i: other",
        ]
      ) {
        const r = parseMessage(msg("REGISTER sip:example.com SIP/2.0", ...BASE, extra, "", ""));
        assert.equal(r.ok, false, extra);
        if (!r.ok) assert.match(r.reason, /^Multiple /);
      }
      // Via and other list headers may repeat.
      req(
        msg(
          "REGISTER sip:example.com SIP/2.0",
          ...BASE,
          "v: SIP/2.0/TCP b;branch=z9hG4bK2",
          "",
          "",
        ),
      );
    },
  );
});
