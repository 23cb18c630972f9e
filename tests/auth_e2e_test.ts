/**
 * Digest authentication of `citysip serve --auth` end to end (issue 4 item 3): subscribers added with
 * `citysip user add` (password on stdin), REGISTER challenged with 401 carrying SHA-256 and MD5
 * challenges (RFC 3261 §22.1, RFC 8760 §2.4), no user enumeration, credentials computed here
 * (RFC 3261 §22.4, RFC 2617 §3.2.2, RFC 8760 §2), wrong password and nonce-count replay refused, 403
 * for another user's AOR (RFC 3261 §10.3 step 3), SIPp's `[authentication]` and sipsak `-a` as real
 * clients, and `citysip user list|del`.
 *
 * Runs against a database of its own on the PostgreSQL server; skipped with a printed reason without
 * PostgreSQL (or SIPp, sipsak), except under CI=true.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  type Citysip,
  citysip,
  contactExpires,
  hasTool,
  pgUnavailable,
  requiringTest,
  run,
  sipRequest,
  type SipResponse,
  SipUdp,
  startCitysip,
  tempDatabase,
} from "./_durability_helpers.ts";

const pgDown = await pgUnavailable();
const needs = [
  ...(pgDown === null ? [] : [pgDown]),
  ...(await hasTool("sipp", "-v") ? [] : ["sipp is not installed (apt-get install sip-tester)"]),
  ...(await hasTool("sipsak", "--version") ? [] : ["sipsak is not installed"]),
];
const SCENARIO = new URL("./sipp/register_auth.xml", import.meta.url).pathname;
const DOMAIN = "citysip.test";
const REQUEST_URI = `sip:${DOMAIN}`;

type Algorithm = "MD5" | "SHA-256";

function h(algorithm: Algorithm, text: string): string {
  return createHash(algorithm === "MD5" ? "md5" : "sha256").update(text).digest("hex");
}

/** The parameters of one `WWW-Authenticate: Digest ...` value, names lower-case. */
function challengeParams(value: string): Map<string, string> {
  assert.match(value, /^Digest\s/i, value);
  const params = new Map<string, string>();
  for (const m of value.slice(7).matchAll(/([A-Za-z-]+)\s*=\s*(?:"([^"]*)"|([^,\s]+))/g)) {
    params.set(m[1]!.toLowerCase(), m[2] ?? m[3]!);
  }
  return params;
}

/** An Authorization value answering `challenge` (RFC 3261 §22.4 with qop=auth, RFC 8760 §2). */
function authorization(
  challenge: Map<string, string>,
  user: string,
  password: string,
  nc = 1,
): string {
  const algorithm = (challenge.get("algorithm") ?? "MD5").toUpperCase() as Algorithm;
  const realm = challenge.get("realm")!;
  const nonce = challenge.get("nonce")!;
  const cnonce = crypto.randomUUID().slice(0, 8);
  const ncHex = nc.toString(16).padStart(8, "0");
  const ha1 = h(algorithm, `${user}:${realm}:${password}`);
  const ha2 = h(algorithm, `REGISTER:${REQUEST_URI}`);
  const response = h(algorithm, `${ha1}:${nonce}:${ncHex}:${cnonce}:auth:${ha2}`);
  return `Digest username="${user}", realm="${realm}", nonce="${nonce}", uri="${REQUEST_URI}", ` +
    `response="${response}", algorithm=${algorithm}, qop=auth, nc=${ncHex}, cnonce="${cnonce}"`;
}

/** The challenge of `res` for `algorithm`. */
function challengeFor(res: SipResponse, algorithm: Algorithm): Map<string, string> {
  const c = res.lines("www-authenticate").map(challengeParams).find((p) =>
    p.get("algorithm")?.toUpperCase() === algorithm
  );
  assert.ok(c, `no ${algorithm} challenge in ${res.text}`);
  return c;
}

/** The challenges' shape: parameter names and values, with the nonce's value left out. */
function shape(res: SipResponse): string[] {
  return res.lines("www-authenticate").map((v) =>
    [...challengeParams(v)].map(([k, val]) =>
      k === "nonce" ? `nonce(${val.length})` : `${k}=${val}`
    )
      .sort().join(",")
  );
}

requiringTest(
  "digest authentication end to end: citysip user, 401 with SHA-256 and MD5, no enumeration, 403, SIPp [authentication], sipsak -a (issue 4 item 3; RFC 3261 §22, §10.3; RFC 8760 §2.4)",
  needs,
  async (t) => {
    const db = await tempDatabase();
    const dir = await Deno.makeTempDir({ prefix: "citysip-auth-" });
    const client = new SipUdp();
    let server: Citysip | undefined;
    const passwords = { alice: "alice-Secret-1", bob: "bob-Secret-2", carol: "carol-Secret-3" };
    const register = async (
      user: string,
      auth?: string,
      extra: { cseq?: number; callId?: string } = {},
    ) => {
      const res = await client.request(
        sipRequest({
          user,
          localPort: client.port,
          callId: extra.callId ?? crypto.randomUUID(),
          cseq: extra.cseq ?? 1,
          contact: `sip:${user}@192.0.2.5:5060`,
          expires: 600,
          ...(auth === undefined ? {} : { authorization: auth }),
        }),
        server!.udpPort,
      );
      assert.ok(res, "no answer");
      return res;
    };
    try {
      await t.step("citysip user add reads the password from stdin's first line", async () => {
        for (const [user, password] of Object.entries(passwords)) {
          const r = await citysip(
            ["user", "add", `${user}@${DOMAIN}`, "--db", db.url],
            `${password}\nnot-the-password\n`,
          );
          assert.equal(r.code, 0, r.stderr);
          assert.match(r.stdout, new RegExp(`added ${user}@${DOMAIN}`));
        }
      });

      await t.step("subscribers hold HA1 for MD5 and SHA-256, never the password", async () => {
        const rows = await db.sql<{ username: string; ha1_md5: string; ha1_sha256: string }[]>`
          SELECT * FROM subscribers ORDER BY username`;
        assert.deepEqual(rows.map((r) => r.username), ["alice", "bob", "carol"]);
        const alice = rows[0]!;
        assert.equal(alice.ha1_md5, h("MD5", `alice:${DOMAIN}:${passwords.alice}`));
        assert.equal(alice.ha1_sha256, h("SHA-256", `alice:${DOMAIN}:${passwords.alice}`));
        const all = JSON.stringify(await db.sql`SELECT * FROM subscribers`);
        for (const p of Object.values(passwords)) assert.ok(!all.includes(p));
      });

      await t.step("citysip user list lists them; user del removes one", async () => {
        let r = await citysip(["user", "list", "--db", db.url]);
        assert.equal(r.code, 0, r.stderr);
        assert.deepEqual(r.stdout.trim().split("\n"), [
          `alice@${DOMAIN}`,
          `bob@${DOMAIN}`,
          `carol@${DOMAIN}`,
        ]);
        r = await citysip(["user", "del", `carol@${DOMAIN}`, "--db", db.url]);
        assert.equal(r.code, 0, r.stderr);
        r = await citysip(["user", "list", "--db", db.url]);
        assert.deepEqual(r.stdout.trim().split("\n"), [`alice@${DOMAIN}`, `bob@${DOMAIN}`]);
        r = await citysip(["user", "del", `carol@${DOMAIN}`, "--db", db.url]);
        assert.equal(r.code, 1, "deleting a missing user fails");
      });

      server = await startCitysip([
        "--auth",
        "--db",
        db.url,
        "--workers",
        "1",
        "--listen",
        "udp:127.0.0.1:0",
      ]);

      let aliceChallenge: SipResponse | undefined;
      await t.step(
        "REGISTER without credentials: 401 with SHA-256 then MD5 challenges, qop=auth (RFC 8760 §2.4)",
        async () => {
          const res = await register("alice");
          assert.equal(res.status, 401, res.text);
          const challenges = res.lines("www-authenticate").map(challengeParams);
          assert.equal(challenges.length, 2, res.text);
          assert.deepEqual(challenges.map((c) => c.get("algorithm")), ["SHA-256", "MD5"]);
          for (const c of challenges) {
            assert.equal(c.get("realm"), DOMAIN);
            assert.equal(c.get("qop"), "auth");
            assert.ok((c.get("nonce") ?? "").length >= 16);
          }
          aliceChallenge = res;
        },
      );

      await t.step(
        "unknown and known users get the same challenge shape (no enumeration)",
        async () => {
          const unknown = await register("nobody");
          const deleted = await register("carol");
          const known = aliceChallenge!;
          assert.equal(unknown.status, 401);
          assert.equal(deleted.status, 401);
          assert.deepEqual(shape(unknown), shape(known));
          assert.deepEqual(shape(deleted), shape(known));
          // Wrong credentials of an unknown user are answered like a known user's wrong password.
          const bad = await register(
            "nobody",
            authorization(challengeFor(unknown, "SHA-256"), "nobody", "x"),
          );
          const wrong = await register(
            "alice",
            authorization(challengeFor(known, "SHA-256"), "alice", "x"),
          );
          assert.equal(bad.status, 401, bad.text);
          assert.equal(wrong.status, 401, wrong.text);
          assert.deepEqual(shape(bad), shape(wrong));
        },
      );

      for (const algorithm of ["SHA-256", "MD5"] as const) {
        await t.step(
          `correct ${algorithm} credentials: 200 and the binding is stored`,
          async () => {
            const callId = crypto.randomUUID();
            const first = await register("alice", undefined, { callId });
            const res = await register(
              "alice",
              authorization(challengeFor(first, algorithm), "alice", passwords.alice),
              { callId, cseq: 2 },
            );
            assert.equal(res.status, 200, res.text);
            assert.equal(contactExpires(res).get("sip:alice@192.0.2.5:5060"), 600);
            const rows = await db
              .sql`SELECT call_id FROM locations WHERE aor = ${`sip:alice@${DOMAIN}`}`;
            assert.deepEqual(rows.map((r) => r.call_id), [callId]);
          },
        );
      }

      await t.step("wrong password: 401 again, nothing stored", async () => {
        const first = await register("bob");
        const res = await register(
          "bob",
          authorization(challengeFor(first, "SHA-256"), "bob", passwords.alice),
        );
        assert.equal(res.status, 401, res.text);
        assert.equal(res.lines("www-authenticate").length, 2);
        const rows = await db.sql`SELECT 1 FROM locations WHERE aor = ${`sip:bob@${DOMAIN}`}`;
        assert.equal(rows.length, 0);
      });

      await t.step("a replayed nonce count is refused with 401", async () => {
        const first = await register("bob");
        const auth = authorization(challengeFor(first, "SHA-256"), "bob", passwords.bob);
        const callId = crypto.randomUUID();
        assert.equal((await register("bob", auth, { callId, cseq: 2 })).status, 200);
        const replay = await register("bob", auth, { callId, cseq: 3 });
        assert.equal(replay.status, 401, replay.text);
      });

      await t.step(
        "bob's valid credentials for alice's AOR: 403 (RFC 3261 §10.3 step 3)",
        async () => {
          const first = await register("alice");
          const auth = authorization(challengeFor(first, "SHA-256"), "bob", passwords.bob);
          const res = await register("alice", auth);
          assert.equal(res.status, 403, res.text);
        },
      );

      await t.step("SIGTERM stops the server", async () => {
        assert.equal((await server!.stop("SIGTERM")).code, 0);
      });

      // SIPp and sipsak answer only the first challenge, and only with MD5.
      server = await startCitysip([
        "--auth",
        "--digest-algorithms",
        "MD5,SHA-256",
        "--db",
        db.url,
        "--workers",
        "1",
        "--listen",
        "udp:127.0.0.1:0",
      ]);

      await t.step("--digest-algorithms MD5,SHA-256 puts the MD5 challenge first", async () => {
        const res = await register("alice");
        assert.equal(res.status, 401);
        assert.deepEqual(
          res.lines("www-authenticate").map((v) => challengeParams(v).get("algorithm")),
          ["MD5", "SHA-256"],
        );
      });

      await t.step("SIPp [authentication]: 100 REGISTERs, 100 successful, 0 failed", async () => {
        const csv = `${dir}/users.csv`;
        await Deno.writeTextFile(
          csv,
          "SEQUENTIAL\nalice\n",
        );
        const stat = `${dir}/stat.csv`;
        const r = await run("sipp", [
          "-sf",
          SCENARIO,
          "-inf",
          csv,
          "-au",
          "alice",
          "-ap",
          passwords.alice,
          "-t",
          "u1",
          "-i",
          "127.0.0.1",
          "-r",
          "50",
          "-m",
          "100",
          "-nostdin",
          "-trace_stat",
          "-stf",
          stat,
          "-trace_err",
          "-error_file",
          `${dir}/errors.log`,
          "-timeout",
          "30s",
          `127.0.0.1:${server!.udpPort}`,
        ], { timeoutMs: 60_000, cwd: dir });
        const rows = (await Deno.readTextFile(stat)).trim().split("\n");
        const header = rows[0]!.split(";");
        const last = rows[rows.length - 1]!.split(";");
        const col = (name: string) => Number(last[header.indexOf(name)]);
        const why = `sipp exit ${r.code}\n${r.stderr.slice(-800)}\n${
          (await Deno.readTextFile(`${dir}/errors.log`).catch(() => "")).slice(0, 1500)
        }`;
        assert.equal(col("SuccessfulCall(C)"), 100, why);
        assert.equal(col("FailedCall(C)"), 0, why);
        assert.equal(r.code, 0, why);
      });

      // sipsak resolves the host of its target URI: its subscriber lives in the domain 127.0.0.1.
      const sipsak = (password: string, contact: string) =>
        run("sipsak", [
          "-U",
          "-s",
          `sip:alice@127.0.0.1:${server!.udpPort}`,
          "-C",
          contact,
          "-x",
          "300",
          "-a",
          password,
          "-u",
          "alice",
        ], { timeoutMs: 30_000 });
      const sipsakContacts = async () =>
        (await db.sql`SELECT contact FROM locations WHERE aor = 'sip:alice@127.0.0.1'`).map((r) =>
          (r.contact as string).replace(/^<(.*)>$/, "$1")
        );

      await t.step(
        "sipsak -U -a PASSWORD -u alice registers (exit 0, binding stored)",
        async () => {
          const add = await citysip(
            ["user", "add", "alice@127.0.0.1", "--db", db.url],
            "s1psak-pw",
          );
          assert.equal(add.code, 0, add.stderr);
          const r = await sipsak("s1psak-pw", "sip:alice@192.0.2.77:5070");
          assert.equal(r.code, 0, `sipsak exit ${r.code}\n${r.stdout}\n${r.stderr}`);
          assert.deepEqual(await sipsakContacts(), ["sip:alice@192.0.2.77:5070"]);
        },
      );

      await t.step("sipsak with a wrong password: 401 again, not registered", async () => {
        const r = await sipsak("not-the-password", "sip:alice@192.0.2.78:5070");
        assert.notEqual(r.code, 0, r.stdout);
        assert.match(r.stdout + r.stderr, /authorization failed/, r.stdout + r.stderr);
        assert.deepEqual(await sipsakContacts(), ["sip:alice@192.0.2.77:5070"]);
      });

      await t.step("SIGTERM stops the server", async () => {
        assert.equal((await server!.stop("SIGTERM")).code, 0);
      });
    } finally {
      await client.close();
      await server?.killAll();
      await db.drop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
