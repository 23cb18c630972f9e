/**
 * End-to-end tests: the real server process (`main.ts serve --store memory`) on port 0, spoken to over
 * real UDP and TCP sockets (and IPv6 loopback where the machine has it).
 */
import assert from "node:assert/strict";
import { hasIpv6Loopback, startServer, type TestServer } from "./_server.ts";
import {
  buildRequest,
  bytesOf,
  concat,
  contactsOf,
  newBranch,
  newCallId,
  newUser,
  parseResponse,
  type RequestSpec,
  type Response,
  TcpClient,
  textOf,
  UdpClient,
} from "./_client.ts";

const MIN_EXPIRES = 60;
const MAX_EXPIRES = 3600;
const DEFAULT_EXPIRES = 1800;

type Transport = "udp" | "tcp";

/** One client of either transport that sends requests built from a spec. */
interface Peer {
  readonly transport: Transport;
  /** The client's local port (the packet source port the server sees). */
  readonly localPort: number;
  /** Builds the request with this transport's Via and sends it; resolves to the response. */
  send(spec?: RequestSpec): Promise<Response>;
  /** Sends raw bytes and reads one response. */
  raw(bytes: Uint8Array): Promise<Response>;
  close(): Promise<void>;
}

async function peer(transport: Transport, port: number, host = "127.0.0.1"): Promise<Peer> {
  const sentHost = host.includes(":") ? `[${host}]` : host;
  if (transport === "udp") {
    const udp = new UdpClient(host);
    return {
      transport,
      localPort: udp.port,
      send: (spec = {}) =>
        udp.request(
          buildRequest({ sentBy: `${sentHost}:${udp.port}`, ...spec, transport: "UDP" }),
          port,
        ),
      raw: (bytes) => udp.request(bytes, port),
      close: () => udp.close(),
    };
  }
  const tcp = await TcpClient.connect(port, host);
  return {
    transport,
    localPort: tcp.localPort,
    send: (spec = {}) =>
      tcp.request(
        buildRequest({ sentBy: `${sentHost}:${tcp.localPort}`, ...spec, transport: "TCP" }),
      ),
    raw: (bytes) => tcp.request(bytes),
    close: () => tcp.close(),
  };
}

function contact(user: string, n = 1): string {
  return `sip:${user}@192.0.2.${n}:5060`;
}

/** Asserts a registrar's 200 OK lists exactly these contact URIs (in this order). */
function assertListed(res: Response, uris: readonly string[]): void {
  assert.equal(res.status, 200, `expected 200, got ${res.status} ${res.reason}`);
  assert.deepEqual(contactsOf(res).map((c) => c.uri), uris);
}

/** Asserts a listed contact's expires is `want` (minus at most 2 s elapsed). */
function assertExpires(res: Response, uri: string, want: number): void {
  const c = contactsOf(res).find((c) => c.uri === uri);
  assert.ok(c, `contact ${uri} not listed in ${textOf(res.raw)}`);
  assert.ok(
    c.expires !== null && c.expires <= want && c.expires >= want - 2,
    `contact ${uri}: expires ${c.expires}, want ${want}`,
  );
}

function assertRejected(res: Response, why: string): void {
  assert.ok(res.status >= 400 && res.status < 600, `${why}: got ${res.status} ${res.reason}`);
}

/** The behaviour every transport must show. */
async function registrarSteps(t: Deno.TestContext, p: Peer, label: string): Promise<void> {
  await t.step(
    `${label}: REGISTER -> 200 listing the Contact with its expires (RFC 3261 §10.3 step 8)`,
    async () => {
      const user = newUser();
      const res = await p.send({ user, contacts: [`<${contact(user)}>;expires=120`] });
      assertListed(res, [contact(user)]);
      assertExpires(res, contact(user), 120);
      assert.ok(res.header("to")?.includes(";tag="), "200 OK has a To tag (§8.2.6.2)");
      assert.equal(res.header("cseq"), "1 REGISTER", "CSeq copied (§8.2.6.2)");
    },
  );

  await t.step(
    `${label}: refresh with a higher CSeq updates the expires (RFC 3261 §10.2.4)`,
    async () => {
      const user = newUser();
      const callId = newCallId();
      const c = contact(user);
      assertListed(await p.send({ user, callId, cseq: 1, contacts: [`<${c}>;expires=120`] }), [c]);
      const res = await p.send({ user, callId, cseq: 2, contacts: [`<${c}>;expires=600`] });
      assertListed(res, [c]);
      assertExpires(res, c, 600);
    },
  );

  await t.step(
    `${label}: a REGISTER without Contact is a query listing the bindings (RFC 3261 §10.2.3)`,
    async () => {
      const user = newUser();
      await p.send({ user, contacts: [`<${contact(user, 1)}>;expires=300`] });
      await p.send({ user, contacts: [`<${contact(user, 2)}>;expires=300`] });
      const res = await p.send({ user });
      assert.equal(res.status, 200);
      assert.deepEqual(
        contactsOf(res).map((c) => c.uri).sort(),
        [contact(user, 1), contact(user, 2)].sort(),
      );
      assertExpires(res, contact(user, 1), 300);
    },
  );

  await t.step(
    `${label}: a query for an AOR with no bindings -> 200 without Contact (RFC 3261 §10.3 step 8)`,
    async () => {
      const res = await p.send({ user: newUser("nobody") });
      assertListed(res, []);
    },
  );

  await t.step(`${label}: expires=0 removes that one binding only (RFC 3261 §10.2.2)`, async () => {
    const user = newUser();
    const [a, b] = [contact(user, 1), contact(user, 2)];
    await p.send({ user, contacts: [`<${a}>;expires=300`, `<${b}>;expires=300`] });
    const res = await p.send({ user, contacts: [`<${a}>;expires=0`] });
    assertListed(res, [b]);
    assertListed(await p.send({ user }), [b]);
  });

  await t.step(
    `${label}: Contact: * with Expires: 0 removes all bindings (RFC 3261 §10.2.2)`,
    async () => {
      const user = newUser();
      await p.send({ user, contacts: [`<${contact(user, 1)}>`, `<${contact(user, 2)}>`] });
      const res = await p.send({ user, contacts: ["*"], expires: 0 });
      assertListed(res, []);
      assertListed(await p.send({ user }), []);
    },
  );

  await t.step(
    `${label}: Contact: * without Expires: 0 -> 400 and changes nothing (RFC 3261 §10.3 step 6)`,
    async () => {
      const user = newUser();
      await p.send({ user, contacts: [`<${contact(user)}>`] });
      assert.equal((await p.send({ user, contacts: ["*"] })).status, 400);
      assert.equal((await p.send({ user, contacts: ["*"], expires: 60 })).status, 400);
      assertListed(await p.send({ user }), [contact(user)]);
    },
  );

  await t.step(
    `${label}: expires below --min-expires -> 423 with Min-Expires, nothing bound (RFC 3261 §10.3 step 7)`,
    async () => {
      const user = newUser();
      const res = await p.send({
        user,
        contacts: [`<${contact(user)}>;expires=${MIN_EXPIRES - 1}`],
      });
      assert.equal(res.status, 423);
      assert.equal(res.header("min-expires"), String(MIN_EXPIRES));
      const viaHeader = await p.send({ user, contacts: [`<${contact(user)}>`], expires: 10 });
      assert.equal(viaHeader.status, 423, "Expires header below the minimum");
      assertListed(await p.send({ user }), []);
    },
  );

  await t.step(
    `${label}: expires above --max-expires is capped (RFC 3261 §10.3 step 7)`,
    async () => {
      const user = newUser();
      const res = await p.send({ user, contacts: [`<${contact(user)}>;expires=100000`] });
      assertListed(res, [contact(user)]);
      assertExpires(res, contact(user), MAX_EXPIRES);
    },
  );

  await t.step(
    `${label}: expires from the Expires header, else the default (RFC 3261 §10.2.1.1)`,
    async () => {
      const user = newUser();
      const [a, b] = [contact(user, 1), contact(user, 2)];
      assertExpires(await p.send({ user, contacts: [`<${a}>`], expires: 900 }), a, 900);
      const res = await p.send({ user, contacts: [`<${b}>`] });
      assertExpires(res, b, DEFAULT_EXPIRES);
      assertExpires(res, a, 900);
    },
  );

  await t.step(
    `${label}: same Call-ID with a CSeq not higher fails and changes nothing (RFC 3261 §10.3 step 7)`,
    async () => {
      const user = newUser();
      const callId = newCallId();
      const c = contact(user);
      assertExpires(
        await p.send({ user, callId, cseq: 5, contacts: [`<${c}>;expires=600`] }),
        c,
        600,
      );
      assertRejected(
        await p.send({ user, callId, cseq: 5, contacts: [`<${c}>;expires=300`] }),
        "equal CSeq",
      );
      assertRejected(
        await p.send({ user, callId, cseq: 4, contacts: [`<${c}>;expires=300`] }),
        "lower CSeq",
      );
      assertRejected(
        await p.send({ user, callId, cseq: 3, contacts: ["*"], expires: 0 }),
        "lower CSeq with Contact: *",
      );
      assertExpires(await p.send({ user }), c, 600);
      assertExpires(
        await p.send({ user, callId, cseq: 6, contacts: [`<${c}>;expires=300`] }),
        c,
        300,
      );
    },
  );

  await t.step(
    `${label}: a CSeq check applies per Call-ID only: another Call-ID with a lower CSeq updates (RFC 3261 §10.3 step 7)`,
    async () => {
      const user = newUser();
      const c = contact(user);
      await p.send({ user, cseq: 50, contacts: [`<${c}>;expires=600`] });
      const res = await p.send({ user, cseq: 1, contacts: [`<${c}>;expires=300`] });
      assertExpires(res, c, 300);
    },
  );

  await t.step(
    `${label}: Contact: * together with another Contact -> 400 (RFC 3261 §10.3 step 6)`,
    async () => {
      const user = newUser();
      const res = await p.send({ user, contacts: ["*", `<${contact(user)}>`], expires: 0 });
      assert.equal(res.status, 400, `${res.status} ${res.reason}`);
    },
  );

  await t.step(
    `${label}: several contacts in one comma-separated Contact header are all bound (RFC 3261 §7.3.1, §10.2.1)`,
    async () => {
      const user = newUser();
      const [a, b] = [contact(user, 1), contact(user, 2)];
      const res = await p.send({ user, contacts: [`<${a}>;expires=300, <${b}>;expires=400`] });
      assert.deepEqual(contactsOf(res).map((c) => c.uri).sort(), [a, b].sort());
      assertExpires(res, a, 300);
      assertExpires(res, b, 400);
    },
  );

  await t.step(
    `${label}: the AOR's host is case-insensitive, its user case-sensitive (RFC 3261 §10.3 step 5, §19.1.4)`,
    async () => {
      const user = newUser("Case");
      const c = contact(user);
      await p.send({ user, domain: "CitySIP.Test", contacts: [`<${c}>`] });
      assertListed(await p.send({ user, domain: "citysip.test" }), [c]);
      assertListed(await p.send({ user: user.toLowerCase(), domain: "citysip.test" }), []);
    },
  );

  await t.step(
    `${label}: expires=0 removes a binding whose URI is equal by §19.1.4 (host case) (RFC 3261 §10.3 step 7)`,
    async () => {
      const user = newUser();
      await p.send({ user, contacts: [`<sip:${user}@host.example:5060>`] });
      const res = await p.send({ user, contacts: [`<sip:${user}@HOST.Example:5060>;expires=0`] });
      assertListed(res, []);
    },
  );

  await t.step(`${label}: compact header forms are understood (RFC 3261 §7.3.3)`, async () => {
    const user = newUser();
    const c = contact(user);
    const full = textOf(buildRequest({
      user,
      transport: p.transport === "udp" ? "UDP" : "TCP",
      sentBy: "127.0.0.1:5999",
      contacts: [`<${c}>`],
    }));
    const compact = full
      .replace(/^Via:/m, "v:")
      .replace(/^From:/m, "f:")
      .replace(/^To:/m, "t:")
      .replace(/^Call-ID:/m, "i:")
      .replace(/^Contact:/m, "m:")
      .replace(/^Content-Length:/m, "l:");
    assertListed(await p.raw(bytesOf(compact)), [c]);
  });

  await t.step(
    `${label}: the response copies every Via, in order (RFC 3261 §8.2.6.2)`,
    async () => {
      const two = buildRequest({
        method: "OPTIONS",
        transport: p.transport === "udp" ? "UDP" : "TCP",
        sentBy: "127.0.0.1:5999",
      });
      const text = textOf(two).replace(
        /^(Via: .*)\r\n/m,
        "$1\r\nVia: SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bKsecond\r\n",
      );
      const got = await p.raw(bytesOf(text));
      assert.equal(got.status, 200);
      const vias = got.all("via");
      assert.equal(vias.length, 2, `Via: ${JSON.stringify(vias)}`);
      assert.match(vias[1]!, /192\.0\.2\.99:5060;branch=z9hG4bKsecond/);
    },
  );

  await t.step(
    `${label}: bindings are listed by q-value, highest first (RFC 3261 §10.2.1.2)`,
    async () => {
      const user = newUser();
      const [lo, hi, mid] = [contact(user, 1), contact(user, 2), contact(user, 3)];
      const res = await p.send({
        user,
        contacts: [`<${lo}>;q=0.1`, `<${hi}>;q=1.0`, `<${mid}>;q=0.5`],
      });
      assertListed(res, [hi, mid, lo]);
      assert.deepEqual(contactsOf(res).map((c) => c.params.get("q")), ["1.0", "0.5", "0.1"]);
      assert.equal(
        (await p.send({ user, contacts: [`<${lo}>;q=2`] })).status,
        400,
        "q=2 is no qvalue (§25.1)",
      );
    },
  );

  await t.step(
    `${label}: Require: foo -> 420 with Unsupported: foo (RFC 3261 §8.2.2.3)`,
    async () => {
      const user = newUser();
      const res = await p.send({
        user,
        contacts: [`<${contact(user)}>`],
        headers: { Require: "foo" },
      });
      assert.equal(res.status, 420);
      assert.deepEqual(res.all("unsupported"), ["foo"]);
      assertListed(await p.send({ user }), []);
    },
  );

  await t.step(
    `${label}: Via gets received and rport=<source port> (RFC 3261 §18.2.1, RFC 3581 §4)`,
    async () => {
      const res = await p.send({ method: "OPTIONS", sentBy: "client.invalid:5999", rport: true });
      assert.equal(res.status, 200);
      const via = res.header("via") ?? "";
      assert.match(via, new RegExp(`;rport=${p.localPort}(;|$)`), via);
      assert.match(via, /;received=127\.0\.0\.1(;|$)/, via);
    },
  );

  await t.step(
    `${label}: OPTIONS with Require: foo -> 420 with Unsupported: foo (RFC 3261 §8.2.2.3)`,
    async () => {
      // §8.2.2.3 is a MUST for every request but ACK and CANCEL, not only REGISTER.
      const res = await p.send({ method: "OPTIONS", headers: { Require: "foo" } });
      assert.equal(res.status, 420, `${res.status} ${res.reason}`);
      assert.deepEqual(res.all("unsupported"), ["foo"]);
    },
  );

  await t.step(`${label}: BYE outside a dialog -> 481 (RFC 3261 §15.1.2)`, async () => {
    const res = await p.send({ method: "BYE", uri: "sip:bob@citysip.test" });
    assert.equal(res.status, 481, `${res.status} ${res.reason}`);
  });

  await t.step(`${label}: malformed Expires is treated as 3600 (RFC 3261 §20.19)`, async () => {
    const user = newUser();
    // A valid Expires header of 120 would apply if the malformed parameter were ignored.
    const res = await p.send({
      user,
      contacts: [`<sip:${user}@127.0.0.1:5999>;expires=soon`],
      expires: 120,
    });
    assert.equal(res.status, 200, `${res.status} ${res.reason}`);
    assert.match(res.all("contact").join(","), /expires=3600/);
  });

  await t.step(`${label}: a tel: Request-URI -> 416 (RFC 3261 §8.2.2.1)`, async () => {
    const res = await p.send({ uri: "tel:+15551234567" });
    assert.equal(res.status, 416, `${res.status} ${res.reason}`);
  });

  await t.step(`${label}: SIP/3.0 -> 505 (RFC 3261 §21.5.6)`, async () => {
    const user = newUser();
    const msg = textOf(buildRequest({
      user,
      transport: p.transport === "udp" ? "UDP" : "TCP",
      sentBy: "127.0.0.1:5999",
    })).replace(" SIP/2.0\r\n", " SIP/3.0\r\n");
    const res = await p.raw(bytesOf(msg));
    assert.equal(res.status, 505, `${res.status} ${res.reason}`);
  });

  await t.step(`${label}: OPTIONS -> 200 with Allow (RFC 3261 §11.2)`, async () => {
    const res = await p.send({ method: "OPTIONS" });
    assert.equal(res.status, 200);
    const allow = res.all("allow").map((m) => m.toUpperCase());
    assert.ok(allow.includes("REGISTER") && allow.includes("OPTIONS"), `Allow: ${allow}`);
  });

  await t.step(`${label}: INVITE -> 405 with Allow (RFC 3261 §8.2.1)`, async () => {
    const res = await p.send({
      method: "INVITE",
      uri: "sip:bob@citysip.test",
      headers: { Contact: "<sip:alice@192.0.2.1>" },
    });
    assert.equal(res.status, 405);
    assert.ok(res.all("allow").includes("REGISTER"), `Allow: ${res.header("allow")}`);
  });

  await t.step(`${label}: an unknown method -> 501 (RFC 3261 §8.2.1)`, async () => {
    const res = await p.send({ method: "FROBNICATE" });
    assert.equal(res.status, 501);
  });

  for (
    const [what, headers] of [
      ["CSeq: abc REGISTER", { CSeq: "abc REGISTER" }],
      ["Contact: <sip:broken", { Contact: "<sip:broken" }],
      ["CSeq above 2**31-1 (§8.1.1.5)", { CSeq: "4294967296 REGISTER" }],
      ["CSeq method not the request's", { CSeq: "1 INVITE" }],
      ["To: garbage", { To: "<<garbage" }],
    ] as const
  ) {
    await t.step(
      `${label}: a REGISTER with a bad header (${what}) -> 400 (RFC 3261 §21.4.1, §8.1.1)`,
      async () => {
        const res = await p.send({ user: newUser(), headers });
        assert.equal(res.status, 400, `${res.status} ${res.reason}`);
      },
    );
  }
}

Deno.test("citysip serve over UDP and TCP", async (t) => {
  let server: TestServer | undefined;
  const ipv6 = hasIpv6Loopback();
  const peers: Peer[] = [];
  try {
    await t.step("the server starts on port 0 and logs its UDP and TCP ports", async () => {
      server = await startServer({
        flags: [
          "--min-expires",
          String(MIN_EXPIRES),
          "--max-expires",
          String(MAX_EXPIRES),
          "--default-expires",
          String(DEFAULT_EXPIRES),
          "--listen",
          "udp:127.0.0.1:0",
          "--listen",
          "tcp:127.0.0.1:0",
          ...(ipv6 ? ["--listen", "udp:[::1]:0", "--listen", "tcp:[::1]:0"] : []),
        ],
      });
      assert.ok(server.udpPort > 0 && server.tcpPort > 0);
    });
    if (server === undefined) return;
    const s = server;
    const udpPort = s.udpPort;
    const tcpPort = s.tcpPort;

    for (const transport of ["udp", "tcp"] as const) {
      const p = await peer(transport, transport === "udp" ? udpPort : tcpPort);
      peers.push(p);
      await registrarSteps(t, p, transport.toUpperCase());
    }

    await t.step(
      "TCP: several messages in one segment get one response each, in order (RFC 3261 §18.3)",
      async () => {
        await using tcp = await TcpClient.connect(tcpPort);
        const users = [newUser(), newUser(), newUser()];
        const sentBy = `127.0.0.1:${tcp.localPort}`;
        const msgs = users.map((user) =>
          buildRequest({ user, transport: "TCP", sentBy, contacts: [`<${contact(user)}>`] })
        );
        await tcp.send(concat(...msgs));
        for (const user of users) {
          const res = await tcp.readResponse();
          assertListed(res, [contact(user)]);
          assert.ok(res.header("to")?.includes(user), `response for ${user} in order`);
        }
      },
    );

    await t.step(
      "TCP: one message split over several segments, with a body (RFC 3261 §18.3)",
      async () => {
        await using tcp = await TcpClient.connect(tcpPort);
        const user = newUser();
        const msg = buildRequest({
          user,
          transport: "TCP",
          sentBy: `127.0.0.1:${tcp.localPort}`,
          contacts: [`<${contact(user)}>`],
          headers: { "Content-Type": "text/plain" },
          body: "a body split in two",
        });
        const headerEnd = textOf(msg).indexOf("\r\n\r\n");
        await tcp.sendSplit(msg, [7, 30, headerEnd + 1, headerEnd + 3, headerEnd + 10], 20);
        assertListed(await tcp.readResponse(), [contact(user)]);
      },
    );

    await t.step("TCP: one message sent byte by byte (RFC 3261 §18.3)", async () => {
      await using tcp = await TcpClient.connect(tcpPort);
      const user = newUser();
      const msg = buildRequest({
        user,
        transport: "TCP",
        sentBy: `127.0.0.1:${tcp.localPort}`,
        contacts: [`<${contact(user)}>`],
      });
      await tcp.sendByteByByte(msg);
      assertListed(await tcp.readResponse(), [contact(user)]);
    });

    await t.step(
      "TCP: CRLF CRLF keep-alive is answered with a single CRLF (RFC 5626 §4.4.1)",
      async () => {
        await using tcp = await TcpClient.connect(tcpPort);
        await tcp.send(bytesOf("\r\n\r\n"));
        assert.equal(textOf(await tcp.readRaw(2)), "\r\n");
        assert.equal(textOf(await tcp.drain(300)), "", "nothing more than one CRLF");
        const user = newUser();
        const res = await tcp.request(buildRequest({
          user,
          transport: "TCP",
          sentBy: `127.0.0.1:${tcp.localPort}`,
          contacts: [`<${contact(user)}>`],
        }));
        assertListed(res, [contact(user)]);
      },
    );

    await t.step("UDP: an ACK gets no response (RFC 3261 §17.2.1, §17.1.1.3)", async () => {
      await using udp = new UdpClient();
      await udp.send(
        buildRequest({
          method: "ACK",
          uri: "sip:bob@citysip.test",
          sentBy: `127.0.0.1:${udp.port}`,
        }),
        udpPort,
      );
      assert.equal(await udp.receive(300), null);
    });

    await t.step(
      "TCP: a message over --max-message-size gets 400 or a close, and the next client registers (RFC 3261 §18.3)",
      async () => {
        await using big = await TcpClient.connect(tcpPort);
        const msg = buildRequest({
          user: newUser(),
          transport: "TCP",
          sentBy: `127.0.0.1:${big.localPort}`,
          headers: { "X-Padding": "x".repeat(70_000) },
        });
        await big.send(msg).catch(() => {});
        const got = await big.drain(1000);
        if (got.length > 0) assert.equal(parseResponse(got).status, 400);
        else assert.ok(await big.waitClosed(3000), "no 400, so the flow is closed");
        const next = await peer("tcp", tcpPort);
        try {
          const user = newUser();
          assertListed(await next.send({ user, contacts: [`<${contact(user)}>`] }), [
            contact(user),
          ]);
        } finally {
          await next.close();
        }
      },
    );

    await t.step(
      "TCP: a message without Content-Length gets 400 or its flow is closed, and the flow is not read on (RFC 3261 §18.3, §20.14)",
      async () => {
        await using tcp = await TcpClient.connect(tcpPort);
        await tcp.send(buildRequest({
          user: newUser(),
          transport: "TCP",
          sentBy: `127.0.0.1:${tcp.localPort}`,
          headers: { "Content-Length": null },
        }));
        // The boundary is lost: a 400 is allowed, but the flow must end (stages/frame.ts closes it).
        const got = await tcp.drain(500);
        if (got.length > 0) assert.equal(parseResponse(got).status, 400);
        assert.ok(await tcp.waitClosed(3000), "the flow is closed");
      },
    );

    await t.step(
      "UDP: a line of garbage gets 400 or is dropped, and the next client registers (RFC 3261 §21.4.1)",
      async () => {
        await using bad = new UdpClient();
        await bad.send(bytesOf("this is not SIP at all\r\n"), udpPort);
        const got = await bad.receive(500);
        if (got !== null) assert.equal(parseResponse(got.bytes).status, 400);
        const next = await peer("udp", udpPort);
        try {
          const user = newUser();
          assertListed(await next.send({ user, contacts: [`<${contact(user)}>`] }), [
            contact(user),
          ]);
        } finally {
          await next.close();
        }
      },
    );

    await t.step(
      "TCP: a line of garbage gets 400 or is dropped, and the next client registers (RFC 3261 §21.4.1)",
      async () => {
        await using bad = await TcpClient.connect(tcpPort);
        await bad.send(bytesOf("this is not SIP at all\r\n\r\n"));
        const got = await bad.drain(500);
        if (got.length > 0) assert.equal(parseResponse(got).status, 400);
        const next = await peer("tcp", tcpPort);
        try {
          const user = newUser();
          assertListed(await next.send({ user, contacts: [`<${contact(user)}>`] }), [
            contact(user),
          ]);
        } finally {
          await next.close();
        }
      },
    );

    await t.step(
      "UDP: a retransmission (same branch) gets the same response and passes the CSeq check (RFC 3261 §17.2.2)",
      async () => {
        await using udp = new UdpClient();
        const user = newUser();
        const msg = buildRequest({
          user,
          sentBy: `127.0.0.1:${udp.port}`,
          branch: newBranch(),
          contacts: [`<${contact(user)}>;expires=300`],
        });
        const first = await udp.request(msg, udpPort);
        assertListed(first, [contact(user)]);
        const again = await udp.request(msg, udpPort);
        assert.equal(again.status, 200, `retransmission answered ${again.status} ${again.reason}`);
        assert.equal(again.header("to"), first.header("to"), "same To tag");
        assert.equal(textOf(again.raw), textOf(first.raw));
      },
    );

    await t.step(
      "UDP: with rport the response goes to the source port; Via gets received and rport (RFC 3581 §4, RFC 3261 §18.2.1)",
      async () => {
        await using udp = new UdpClient();
        const user = newUser();
        const res = await udp.request(
          buildRequest({
            user,
            sentBy: "192.0.2.1:5999",
            rport: true,
            contacts: [`<${contact(user)}>`],
          }),
          udpPort,
        );
        assert.equal(res.status, 200);
        const via = res.header("via") ?? "";
        assert.match(via, new RegExp(`;rport=${udp.port}(;|$)`));
        assert.match(via, /;received=127\.0\.0\.1(;|$)/);
      },
    );

    await t.step(
      "UDP: without rport the response goes to the Via sent-by port (RFC 3261 §18.2.2)",
      async () => {
        await using from = new UdpClient();
        await using sentBy = new UdpClient();
        const user = newUser();
        await from.send(
          buildRequest({
            user,
            sentBy: `127.0.0.1:${sentBy.port}`,
            rport: false,
            contacts: [`<${contact(user)}>`],
          }),
          udpPort,
        );
        const got = await sentBy.receive(3000);
        assert.ok(got !== null, "response at the sent-by port");
        assert.equal(parseResponse(got.bytes).status, 200);
        assert.equal(await from.receive(200), null, "nothing at the source port");
      },
    );

    if (ipv6) {
      const v6 = (transport: Transport) =>
        s.listening.find((l) => l.transport === transport && l.address.includes(":"))?.port ?? 0;
      for (const transport of ["udp", "tcp"] as const) {
        await t.step(
          `${transport.toUpperCase()} over IPv6 ::1: REGISTER -> 200 (RFC 3261 §10.3)`,
          async () => {
            const port = v6(transport);
            assert.ok(port > 0, `an IPv6 ${transport} listener was logged`);
            const p = await peer(transport, port, "::1");
            try {
              const user = newUser();
              const c = `sip:${user}@[2001:db8::1]:5060`;
              const res = await p.send({ user, contacts: [`<${c}>;expires=120`] });
              assertListed(res, [c]);
              assertExpires(res, c, 120);
            } finally {
              await p.close();
            }
          },
        );
      }
    } else {
      console.log("skipping IPv6 steps: this machine cannot bind ::1");
    }

    await t.step("the server logged no errors", () => {
      const errors = s.stderrLines.filter((l) => /\blevel=error\b/.test(l));
      assert.deepEqual(errors, []);
    });

    await t.step(
      "SIGTERM stops the server with exit code 0, closing an idle TCP flow",
      async () => {
        for (const p of peers.splice(0)) await p.close();
        await using idle = await TcpClient.connect(tcpPort);
        await idle.send(bytesOf("\r\n\r\n"));
        await idle.readRaw(2);
        const started = Date.now();
        assert.equal(await s.stop("SIGTERM"), 0, s.stderrLines.slice(-5).join("\n"));
        assert.ok(Date.now() - started < 5000, `stopping took ${Date.now() - started} ms`);
        assert.ok(await idle.waitClosed(1000), "the idle flow was closed");
      },
    );
  } finally {
    for (const p of peers) await p.close();
    await server?.stop("SIGKILL");
  }
});

Deno.test("citysip serve --domain example.com --min-expires 1", async (t) => {
  let server: TestServer | undefined;
  try {
    await t.step("the server starts serving example.com only", async () => {
      server = await startServer({ flags: ["--domain", "example.com", "--min-expires", "1"] });
    });
    if (server === undefined) return;
    const port = server.udpPort;
    await using udp = new UdpClient();
    const send = (spec: RequestSpec) =>
      udp.request(buildRequest({ sentBy: `127.0.0.1:${udp.port}`, ...spec }), port);

    await t.step("a REGISTER for a served domain -> 200 (RFC 3261 §10.3 step 1)", async () => {
      const user = newUser();
      const res = await send({ user, domain: "example.com", contacts: [`<${contact(user)}>`] });
      assertListed(res, [contact(user)]);
    });

    await t.step("a To domain that is not served -> 404 (RFC 3261 §10.3 step 5)", async () => {
      const user = newUser();
      const res = await send({
        user,
        domain: "other.org",
        uri: "sip:example.com",
        contacts: [`<${contact(user)}>`],
      });
      assert.equal(res.status, 404, `${res.status} ${res.reason}`);
    });

    await t.step("a Request-URI for a foreign domain -> 403 (RFC 3261 §10.3 step 1)", async () => {
      const user = newUser();
      const res = await send({
        user,
        domain: "example.com",
        uri: "sip:other.org",
        contacts: [`<${contact(user)}>`],
      });
      assert.equal(res.status, 403, `${res.status} ${res.reason}`);
    });

    await t.step("a binding is gone once its expires has passed (RFC 3261 §10.2.1)", async () => {
      const user = newUser();
      const [short, long] = [contact(user, 1), contact(user, 2)];
      const res = await send({
        user,
        domain: "example.com",
        contacts: [`<${short}>;expires=1`, `<${long}>;expires=60`],
      });
      assert.deepEqual(contactsOf(res).map((c) => c.uri).sort(), [short, long].sort());
      await new Promise((r) => setTimeout(r, 2100));
      assertListed(await send({ user, domain: "example.com" }), [long]);
    });

    await t.step("SIGTERM stops the server with exit code 0", async () => {
      assert.equal(await server!.stop("SIGTERM"), 0);
    });
  } finally {
    await server?.stop("SIGKILL");
  }
});
