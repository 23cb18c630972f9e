/**
 * One {@link LocationStore} suite, run against every store (memory, PostgreSQL server, embedded), plus
 * the helpers the database-backed tests share: a server probe that skips (or fails under CI=true) and a
 * throw-away schema per test.
 *
 * @module
 */
import assert from "node:assert/strict";
import postgres from "postgres";
import type {
  Binding,
  ContactChange,
  LocationStore,
  RegisterChange,
  RegisterOutcome,
} from "../storage/location_store.ts";
import { compareBindings, MemoryLocationStore } from "../storage/memory.ts";

/** A store under test, fresh for each step. */
export interface StoreHarness {
  readonly store: LocationStore;
  /** Group-commit counters, when the store batches. */
  readonly stats?: () => { readonly batches: number; readonly ops: number };
  /** Another store on the same data, as a second server process would have (database stores). */
  readonly peer?: () => Promise<LocationStore>;
  close(): Promise<void>;
}

const T0 = 1_800_000_000_000;

/** A contact change with defaults. */
export function contact(
  key: string,
  expires = 3600,
  extra: Partial<ContactChange> = {},
): ContactChange {
  return { key, contact: `<${key}>`, expires, q: null, instanceId: null, regId: null, ...extra };
}

/** A REGISTER change with defaults: one Call-ID, CSeq 1, time T0, room for 10 bindings. */
export function change(aor: string, extra: Partial<RegisterChange> = {}): RegisterChange {
  return {
    aor,
    callId: "call-1",
    cseq: 1,
    contacts: [],
    removeAll: false,
    now: T0,
    source: { transport: "tcp", address: "192.0.2.10", port: 50600, worker: 1, flowId: 42 },
    path: [],
    userAgent: "suite/1",
    maxBindings: 10,
    ...extra,
  };
}

function okBindings(outcome: RegisterOutcome): readonly Binding[] {
  assert.equal(outcome.ok, true, `expected ok, got ${JSON.stringify(outcome)}`);
  return outcome.ok ? outcome.bindings : [];
}

/** Bindings in a total order (stores may order ties of q and time differently). */
function normal(bindings: readonly Binding[]): Binding[] {
  return [...bindings].sort((a, b) => compareBindings(a, b) || (a.key < b.key ? -1 : 1));
}

function normalOutcome(o: RegisterOutcome): unknown {
  return o.ok ? { ok: true, bindings: normal(o.bindings) } : o;
}

/** A small deterministic PRNG (mulberry32), so failures replay. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Random REGISTERs over few AORs, keys, Call-IDs and CSeqs, so that every rule gets exercised. */
function randomChanges(seed: number, n: number, prefix: string): RegisterChange[] {
  const r = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const out: RegisterChange[] = [];
  let now = T0;
  for (let i = 0; i < n; i++) {
    now += Math.floor(r() * 20_000);
    const count = r() < 0.15 ? 0 : 1 + Math.floor(r() * 3);
    const contacts = Array.from(
      { length: count },
      () =>
        contact(`sip:${pick(["a", "b", "c", "d"])}@192.0.2.1`, pick([0, 30, 60, 3600]), {
          q: pick([null, 0.5, 1]),
        }),
    );
    out.push(change(`sip:${prefix}${pick(["x", "y", "z"])}@example.com`, {
      callId: pick(["c1", "c2"]),
      cseq: 1 + Math.floor(r() * 8),
      contacts,
      removeAll: count === 0 && r() < 0.3,
      now,
      maxBindings: 3,
      source: {
        transport: pick(["udp", "tcp"] as const),
        address: "198.51.100.7",
        port: 5060 + i,
        worker: i % 3,
        flowId: i,
      },
      path: r() < 0.3 ? ["<sip:edge1.example.com;lr>", "<sip:edge2.example.com;lr>"] : [],
      userAgent: r() < 0.5 ? null : `ua/${i}`,
    }));
  }
  return out;
}

/**
 * Runs the shared suite as steps of `t`. `open` gives a fresh, empty store for each step.
 */
export async function locationStoreSuite(
  t: Deno.TestContext,
  open: () => Promise<StoreHarness>,
): Promise<void> {
  const step = (name: string, fn: (h: StoreHarness) => Promise<void>) =>
    t.step(name, async () => {
      const h = await open();
      try {
        await fn(h);
      } finally {
        await h.close();
      }
    });

  await step(
    "register() adds bindings and returns them all (RFC 3261 §10.3 steps 7-8)",
    async ({ store }) => {
      const aor = "sip:alice@example.com";
      const b1 = okBindings(
        await store.register(change(aor, { contacts: [contact("sip:alice@192.0.2.1")] })),
      );
      assert.equal(b1.length, 1);
      const got = b1[0]!;
      assert.deepEqual(got, {
        aor,
        key: "sip:alice@192.0.2.1",
        contact: "<sip:alice@192.0.2.1>",
        expiresAt: T0 + 3600_000,
        q: null,
        callId: "call-1",
        cseq: 1,
        instanceId: null,
        regId: null,
        source: { transport: "tcp", address: "192.0.2.10", port: 50600, worker: 1, flowId: 42 },
        path: [],
        userAgent: "suite/1",
        updatedAt: T0,
      });
      const b2 = okBindings(
        await store.register(change(aor, {
          cseq: 2,
          contacts: [contact("sip:alice@192.0.2.2", 60, { q: 0.5 })],
          path: ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"],
          userAgent: null,
          source: { transport: "udp", address: "2001:db8::1", port: 5062, worker: 0, flowId: 0 },
        })),
      );
      assert.deepEqual(b2.map((b) => b.key), ["sip:alice@192.0.2.1", "sip:alice@192.0.2.2"]);
      assert.deepEqual(b2[1]!.path, ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]);
      assert.deepEqual(b2[1]!.source, {
        transport: "udp",
        address: "2001:db8::1",
        port: 5062,
        worker: 0,
        flowId: 0,
      });
      assert.equal(b2[1]!.userAgent, null);
      assert.equal(b2[1]!.q, 0.5);
      assert.deepEqual(normal(await store.lookup(aor, T0)), normal(b2));
      assert.deepEqual(await store.lookup("sip:nobody@example.com", T0), []);
    },
  );

  await step(
    "register() refreshes a binding: same Call-ID, higher CSeq (RFC 3261 §10.3 step 7)",
    async ({ store }) => {
      const aor = "sip:bob@example.com";
      okBindings(await store.register(change(aor, { contacts: [contact("sip:bob@h")] })));
      const b = okBindings(
        await store.register(
          change(aor, { cseq: 2, now: T0 + 1000, contacts: [contact("sip:bob@h", 120)] }),
        ),
      );
      assert.equal(b.length, 1);
      assert.equal(b[0]!.cseq, 2);
      assert.equal(b[0]!.expiresAt, T0 + 1000 + 120_000);
      assert.equal(b[0]!.updatedAt, T0 + 1000);
    },
  );

  await step(
    "register() with expires 0 removes that binding only (RFC 3261 §10.3 step 7)",
    async ({ store }) => {
      const aor = "sip:carol@example.com";
      okBindings(
        await store.register(change(aor, { contacts: [contact("sip:c@1"), contact("sip:c@2")] })),
      );
      const b = okBindings(
        await store.register(change(aor, { cseq: 2, contacts: [contact("sip:c@1", 0)] })),
      );
      assert.deepEqual(b.map((x) => x.key), ["sip:c@2"]);
      assert.deepEqual((await store.lookup(aor, T0)).map((x) => x.key), ["sip:c@2"]);
    },
  );

  await step(
    "register() with Contact: * removes every binding (RFC 3261 §10.3 step 6)",
    async ({ store }) => {
      const aor = "sip:dave@example.com";
      okBindings(
        await store.register(change(aor, { contacts: [contact("sip:d@1"), contact("sip:d@2")] })),
      );
      okBindings(
        await store.register(
          change(aor, { callId: "other", cseq: 1, contacts: [contact("sip:d@3")] }),
        ),
      );
      // Same Call-ID as d@1 and d@2 but not a higher CSeq: refused, nothing removed.
      assert.deepEqual(await store.register(change(aor, { cseq: 1, removeAll: true })), {
        ok: false,
        reason: "out-of-order",
      });
      assert.equal((await store.lookup(aor, T0)).length, 3);
      assert.deepEqual(
        okBindings(await store.register(change(aor, { cseq: 5, removeAll: true }))),
        [],
      );
      assert.deepEqual(await store.lookup(aor, T0), []);
    },
  );

  await step(
    "a REGISTER without contacts is a query and changes nothing (RFC 3261 §10.3 step 8)",
    async ({ store }) => {
      const aor = "sip:erin@example.com";
      const b1 = okBindings(await store.register(change(aor, { contacts: [contact("sip:e@1")] })));
      const b2 = okBindings(await store.register(change(aor, { callId: "q", cseq: 1 })));
      assert.deepEqual(normal(b2), normal(b1));
      assert.deepEqual(okBindings(await store.register(change("sip:empty@example.com"))), []);
    },
  );

  await step(
    "same Call-ID with a CSeq not higher fails the whole request (RFC 3261 §10.3 step 7)",
    async ({ store }) => {
      const aor = "sip:frank@example.com";
      okBindings(await store.register(change(aor, { cseq: 5, contacts: [contact("sip:f@1")] })));
      for (const cseq of [5, 4]) {
        assert.deepEqual(
          await store.register(change(aor, { cseq, contacts: [contact("sip:f@1", 999)] })),
          { ok: false, reason: "out-of-order" },
        );
      }
      // The first contact is new, the second out of order: the new one must not be added either.
      assert.deepEqual(
        await store.register(
          change(aor, { cseq: 3, contacts: [contact("sip:f@2"), contact("sip:f@1")] }),
        ),
        { ok: false, reason: "out-of-order" },
      );
      const b = await store.lookup(aor, T0);
      assert.deepEqual(b.map((x) => [x.key, x.cseq, x.expiresAt]), [["sip:f@1", 5, T0 + 3600_000]]);
      // Another Call-ID is another client: its lower CSeq replaces the binding (§10.3 step 7).
      const after = okBindings(
        await store.register(
          change(aor, { callId: "call-2", cseq: 1, contacts: [contact("sip:f@1", 60)] }),
        ),
      );
      assert.deepEqual(after.map((x) => [x.callId, x.cseq]), [["call-2", 1]]);
    },
  );

  await step("maxBindings refuses growth beyond the limit, changing nothing", async ({ store }) => {
    const aor = "sip:grace@example.com";
    const three = [contact("sip:g@1"), contact("sip:g@2"), contact("sip:g@3")];
    okBindings(await store.register(change(aor, { contacts: three, maxBindings: 3 })));
    assert.deepEqual(
      await store.register(
        change(aor, { cseq: 2, contacts: [contact("sip:g@4")], maxBindings: 3 }),
      ),
      { ok: false, reason: "too-many-bindings" },
    );
    assert.equal((await store.lookup(aor, T0)).length, 3);
    // Refreshing at the limit is fine, and so is replacing one binding by another.
    okBindings(await store.register(change(aor, { cseq: 3, contacts: three, maxBindings: 3 })));
    const b = okBindings(
      await store.register(change(aor, {
        cseq: 4,
        contacts: [contact("sip:g@1", 0), contact("sip:g@4")],
        maxBindings: 3,
      })),
    );
    assert.deepEqual(b.map((x) => x.key).sort(), ["sip:g@2", "sip:g@3", "sip:g@4"]);
  });

  await step(
    "expired bindings are never returned and sweep() removes them (RFC 3261 §10.3)",
    async ({ store }) => {
      const aor = "sip:heidi@example.com";
      okBindings(
        await store.register(
          change(aor, {
            cseq: 7,
            contacts: [contact("sip:h@short", 30), contact("sip:h@long", 3600)],
          }),
        ),
      );
      okBindings(
        await store.register(
          change("sip:ivan@example.com", { contacts: [contact("sip:i@1", 10)] }),
        ),
      );
      assert.equal(await store.count(T0), 3);
      const later = T0 + 31_000;
      assert.deepEqual((await store.lookup(aor, later)).map((x) => x.key), ["sip:h@long"]);
      assert.deepEqual(await store.lookup("sip:ivan@example.com", later), []);
      assert.equal(await store.count(later), 1);
      // An expired binding no longer counts for §10.3 ordering: same Call-ID, lower CSeq, new binding.
      const b = okBindings(
        await store.register(
          change(aor, { cseq: 1, now: later, contacts: [contact("sip:h@short", 30)] }),
        ),
      );
      assert.deepEqual(b.map((x) => x.key).sort(), ["sip:h@long", "sip:h@short"]);
      // An expiry exactly at `now` counts as expired.
      assert.deepEqual(await store.lookup("sip:ivan@example.com", T0 + 10_000), []);
      assert.equal(await store.sweep(T0 + 3600_000), 3); // h@long expires exactly then
      assert.equal(await store.count(T0), 0);
      assert.equal(await store.sweep(T0 + 3600_000), 0);
    },
  );

  await step("sweep() removes more expired bindings than one delete chunk", async ({ store }) => {
    const n = 12_000;
    const outcomes = await Promise.all(
      Array.from(
        { length: n },
        (_, i) =>
          store.register(
            change(`sip:sweep${i}@example.com`, { contacts: [contact("sip:s@h", 5)] }),
          ),
      ),
    );
    assert.ok(outcomes.every((o) => o.ok));
    assert.equal(await store.sweep(T0 + 4_000), 0);
    assert.equal(await store.sweep(T0 + 5_000), n);
    assert.equal(await store.count(T0), 0);
  });

  await step(
    "RFC 5626 §6: a binding keyed by instance-id and reg-id is replaced by a new contact",
    async ({ store }) => {
      const aor = "sip:judy@example.com";
      const inst = "<urn:uuid:00000000-0000-1000-8000-000a95a0e128>";
      const flow = (regId: number, host: string) =>
        contact(`${inst};reg-id=${regId}`, 3600, {
          contact: `<sip:judy@${host};transport=tcp;ob>;+sip.instance="${inst}";reg-id=${regId}`,
          instanceId: inst,
          regId,
        });
      okBindings(
        await store.register(
          change(aor, { contacts: [flow(1, "192.0.2.1"), flow(2, "192.0.2.2")] }),
        ),
      );
      const b = okBindings(
        await store.register(
          change(aor, { callId: "reboot", cseq: 1, contacts: [flow(1, "192.0.2.9")] }),
        ),
      );
      assert.equal(b.length, 2);
      const one = b.find((x) => x.regId === 1)!;
      assert.equal(
        one.contact,
        `<sip:judy@192.0.2.9;transport=tcp;ob>;+sip.instance="${inst}";reg-id=1`,
      );
      assert.equal(one.instanceId, inst);
      assert.equal(one.callId, "reboot");
    },
  );

  await step(
    "bindings come highest q first, then most recently updated (RFC 3261 §10.2.1.2)",
    async ({ store }) => {
      const aor = "sip:kim@example.com";
      okBindings(
        await store.register(change(aor, { contacts: [contact("sip:k@low", 3600, { q: 0.1 })] })),
      );
      okBindings(
        await store.register(
          change(aor, { cseq: 2, now: T0 + 1, contacts: [contact("sip:k@old", 3600, { q: 0.9 })] }),
        ),
      );
      okBindings(
        await store.register(
          change(aor, { cseq: 3, now: T0 + 2, contacts: [contact("sip:k@new", 3600)] }),
        ),
      );
      const keys = ["sip:k@new", "sip:k@old", "sip:k@low"];
      assert.deepEqual((await store.lookup(aor, T0 + 2)).map((x) => x.key), keys);
    },
  );

  await step(
    "random REGISTERs give the same outcomes as the in-memory reference (RFC 3261 §10.3)",
    async ({ store }) => {
      const ref = new MemoryLocationStore();
      for (const c of randomChanges(7, 150, "seq-")) {
        const want = normalOutcome(await ref.register(c));
        assert.deepEqual(normalOutcome(await store.register(c)), want, JSON.stringify(c));
      }
    },
  );

  await step(
    "concurrent REGISTERs keep arrival order per AOR (refresh never overtakes)",
    async ({ store }) => {
      const ref = new MemoryLocationStore();
      const changes = randomChanges(11, 400, "conc-");
      const want = [];
      for (const c of changes) want.push(normalOutcome(await ref.register(c)));
      const got = (await Promise.all(changes.map((c) => store.register(c)))).map(normalOutcome);
      for (let i = 0; i < changes.length; i++) {
        assert.deepEqual(got[i], want[i], `change ${i}: ${JSON.stringify(changes[i])}`);
      }
      // A chain of refreshes of one binding, all in flight at once: each must see the one before.
      const chain = Array.from(
        { length: 300 },
        (_, i) =>
          change("sip:chain@example.com", {
            cseq: i + 1,
            contacts: [contact("sip:chain@h", 60 + i)],
          }),
      );
      const outcomes = await Promise.all(chain.map((c) => store.register(c)));
      assert.ok(outcomes.every((o) => o.ok), JSON.stringify(outcomes.find((o) => !o.ok)));
      assert.deepEqual((await store.lookup("sip:chain@example.com", T0)).map((b) => b.cseq), [300]);
    },
  );

  await step(
    "many concurrent REGISTERs commit in fewer batches than requests (group commit)",
    async (h) => {
      const before = h.stats?.();
      const n = 2000;
      const outcomes = await Promise.all(
        Array.from({ length: n }, (_, i) =>
          h.store.register(
            change(`sip:many${i}@example.com`, { contacts: [contact(`sip:m${i}@h`)] }),
          )),
      );
      assert.ok(outcomes.every((o) => o.ok));
      assert.equal(await h.store.count(T0), n);
      if (before && h.stats) {
        const after = h.stats();
        const ops = after.ops - before.ops;
        const batches = after.batches - before.batches;
        assert.equal(ops, n);
        assert.ok(batches < ops / 10, `${batches} batches for ${ops} changes`);
      }
    },
  );

  await step(
    "another process sees committed bindings and §10.3 holds across processes",
    async (h) => {
      if (!h.peer) return; // the in-memory store has no second process
      const peer = await h.peer();
      const aor = "sip:peer@example.com";
      okBindings(await h.store.register(change(aor, { cseq: 3, contacts: [contact("sip:p@1")] })));
      assert.deepEqual((await peer.lookup(aor, T0)).map((b) => b.key), ["sip:p@1"]);
      assert.deepEqual(
        await peer.register(change(aor, { cseq: 3, contacts: [contact("sip:p@1")] })),
        {
          ok: false,
          reason: "out-of-order",
        },
      );
      // Both processes refresh the same binding concurrently: the CSeq check sees the other's commit.
      const results = await Promise.all([
        ...Array.from(
          { length: 50 },
          (_, i) =>
            h.store.register(change(aor, { cseq: 10 + 2 * i, contacts: [contact("sip:p@1")] })),
        ),
        ...Array.from(
          { length: 50 },
          (_, i) =>
            peer.register(change(aor, { cseq: 11 + 2 * i, contacts: [contact("sip:p@1")] })),
        ),
      ]);
      assert.ok(results.some((o) => o.ok));
      const final = await h.store.lookup(aor, T0);
      const okCseqs = results.flatMap((
        o,
        i,
      ) => (o.ok ? [i < 50 ? 10 + 2 * i : 11 + 2 * (i - 50)] : []));
      // The binding holds the highest CSeq that succeeded; no success came after a higher one.
      assert.equal(final[0]!.cseq, Math.max(...okCseqs));
      await peer.close();
    },
  );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL helpers shared by the database-backed tests.

/** The PostgreSQL server the tests use: `CITYSIP_TEST_DATABASE_URL`, default the local `test` database. */
export const TEST_DATABASE_URL = Deno.env.get("CITYSIP_TEST_DATABASE_URL") ??
  "postgres://postgres@127.0.0.1:5432/test";

/** Resolves to null when the test server answers, else to why not. */
export async function probeServer(url = TEST_DATABASE_URL): Promise<string | null> {
  const sql = postgres(url, { max: 1, connect_timeout: 2, onnotice: () => {} });
  try {
    await sql`SELECT 1`;
    return null;
  } catch (err) {
    return `no PostgreSQL server at ${url.replace(/\/\/[^@]*@/, "//")}: ${(err as Error).message}`;
  } finally {
    await sql.end({ timeout: 0 });
  }
}

/**
 * Registers `fn` as a test that needs the PostgreSQL server. Without a server it is skipped with a
 * printed reason, except under `CI=true`, where it fails.
 */
export function serverTest(
  name: string,
  unavailable: string | null,
  fn: (t: Deno.TestContext) => Promise<void>,
): void {
  if (unavailable !== null && Deno.env.get("CI") === "true") {
    Deno.test(name, () => {
      throw new Error(`Cannot run without PostgreSQL (CI=true): ${unavailable}`);
    });
    return;
  }
  if (unavailable !== null) console.log(`skipped "${name}": ${unavailable}`);
  Deno.test({
    name,
    ignore: unavailable !== null,
    sanitizeOps: false,
    sanitizeResources: false,
    fn,
  });
}

/** A fresh schema with a random name, and a way to drop it. */
export async function tempSchema(url: string): Promise<{ name: string; drop(): Promise<void> }> {
  const name = `citysip_test_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  const admin = postgres(url, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`CREATE SCHEMA ${name}`);
  } finally {
    await admin.end();
  }
  return {
    name,
    async drop() {
      const sql = postgres(url, { max: 1, onnotice: () => {} });
      try {
        await sql.unsafe(`DROP SCHEMA IF EXISTS ${name} CASCADE`);
      } finally {
        await sql.end();
      }
    },
  };
}
