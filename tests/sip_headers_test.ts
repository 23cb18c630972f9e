import assert from "node:assert/strict";
import { parseMessage } from "../sip/parse.ts";
import {
  aorOf,
  header,
  headerAll,
  parseContacts,
  parseCSeq,
  parseExpires,
  parseNameAddr,
  parseUri,
  parseVia,
  type SipUri,
  splitList,
  tagOf,
  uriKey,
} from "../sip/headers.ts";
import type { SipMessage } from "../sip/message.ts";

const enc = new TextEncoder();

function message(...extra: string[]): SipMessage {
  const text = [
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1",
    "To: <sip:bob@example.com>",
    "From: <sip:bob@example.com>;tag=1",
    "Call-ID: abc",
    "CSeq: 1 REGISTER",
    ...extra,
    "",
    "",
  ].join("\r\n");
  const r = parseMessage(enc.encode(text));
  if (!r.ok) assert.fail(r.reason);
  return r.value;
}

function uri(text: string): SipUri {
  const r = parseUri(text);
  if (!r.ok) assert.fail(`${text}: ${r.reason}`);
  return r.value;
}

Deno.test("header() and headerAll() (RFC 3261 §7.3.1)", async (t) => {
  await t.step("header() gives the first value, undefined when absent", () => {
    const m = message("Contact: <sip:a@b>", "Contact: <sip:c@d>");
    assert.equal(header(m, "contact"), "<sip:a@b>");
    assert.equal(header(m, "expires"), undefined);
  });
  await t.step("list headers are split at top-level commas only (§7.3.1)", () => {
    const m = message(
      'Contact: "Doe, John" <sip:j@x;a=1,2>;q=0.5, sip:k@y;expires=60',
      'Contact: <sip:l@z>;p="a,b"',
    );
    assert.deepEqual(headerAll(m, "contact"), [
      '"Doe, John" <sip:j@x;a=1,2>;q=0.5',
      "sip:k@y;expires=60",
      '<sip:l@z>;p="a,b"',
    ]);
  });
  await t.step(
    "non-list headers are never split (§20.44 WWW-Authenticate, §20.7 Authorization)",
    () => {
      const m = message(
        'Authorization: Digest username="bob", realm="x", nonce="n", uri="sip:x", response="r"',
        "Date: Sat, 13 Nov 2010 23:29:00 GMT",
      );
      assert.equal(headerAll(m, "authorization").length, 1);
      assert.deepEqual(headerAll(m, "date"), ["Sat, 13 Nov 2010 23:29:00 GMT"]);
    },
  );
  await t.step("splitList() handles escaped quotes", () => {
    assert.deepEqual(splitList('"a\\",b" <sip:x>, <sip:y>'), ['"a\\",b" <sip:x>', "<sip:y>"]);
    assert.deepEqual(splitList(" , a,, b ,"), ["a", "b"]);
  });
});

Deno.test("parseVia() (RFC 3261 §20.42, RFC 3581, RFC 5118)", async (t) => {
  await t.step("host, port, branch, rport without value", () => {
    const r = parseVia("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776;rport");
    assert.ok(r.ok);
    assert.equal(r.value.protocol, "SIP/2.0");
    assert.equal(r.value.transport, "UDP");
    assert.equal(r.value.host, "192.0.2.1");
    assert.equal(r.value.port, 5060);
    assert.equal(r.value.branch, "z9hG4bK776");
    assert.equal(r.value.params.has("rport"), true);
    assert.equal(r.value.params.get("rport"), null);
  });
  await t.step("received and rport with values, no port", () => {
    const r = parseVia(
      "SIP/2.0/tcp host.example.com;received=192.0.2.9;rport=4000;branch=z9hG4bKx",
    );
    assert.ok(r.ok);
    assert.equal(r.value.transport, "TCP");
    assert.equal(r.value.port, null);
    assert.equal(r.value.params.get("received"), "192.0.2.9");
    assert.equal(r.value.params.get("rport"), "4000");
  });
  await t.step("IPv6 references (RFC 5118 §4.5)", () => {
    const r = parseVia(
      "SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas3;received=[2001:db8::9:255]",
    );
    assert.ok(r.ok);
    assert.equal(r.value.host, "[2001:db8::9:1]");
    assert.equal(r.value.port, 5070);
    assert.equal(r.value.params.get("received"), "[2001:db8::9:255]");
    const r2 = parseVia("SIP/2.0/TCP [::1];branch=z9hG4bKa");
    assert.ok(r2.ok && r2.value.host === "[::1]" && r2.value.port === null);
  });
  await t.step("LWS around / and ; (RFC 4475 §3.1.1.1)", () => {
    const r = parseVia("SIP  /   2.0 /UDP    192.0.2.2 ; branch = 390skdjuw");
    assert.ok(r.ok);
    assert.equal(r.value.branch, "390skdjuw");
  });
  await t.step("no branch gives null", () => {
    const r = parseVia("SIP/2.0/WSS df7jal23ls0d.invalid;rport");
    assert.ok(r.ok && r.value.branch === null && r.value.transport === "WSS");
  });
  await t.step("malformed values give 400 with header Via", () => {
    for (
      const v of [
        "",
        "SIP/2.0 192.0.2.1",
        "SIP/2.0/UDP",
        "SIP/3.0/UDP host",
        "SIP/2.0/UDP host:99999",
        "SIP/2.0/UDP host:abc",
        "SIP/2.0/UDP [::1",
        "SIP/2.0/UDP host;",
        "SIP/2.0/UDP host branch=1",
        "SIP/2.0/UDP a, SIP/2.0/UDP b",
      ]
    ) {
      const r = parseVia(v);
      assert.equal(r.ok, false, v);
      if (!r.ok) assert.equal(r.header, "Via");
    }
  });
});

Deno.test("parseNameAddr() (RFC 3261 §20.10, §25.1)", async (t) => {
  await t.step("quoted display name, URI params vs header params", () => {
    const r = parseNameAddr('"Bob \\"B\\"" <sip:b@x;transport=tcp>;tag=1;expires=60');
    assert.ok(r.ok);
    assert.equal(r.value.displayName, 'Bob "B"');
    assert.equal(r.value.uri, "sip:b@x;transport=tcp");
    assert.deepEqual([...r.value.params], [["tag", "1"], ["expires", "60"]]);
  });
  await t.step("token display name and no display name", () => {
    const r = parseNameAddr("Bob  Smith <sip:b@x>");
    assert.ok(r.ok && r.value.displayName === "Bob  Smith");
    const r2 = parseNameAddr("<sip:b@x>");
    assert.ok(r2.ok && r2.value.displayName === null && r2.value.params.size === 0);
  });
  await t.step("addr-spec form: params after the URI are header params (§20.10)", () => {
    const r = parseNameAddr("sip:b@x;tag=1;transport=udp");
    assert.ok(r.ok);
    assert.equal(r.value.uri, "sip:b@x");
    assert.equal(r.value.params.get("tag"), "1");
    assert.equal(r.value.params.get("transport"), "udp");
  });
  await t.step("quoted parameter values keep their quotes (RFC 5626 +sip.instance)", () => {
    const r = parseNameAddr('<sip:b@x>;+sip.instance="<urn:uuid:1;2>";reg-id=1;Q=0.7');
    assert.ok(r.ok);
    assert.equal(r.value.params.get("+sip.instance"), '"<urn:uuid:1;2>"');
    assert.equal(r.value.params.get("reg-id"), "1");
    assert.equal(r.value.params.get("q"), "0.7");
  });
  await t.step("malformed values give 400 naming the header", () => {
    for (
      const v of [
        "",
        "<sip:b@x",
        '"unterminated <sip:b@x>',
        "nobody",
        "<sip:b@x> junk",
        "<sip:b@x>;=1",
      ]
    ) {
      const r = parseNameAddr(v, "From");
      assert.equal(r.ok, false, v);
      if (!r.ok) assert.equal(r.header, "From");
    }
  });
});

Deno.test("parseContacts() (RFC 3261 §10.2.1, §10.2.2, §20.10)", async (t) => {
  await t.step("several values across lines", () => {
    const r = parseContacts(message("Contact: <sip:a@b>;expires=5, <sip:c@d>", "m: sip:e@f;q=0.1"));
    assert.ok(r.ok && !r.value.star);
    if (r.ok && !r.value.star) {
      assert.deepEqual(r.value.contacts.map((c) => c.uri), ["sip:a@b", "sip:c@d", "sip:e@f"]);
    }
  });
  await t.step("* alone (§10.2.2)", () => {
    assert.deepEqual(parseContacts(message("Contact: *", "Expires: 0")), {
      ok: true,
      value: { star: true },
    });
  });
  await t.step("* mixed with other values gives 400 (§10.3 step 6)", () => {
    const r = parseContacts(message("Contact: *", "Contact: <sip:a@b>"));
    assert.equal(r.ok ? 0 : r.status, 400);
    const r2 = parseContacts(message("Contact: *, <sip:a@b>"));
    assert.equal(r2.ok, false);
  });
  await t.step("no Contact gives an empty list (§10.2.3 query)", () => {
    assert.deepEqual(parseContacts(message()), { ok: true, value: { star: false, contacts: [] } });
  });
  await t.step("a malformed contact gives 400 naming Contact", () => {
    const r = parseContacts(message("Contact: <sip:a@b"));
    assert.equal(r.ok ? "" : r.header, "Contact");
  });
});

Deno.test("parseUri() (RFC 3261 §19.1.1, RFC 3966)", async (t) => {
  await t.step("all parts", () => {
    const u = uri(
      "sips:alice:secretW0rd@gateway.com:5061;transport=tcp;lr?subject=project&priority=urgent",
    );
    assert.equal(u.scheme, "sips");
    assert.equal(u.user, "alice");
    assert.equal(u.password, "secretW0rd");
    assert.equal(u.host, "gateway.com");
    assert.equal(u.port, 5061);
    assert.deepEqual([...u.params], [["transport", "tcp"], ["lr", null]]);
    assert.deepEqual([...u.headers], [["subject", "project"], ["priority", "urgent"]]);
  });
  await t.step("host only, IPv6, scheme case", () => {
    const u = uri("SIP:Example.COM");
    assert.equal(u.scheme, "sip");
    assert.equal(u.user, null);
    assert.equal(u.host, "Example.COM");
    const v6 = uri("sip:bob@[2001:db8::10]:5070");
    assert.equal(v6.host, "[2001:db8::10]");
    assert.equal(v6.port, 5070);
  });
  await t.step("escaped user is unescaped (RFC 4475 §3.1.1.3 esc01, §3.1.1.4 escnull)", () => {
    assert.equal(uri("sip:sips%3Auser%40example.com@example.net").user, "sips:user@example.com");
    assert.equal(uri("sip:null-%00-null@example.com").user, "null-\u0000-null");
    assert.equal(uri("sip:%61lice@example.com").user, "alice");
  });
  await t.step("user with semicolons (RFC 4475 §3.1.1.9 semiuri)", () => {
    const u = uri("sip:user;par=u%40example.net@example.com");
    assert.equal(u.user, "user;par=u@example.net");
    assert.equal(u.host, "example.com");
  });
  await t.step("tel URI (RFC 3966)", () => {
    const u = uri("tel:+1-201-555-0123;phone-context=example.com");
    assert.equal(u.scheme, "tel");
    assert.equal(u.user, "+1-201-555-0123");
    assert.equal(u.params.get("phone-context"), "example.com");
  });
  await t.step("unsupported scheme gives 416 (§8.2.2.1)", () => {
    const r = parseUri("http://example.com/");
    assert.equal(r.ok ? 0 : r.status, 416);
    const r2 = parseUri("mailto:a@b");
    assert.equal(r2.ok ? 0 : r2.status, 416);
  });
  await t.step("malformed URIs give 400", () => {
    for (
      const s of [
        "",
        "sip",
        ":x",
        "sip:",
        "sip:@host",
        "sip:a@",
        "sip:a@host:port",
        "sip:a b@host",
        "sip:%zz@h",
        "1sip:x",
      ]
    ) {
      const r = parseUri(s);
      assert.equal(r.ok ? 0 : r.status, 400, s);
    }
  });
});

Deno.test("uriKey() equality (RFC 3261 §19.1.4)", async (t) => {
  const same = (a: string, b: string) =>
    assert.equal(uriKey(uri(a)), uriKey(uri(b)), `${a} == ${b}`);
  const differ = (a: string, b: string) =>
    assert.notEqual(uriKey(uri(a)), uriKey(uri(b)), `${a} != ${b}`);
  await t.step("equivalent URIs from §19.1.4", () => {
    same("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp");
    same("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5");
    same("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;newparam=5");
    same(
      "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
      "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    );
    same(
      "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
      "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    );
  });
  await t.step("non-equivalent URIs from §19.1.4", () => {
    differ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP");
    differ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060");
    differ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp");
    differ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp");
    differ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting");
    differ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4");
    differ("sips:bob@biloxi.com", "sip:bob@biloxi.com");
  });
});

Deno.test("aorOf() canonical address-of-record (RFC 3261 §10.3 step 5)", () => {
  assert.equal(
    aorOf(uri("sip:Bob@BILOXI.example.com:5060;transport=udp?x=y")),
    "sip:Bob@biloxi.example.com",
  );
  assert.equal(aorOf(uri("sips:%62ob@biloxi.example.com")), "sips:bob@biloxi.example.com");
  assert.equal(aorOf(uri("sip:biloxi.example.com")), "sip:biloxi.example.com");
  assert.equal(aorOf(uri("tel:+15551234")), "tel:+15551234");
});

Deno.test("parseCSeq() (RFC 3261 §20.16, §8.1.1.5)", () => {
  assert.deepEqual(parseCSeq("4711 INVITE"), { ok: true, value: { seq: 4711, method: "INVITE" } });
  assert.deepEqual(parseCSeq(" 0   REGISTER "), {
    ok: true,
    value: { seq: 0, method: "REGISTER" },
  });
  assert.deepEqual(parseCSeq("2147483647 ACK"), {
    ok: true,
    value: { seq: 2147483647, method: "ACK" },
  });
  for (
    const s of [
      "",
      "INVITE",
      "1",
      "1INVITE",
      "-1 INVITE",
      "2147483648 INVITE",
      "1 INVITE x",
      "99999999999 A",
    ]
  ) {
    const r = parseCSeq(s);
    assert.equal(r.ok ? "" : r.header, "CSeq", s);
  }
});

Deno.test("tagOf() (RFC 3261 §19.3, §20.20, §20.39)", () => {
  assert.equal(tagOf("Bob <sip:bob@x>;tag=a6c85cf"), "a6c85cf");
  assert.equal(tagOf("sip:bob@x;TAG=abc"), "abc");
  assert.equal(tagOf("<sip:bob@x;tag=inuri>"), null);
  assert.equal(tagOf('"a;tag=no" <sip:bob@x>;foo=1 ; tag = yes'), "yes");
  assert.equal(tagOf("<sip:bob@x>;tagx=1"), null);
  assert.equal(tagOf("<sip:bob@x>"), null);
  assert.equal(tagOf("<sip:bob@x>;tag="), null);
});

Deno.test("parseExpires() (RFC 3261 §20.19, §10.2.1.1)", () => {
  assert.equal(parseExpires("3600"), 3600);
  assert.equal(parseExpires(" 0 "), 0);
  assert.equal(parseExpires("99999999999999999999"), 4294967295);
  assert.equal(parseExpires("4294967296"), 4294967295);
  assert.equal(parseExpires(""), null);
  assert.equal(parseExpires("-1"), null);
  assert.equal(parseExpires("1.5"), null);
  assert.equal(parseExpires("Sat, 13 Nov 2010 23:29:00 GMT"), null);
});

Deno.test("header decoders never throw on damaged values (RFC 4475 §3.1.2)", () => {
  let x = 0x2545f491;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const seeds = [
    "SIP/2.0/UDP [2001:db8::9]:5061;branch=z9hG4bK1;received=1.2.3.4;rport",
    '"Bob \\"x\\"" <sips:bob:pw@[::1]:5061;transport=tls?subject=a%20b>;tag=1;+sip.instance="<urn:x>"',
    "sip:user;par=u%40example.net@example.com;lr?h=v&g=w",
    "4711 INVITE",
  ];
  const alphabet = ' <>";:@[]?&=,\\%/0aZ\t\r\n\u00e9';
  for (let n = 0; n < 5000; n++) {
    const base = seeds[rnd() % seeds.length]!;
    let s = base.slice(0, rnd() % (base.length + 1));
    for (let k = rnd() % 4; k > 0; k--) {
      const at = rnd() % (s.length + 1);
      s = s.slice(0, at) + alphabet[rnd() % alphabet.length] + s.slice(at + (rnd() % 2));
    }
    parseVia(s);
    parseNameAddr(s);
    const u = parseUri(s);
    if (u.ok) {
      uriKey(u.value);
      aorOf(u.value);
    }
    parseCSeq(s);
    tagOf(s);
    parseExpires(s);
    splitList(s);
  }
});

Deno.test("header decoders reject what the fuzzer and RFC 4475/5118 found slipping through", async (t) => {
  await t.step("an unquoted display name is tokens and LWS only (RFC 4475 §3.1.2.15)", () => {
    assert.equal(parseNameAddr("Bell, Alexander <sip:a@example.com>").ok, false);
    assert.equal(parseNameAddr("Bob (mobile) <sip:a@example.com>").ok, false);
    const ok = parseNameAddr("Bob  Smith-Jr. <sip:a@example.com>");
    assert.ok(ok.ok && ok.value.displayName === "Bob  Smith-Jr.");
    assert.ok(parseNameAddr('"Bell, Alexander" <sip:a@example.com>').ok);
  });
  await t.step(
    "an addr-spec with URI headers must be in <> (RFC 3261 §20.10, RFC 4475 §3.1.2.13)",
    () => {
      assert.equal(parseNameAddr("sip:user@example.com?Route=%3Csip:x%3E").ok, false);
      assert.ok(parseNameAddr("<sip:user@example.com?Route=%3Csip:x%3E>").ok);
    },
  );
  await t.step("IPv6 references must be IPv6 addresses (RFC 5118 §4.10, RFC 4291 §2.2)", () => {
    for (const good of ["::1", "2001:db8::10", "::ffff:192.0.2.10", "1:2:3:4:5:6:7:8", "fe80::"]) {
      assert.ok(parseUri(`sip:[${good}]:5060`).ok, good);
    }
    for (
      const bad of [
        "2001:db8:::192.0.2.1",
        "1::2::3",
        "12345::",
        ":::",
        "",
        "1:2:3:4:5:6:7",
        "::ffff:1.2.3.256",
      ]
    ) {
      assert.equal(parseUri(`sip:[${bad}]`).ok, false, bad);
      assert.equal(parseVia(`SIP/2.0/UDP [${bad}];branch=z9hG4bK1`).ok, false, bad);
    }
  });
});
