import assert from "node:assert/strict";
import {
  digestEqual,
  digestResponse,
  formatDigestChallenge,
  ha1,
  parseDigestCredentials,
} from "../sip/digest.ts";
import { type AuthResult, DigestAuthenticator } from "../stages/auth.ts";
import type { SipRequest } from "../sip/message.ts";
import type { Subscriber, SubscriberStore } from "../storage/subscriber_store.ts";

const REALM = "example.com";
const REQUEST_URI = "sip:example.com";

/** Test double: a SubscriberStore in memory that counts lookups and can be made unreachable. */
class FakeSubscriberStore implements SubscriberStore {
  readonly #rows = new Map<string, Subscriber>();
  gets = 0;
  down = false;

  get(username: string, domain: string): Promise<Subscriber | null> {
    this.gets++;
    if (this.down) return Promise.reject(new Error("connection refused"));
    return Promise.resolve(this.#rows.get(`${domain}\n${username}`) ?? null);
  }
  put(s: Subscriber): Promise<void> {
    this.#rows.set(`${s.domain}\n${s.username}`, s);
    return Promise.resolve();
  }
  remove(username: string, domain: string): Promise<boolean> {
    return Promise.resolve(this.#rows.delete(`${domain}\n${username}`));
  }
  list(): Promise<readonly Subscriber[]> {
    return Promise.resolve([...this.#rows.values()]);
  }
}

function subscriber(username: string, password: string, domain = REALM): Subscriber {
  return {
    username,
    domain,
    ha1Md5: ha1(username, domain, password, "MD5"),
    ha1Sha256: ha1(username, domain, password, "SHA-256"),
  };
}

function register(authorization?: string, uri = REQUEST_URI): SipRequest {
  const headers = [
    { name: "to", value: `<sip:alice@${REALM}>` },
    { name: "from", value: `<sip:alice@${REALM}>;tag=1` },
  ];
  if (authorization !== undefined) headers.push({ name: "authorization", value: authorization });
  return {
    kind: "request",
    method: "REGISTER",
    uri,
    version: "SIP/2.0",
    headers,
    body: new Uint8Array(),
  };
}

function challenges(result: AuthResult): string[] {
  assert.equal(result.ok, false);
  assert.ok(!result.ok && result.status === 401, `expected 401, got ${JSON.stringify(result)}`);
  return result.headers.map(([name, value]) => {
    assert.equal(name, "WWW-Authenticate");
    return value;
  });
}

function nonceOf(challenge: string): string {
  const m = /nonce="([^"]*)"/.exec(challenge);
  assert.ok(m !== null);
  return m[1]!;
}

/** Answers a challenge the way SIPp formats its Authorization header. */
function answer(
  nonce: string,
  username: string,
  password: string,
  options: { algorithm?: "MD5" | "SHA-256"; nc?: string; uri?: string; realm?: string } = {},
): string {
  const algorithm = options.algorithm ?? "MD5";
  const nc = options.nc ?? "00000001";
  const uri = options.uri ?? REQUEST_URI;
  const realm = options.realm ?? REALM;
  const cnonce = "6b8b4567";
  const response = digestResponse({
    algorithm,
    ha1: ha1(username, realm, password, algorithm),
    method: "REGISTER",
    uri,
    nonce,
    qop: "auth",
    nc,
    cnonce,
  });
  return `Digest username="${username}",realm="${realm}",cnonce="${cnonce}",nc=${nc},qop=auth,` +
    `uri="${uri}",nonce="${nonce}",response="${response}",algorithm=${algorithm}`;
}

function setup(now = { t: 1_700_000_000_000 }) {
  const store = new FakeSubscriberStore();
  const auth = new DigestAuthenticator({
    subscribers: store,
    secret: new TextEncoder().encode("0123456789abcdef0123456789abcdef"),
    now: () => now.t,
  });
  return { store, auth, now };
}

async function freshNonce(auth: DigestAuthenticator): Promise<string> {
  return nonceOf(challenges(await auth.check(register(), REALM))[0]!);
}

Deno.test("digest response test vectors", async (t) => {
  await t.step("RFC 2617 §3.5: MD5, qop=auth (Mufasa)", () => {
    const response = digestResponse({
      algorithm: "MD5",
      ha1: ha1("Mufasa", "testrealm@host.com", "Circle Of Life", "MD5"),
      method: "GET",
      uri: "/dir/index.html",
      nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
      qop: "auth",
      nc: "00000001",
      cnonce: "0a4f113b",
    });
    assert.equal(response, "6629fae49393a05397450978507c4ef1");
  });

  const rfc7616 = {
    method: "GET",
    uri: "/dir/index.html",
    nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    qop: "auth",
    nc: "00000001",
    cnonce: "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
  } as const;

  await t.step("RFC 7616 §3.9.1: SHA-256, qop=auth", () => {
    const response = digestResponse({
      ...rfc7616,
      algorithm: "SHA-256",
      ha1: ha1("Mufasa", "http-auth@example.org", "Circle of Life", "SHA-256"),
    });
    assert.equal(response, "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1");
  });

  await t.step("RFC 7616 §3.9.1: MD5, qop=auth", () => {
    const response = digestResponse({
      ...rfc7616,
      algorithm: "MD5",
      ha1: ha1("Mufasa", "http-auth@example.org", "Circle of Life", "MD5"),
    });
    assert.equal(response, "8ca523f5e9506fed4657c9700eebdbec");
  });

  await t.step("RFC 2069 form (no qop) is H(HA1:nonce:HA2)", () => {
    const a1 = ha1("u", "r", "p", "MD5");
    const response = digestResponse({
      algorithm: "MD5",
      ha1: a1,
      method: "REGISTER",
      uri: "sip:r",
      nonce: "n",
    });
    const with2617 = digestResponse({
      algorithm: "MD5",
      ha1: a1,
      method: "REGISTER",
      uri: "sip:r",
      nonce: "n",
      qop: "auth",
      nc: "00000001",
      cnonce: "c",
    });
    assert.equal(response.length, 32);
    assert.notEqual(response, with2617);
  });

  await t.step("digestEqual() compares hex case-insensitively and rejects other lengths", () => {
    assert.ok(digestEqual("abcdef", "ABCDEF"));
    assert.ok(!digestEqual("abcdef", "abcdee"));
    assert.ok(!digestEqual("abcdef", "abcdef0"));
  });
});

Deno.test("parseDigestCredentials() (RFC 3261 §25.1 credentials)", async (t) => {
  const nonce = "KJHkjh78_-x";
  await t.step("accepts the SIPp format", () => {
    const r = parseDigestCredentials(
      `Digest username="alice",realm="example.com",cnonce="6b8b4567",nc=00000001,qop=auth,` +
        `uri="sip:example.com",nonce="${nonce}",response="0123456789ABCDEF0123456789abcdef",` +
        `algorithm=MD5`,
    );
    assert.ok(r.ok);
    assert.equal(r.value.username, "alice");
    assert.equal(r.value.realm, "example.com");
    assert.equal(r.value.nonce, nonce);
    assert.equal(r.value.uri, "sip:example.com");
    assert.equal(r.value.response, "0123456789abcdef0123456789abcdef");
    assert.equal(r.value.algorithm, "MD5");
    assert.equal(r.value.nc, "00000001");
    assert.equal(r.value.qop, "auth");
    assert.equal(r.value.cnonce, "6b8b4567");
  });

  await t.step("accepts the sipsak format (spaces, quoted qop, lower-case scheme)", () => {
    const r = parseDigestCredentials(
      `digest  username = "alice" ,realm="example.com", nonce="${nonce}", ` +
        `uri="sip:example.com", response="0123456789abcdef0123456789abcdef", ` +
        `algorithm=MD5, cnonce="1a2b", qop="auth", nc=0000000a`,
    );
    assert.ok(r.ok);
    assert.equal(r.value.username, "alice");
    assert.equal(r.value.qop, "auth");
    assert.equal(r.value.nc, "0000000a");
  });

  await t.step(
    "handles escapes and commas inside quoted strings (RFC 3261 §25.1 quoted-pair)",
    () => {
      const r = parseDigestCredentials(
        `Digest username="a\\"b\\\\c, d",realm="ex,ample",nonce="n",uri="sip:x",` +
          `response="00",opaque="o=1,2",x-extra=token`,
      );
      assert.ok(r.ok);
      assert.equal(r.value.username, 'a"b\\c, d');
      assert.equal(r.value.realm, "ex,ample");
      assert.equal(r.value.opaque, "o=1,2");
      assert.equal(r.value.params.get("x-extra"), "token");
    },
  );

  await t.step("tolerates folded whitespace and empty list elements", () => {
    const r = parseDigestCredentials(
      `Digest\r\n username="u",\t realm="r",,nonce="n" ,uri="sip:r",\r\n response="00",`,
    );
    assert.ok(r.ok, JSON.stringify(r));
    assert.equal(r.value.username, "u");
  });

  const malformed: [string, string][] = [
    ["other scheme", `Basic YWxhZGRpbjpvcGVuc2VzYW1l`],
    ["no directives", `Digest`],
    ["unterminated quote", `Digest username="alice,realm="r"`],
    [
      "duplicate directive",
      `Digest username="a",username="b",realm="r",nonce="n",uri="u",response="00"`,
    ],
    ["missing response", `Digest username="a",realm="r",nonce="n",uri="u"`],
    ["non-hex response", `Digest username="a",realm="r",nonce="n",uri="u",response="zz"`],
    [
      "qop without nc",
      `Digest username="a",realm="r",nonce="n",uri="u",response="00",qop=auth,cnonce="c"`,
    ],
    [
      "qop without cnonce",
      `Digest username="a",realm="r",nonce="n",uri="u",response="00",qop=auth,nc=00000001`,
    ],
    [
      "short nc",
      `Digest username="a",realm="r",nonce="n",uri="u",response="00",qop=auth,nc=1,cnonce="c"`,
    ],
    ["missing comma", `Digest username="a" realm="r",nonce="n",uri="u",response="00"`],
    ["missing value", `Digest username=,realm="r",nonce="n",uri="u",response="00"`],
  ];
  for (const [name, value] of malformed) {
    await t.step(`rejects ${name}`, () => {
      assert.equal(parseDigestCredentials(value).ok, false);
    });
  }
});

Deno.test("formatDigestChallenge() (RFC 3261 §25.1 challenge, RFC 8760)", async (t) => {
  await t.step("quotes realm and nonce, offers qop=auth", () => {
    assert.equal(
      formatDigestChallenge({ realm: 'a"b', nonce: "n", algorithm: "SHA-256" }),
      `Digest realm="a\\"b", nonce="n", algorithm=SHA-256, qop="auth"`,
    );
  });
  await t.step("adds stale=true", () => {
    assert.match(
      formatDigestChallenge({ realm: "r", nonce: "n", algorithm: "MD5", stale: true }),
      /, stale=true$/,
    );
  });
});

Deno.test("DigestAuthenticator.check()", async (t) => {
  await t.step(
    "challenges without credentials: SHA-256 then MD5, one nonce (RFC 8760 §2.4)",
    async () => {
      const { auth, store } = setup();
      const [sha, md5, ...rest] = challenges(await auth.check(register(), REALM));
      assert.equal(rest.length, 0);
      assert.match(
        sha!,
        /^Digest realm="example\.com", nonce="[A-Za-z0-9_-]{48}", algorithm=SHA-256, qop="auth"$/,
      );
      assert.match(
        md5!,
        /^Digest realm="example\.com", nonce="[A-Za-z0-9_-]{48}", algorithm=MD5, qop="auth"$/,
      );
      assert.equal(nonceOf(sha!), nonceOf(md5!));
      assert.equal(store.gets, 0, "a challenge costs no lookup");
    },
  );

  await t.step("nonces are fresh per challenge", async () => {
    const { auth } = setup();
    assert.notEqual(await freshNonce(auth), await freshNonce(auth));
  });

  await t.step("accepts good MD5 credentials (RFC 2617 §3.2.2)", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const result = await auth.check(register(answer(nonce, "alice", "secret")), REALM, "alice");
    assert.deepEqual(result, { ok: true, username: "alice", realm: REALM });
  });

  await t.step("accepts good SHA-256 credentials (RFC 8760 §2)", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const result = await auth.check(
      register(answer(nonce, "alice", "secret", { algorithm: "SHA-256" })),
      REALM,
      "alice",
    );
    assert.deepEqual(result, { ok: true, username: "alice", realm: REALM });
  });

  await t.step("accepts increasing nc on one nonce (RFC 2617 §3.2.2 nonce-count)", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    for (const nc of ["00000001", "00000002", "0000000a"]) {
      const result = await auth.check(register(answer(nonce, "alice", "secret", { nc })), REALM);
      assert.equal(result.ok, true, nc);
    }
  });

  await t.step(
    "refuses a repeated or lower nc with a fresh challenge (RFC 2617 §3.2.2)",
    async () => {
      const { auth, store } = setup();
      await store.put(subscriber("alice", "secret"));
      const nonce = await freshNonce(auth);
      const first = register(answer(nonce, "alice", "secret", { nc: "00000002" }));
      assert.equal((await auth.check(first, REALM)).ok, true);
      for (const nc of ["00000002", "00000001"]) {
        const replay = register(answer(nonce, "alice", "secret", { nc }));
        const [sha] = challenges(await auth.check(replay, REALM));
        assert.notEqual(nonceOf(sha!), nonce);
      }
    },
  );

  await t.step("wrong password and unknown user get the same 401 (no enumeration)", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const wrong = await auth.check(register(answer(nonce, "alice", "guess")), REALM);
    const unknown = await auth.check(register(answer(nonce, "mallory", "guess")), REALM);
    const shape = (r: AuthResult) =>
      challenges(r).map((c) => c.replace(/nonce="[^"]*"/, 'nonce="*"'));
    assert.deepEqual(shape(wrong), shape(unknown));
    assert.deepEqual(shape(wrong), [
      `Digest realm="example.com", nonce="*", algorithm=SHA-256, qop="auth"`,
      `Digest realm="example.com", nonce="*", algorithm=MD5, qop="auth"`,
    ]);
    assert.equal(store.gets, 2, "both looked up");
  });

  await t.step("expired nonce with right digest -> stale=true (RFC 2617 §3.2.1)", async () => {
    const { auth, store, now } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    now.t += 301_000;
    const [sha, md5] = challenges(
      await auth.check(register(answer(nonce, "alice", "secret")), REALM),
    );
    assert.match(sha!, /, stale=true$/);
    assert.match(md5!, /, stale=true$/);
    assert.notEqual(nonceOf(sha!), nonce);
  });

  await t.step("expired nonce with wrong digest -> no stale", async () => {
    const { auth, store, now } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    now.t += 301_000;
    const [sha] = challenges(await auth.check(register(answer(nonce, "alice", "guess")), REALM));
    assert.doesNotMatch(sha!, /stale/);
  });

  await t.step("tampered or foreign nonce -> 401 without stale, no lookup", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const flipped = nonce[10] === "A" ? "B" : "A";
    const tampered = nonce.slice(0, 10) + flipped + nonce.slice(11);
    const other = new DigestAuthenticator({
      subscribers: store,
      secret: new TextEncoder().encode("another secret, another server"),
    });
    for (const bad of [tampered, "dcd98b7102dd2f0e8b11d0f600bfb0c093", await freshNonce(other)]) {
      const [sha] = challenges(await auth.check(register(answer(bad, "alice", "secret")), REALM));
      assert.doesNotMatch(sha!, /stale/);
    }
    assert.equal(store.gets, 0);
  });

  await t.step("a nonce from another realm is refused", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret", "other.org"));
    const nonce = nonceOf(challenges(await auth.check(register(), REALM))[0]!);
    const creds = answer(nonce, "alice", "secret", { realm: "other.org" });
    const result = await auth.check(register(creds), "other.org");
    assert.equal(result.ok, false);
    assert.ok(!result.ok && result.status === 401);
  });

  await t.step("credentials for another realm are ignored -> challenge", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const creds = answer(nonce, "alice", "secret", { realm: "other.org" });
    challenges(await auth.check(register(creds), REALM));
  });

  await t.step("authenticated user other than the To user -> 403 (RFC 3261 §10.3)", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const result = await auth.check(register(answer(nonce, "alice", "secret")), REALM, "bob");
    assert.equal(result.ok, false);
    assert.ok(!result.ok && result.status === 403);
  });

  await t.step("wrong password with a To mismatch is still 401, not 403", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    challenges(await auth.check(register(answer(nonce, "alice", "guess")), REALM, "bob"));
  });

  await t.step("store outage -> 503 with Retry-After", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    store.down = true;
    const nonce = await freshNonce(auth);
    const result = await auth.check(register(answer(nonce, "alice", "secret")), REALM);
    assert.deepEqual(result, { ok: false, status: 503, retryAfter: 5 });
  });

  await t.step("malformed credentials -> 400", async () => {
    const { auth } = setup();
    const result = await auth.check(register(`Digest username="alice,realm=`), REALM);
    assert.equal(result.ok, false);
    assert.ok(!result.ok && result.status === 400);
  });

  await t.step("digest uri other than the Request-URI is accepted by default (SIPp)", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const creds = answer(nonce, "alice", "secret", { uri: "sip:127.0.0.1:5070" });
    assert.equal((await auth.check(register(creds), REALM)).ok, true);
  });

  await t.step("requireUriMatch: other digest uri -> 400 (RFC 2617 §3.2.2.5)", async () => {
    const store = new FakeSubscriberStore();
    await store.put(subscriber("alice", "secret"));
    const auth = new DigestAuthenticator({
      subscribers: store,
      secret: new Uint8Array(32),
      requireUriMatch: true,
    });
    const nonce = await freshNonce(auth);
    const creds = answer(nonce, "alice", "secret", { uri: "sip:elsewhere.net" });
    const result = await auth.check(register(creds), REALM);
    assert.ok(!result.ok && result.status === 400);
    const same = answer(await freshNonce(auth), "alice", "secret", { uri: "SIP:EXAMPLE.COM" });
    assert.equal((await auth.check(register(same), REALM)).ok, true);
  });

  await t.step("algorithms: challenge order and what is accepted (RFC 8760 §2.4)", async () => {
    const store = new FakeSubscriberStore();
    await store.put(subscriber("alice", "secret"));
    const auth = new DigestAuthenticator({
      subscribers: store,
      secret: new Uint8Array(32),
      algorithms: ["MD5"],
    });
    const list = challenges(await auth.check(register(), REALM));
    assert.equal(list.length, 1);
    assert.match(list[0]!, /algorithm=MD5/);
    const nonce = nonceOf(list[0]!);
    const sha = answer(nonce, "alice", "secret", { algorithm: "SHA-256" });
    challenges(await auth.check(register(sha), REALM));
    assert.equal((await auth.check(register(answer(nonce, "alice", "secret")), REALM)).ok, true);
    assert.throws(
      () =>
        new DigestAuthenticator({ subscribers: store, secret: new Uint8Array(32), algorithms: [] }),
      RangeError,
    );
  });

  await t.step("RFC 2069 answer (no qop) is refused with a challenge", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonce = await freshNonce(auth);
    const response = digestResponse({
      algorithm: "MD5",
      ha1: ha1("alice", REALM, "secret", "MD5"),
      method: "REGISTER",
      uri: REQUEST_URI,
      nonce,
    });
    const creds = `Digest username="alice", realm="${REALM}", nonce="${nonce}", ` +
      `uri="${REQUEST_URI}", response="${response}", algorithm=MD5`;
    challenges(await auth.check(register(creds), REALM));
  });

  await t.step("unsupported algorithm (MD5-sess) is refused with a challenge", async () => {
    const { auth } = setup();
    const nonce = await freshNonce(auth);
    const creds = answer(nonce, "alice", "secret").replace("algorithm=MD5", "algorithm=MD5-sess");
    challenges(await auth.check(register(creds), REALM));
  });

  await t.step("caches lookups, negative ones too, until the TTL passes", async () => {
    const { auth, store, now } = setup();
    await store.put(subscriber("alice", "secret"));
    for (const user of ["alice", "mallory"]) {
      for (let i = 1; i <= 3; i++) {
        const nonce = await freshNonce(auth);
        await auth.check(register(answer(nonce, user, "secret", { nc: "00000001" })), REALM);
      }
    }
    assert.equal(store.gets, 2);
    now.t += 31_000;
    const nonce = await freshNonce(auth);
    assert.equal((await auth.check(register(answer(nonce, "alice", "secret")), REALM)).ok, true);
    assert.equal(store.gets, 3);
  });

  await t.step("forget() drops a cached lookup", async () => {
    const { auth, store } = setup();
    const nonce = await freshNonce(auth);
    challenges(await auth.check(register(answer(nonce, "alice", "secret")), REALM));
    await store.put(subscriber("alice", "secret"));
    auth.forget("alice", REALM);
    const nonce2 = await freshNonce(auth);
    assert.equal((await auth.check(register(answer(nonce2, "alice", "secret")), REALM)).ok, true);
  });

  await t.step("concurrent lookups of one subscriber share one query", async () => {
    const { auth, store } = setup();
    await store.put(subscriber("alice", "secret"));
    const nonces = await Promise.all([1, 2, 3].map(() => freshNonce(auth)));
    const results = await Promise.all(
      nonces.map((n) => auth.check(register(answer(n, "alice", "secret")), REALM)),
    );
    assert.ok(results.every((r) => r.ok));
    assert.equal(store.gets, 1);
  });

  await t.step("nonce-count table evicts the oldest and then refuses older nonces", async () => {
    const store = new FakeSubscriberStore();
    await store.put(subscriber("alice", "secret"));
    const now = { t: 1_700_000_000_000 };
    const auth = new DigestAuthenticator({
      subscribers: store,
      secret: new Uint8Array(32),
      nonceCountMaxEntries: 2,
      now: () => now.t,
    });
    const nonces: string[] = [];
    for (let i = 0; i < 3; i++) {
      nonces.push(await freshNonce(auth));
      now.t += 1;
    }
    const ok = async (n: string, nc: string) =>
      (await auth.check(register(answer(n, "alice", "secret", { nc })), REALM)).ok;
    assert.ok(await ok(nonces[0]!, "00000001"));
    assert.ok(await ok(nonces[1]!, "00000001"));
    assert.ok(await ok(nonces[2]!, "00000001")); // evicts nonces[0]
    assert.equal(await ok(nonces[0]!, "00000001"), false, "evicted nonce replay refused");
    assert.ok(await ok(nonces[2]!, "00000002"));
  });

  // Authorization headers captured from the real tools answering this authenticator's challenge
  // (secret of 32 bytes of 7, alice/secret, MD5 challenge first). Their digest uri is the target
  // address, not the Request-URI.
  const captured: [string, number, string][] = [
    [
      "SIPp 3.6.1 [authentication]",
      1795614359885,
      'Digest username="alice",realm="example.com",cnonce="66334873",nc=00000001,qop=auth,' +
      'uri="sip:127.0.0.1:5070",nonce="AAABohL0wU0FbgfXwbvQ1D9AXiRTqKmScBQCIOu7O01oGASg",' +
      'response="1ff7c0477170c1e505d87b3b7748ae01",algorithm=MD5',
    ],
    [
      "sipsak -U -u alice -a",
      1795614391017,
      'Digest username="alice", uri="sip:127.0.0.1:5070", algorithm=MD5, realm="example.com", ' +
      'nonce="AAABohL1Oun94AWEnLGrdyf9lekJTo5-MvhrgmqiB4RXzAeL", qop=auth, nc=00000001, ' +
      'cnonce="373ee809", response="dd444aee704d69d4ae8e2709f857fdc6"',
    ],
  ];
  for (const [tool, issuedAt, authorization] of captured) {
    await t.step(`accepts a real ${tool} answer`, async () => {
      const store = new FakeSubscriberStore();
      await store.put(subscriber("alice", "secret"));
      const auth = new DigestAuthenticator({
        subscribers: store,
        secret: new Uint8Array(32).fill(7),
        now: () => issuedAt + 50,
      });
      const result = await auth.check(register(authorization), REALM, "alice");
      assert.deepEqual(result, { ok: true, username: "alice", realm: REALM });
    });
  }

  await t.step("constructor rejects a short secret", () => {
    assert.throws(
      () =>
        new DigestAuthenticator({
          subscribers: new FakeSubscriberStore(),
          secret: new Uint8Array(8),
        }),
      RangeError,
    );
  });
});
