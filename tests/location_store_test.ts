/**
 * The shared LocationStore suite against the in-memory store, the PostgreSQL server and the embedded
 * engine; the outage behaviour of the PostgreSQL store; migrations.
 */
import assert from "node:assert/strict";
import { createServer, type Server, Socket } from "node:net";
import { PGlite } from "@electric-sql/pglite";
import postgres from "postgres";
import { PgliteMux } from "../storage/_pglite_mux.ts";
import { MemoryLocationStore } from "../storage/memory.ts";
import { migrate } from "../storage/migrate.ts";
import { connect, openStorage } from "../storage/open.ts";
import { PostgresLocationStore } from "../storage/postgres.ts";
import { type Embedded, startEmbedded } from "../storage/embedded.ts";
import {
  change,
  contact,
  locationStoreSuite,
  probeServer,
  serverTest,
  tempSchema,
  TEST_DATABASE_URL,
} from "./location_store_suite.ts";

const unavailable = await probeServer();

Deno.test("MemoryLocationStore passes the LocationStore suite", async (t) => {
  await locationStoreSuite(t, () => {
    const store = new MemoryLocationStore();
    return Promise.resolve({ store, close: () => store.close() });
  });
});

serverTest(
  "PostgresLocationStore (PostgreSQL server) passes the LocationStore suite",
  unavailable,
  async (t) => {
    await locationStoreSuite(t, async () => {
      const schema = await tempSchema(TEST_DATABASE_URL);
      const storage = await openStorage(TEST_DATABASE_URL, { schema: schema.name });
      const peers: { close(): Promise<void> }[] = [];
      return {
        store: storage.locations,
        stats: () => storage.locations.stats(),
        async peer() {
          const other = await openStorage(TEST_DATABASE_URL, { schema: schema.name });
          peers.push(other);
          return other.locations;
        },
        async close() {
          for (const p of peers) await p.close();
          await storage.close();
          await schema.drop();
        },
      };
    });
  },
);

Deno.test({
  name: "PostgresLocationStore (embedded PGlite) passes the LocationStore suite",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    const dataDir = await Deno.makeTempDir({ prefix: "citysip-pglite-" });
    let embedded: Embedded | undefined;
    try {
      embedded = await startEmbedded({ dataDir });
      // PGlite ignores startup parameters such as search_path, so the steps share the public
      // schema and start from an empty table.
      const storage = await openStorage(embedded.url, { max: 1 });
      try {
        await locationStoreSuite(t, async () => {
          await storage.sql`TRUNCATE locations`;
          const store = new PostgresLocationStore(storage.sql);
          const peers: { close(): Promise<void> }[] = [];
          return {
            store,
            stats: () => store.stats(),
            // Another process's connection: the embedded server takes several clients.
            async peer() {
              const other = await openStorage(embedded!.url, { max: 1, migrate: false });
              peers.push(other);
              return other.locations;
            },
            async close() {
              for (const p of peers) await p.close();
              await store.close();
            },
          };
        });
      } finally {
        await storage.close();
      }
    } finally {
      await embedded?.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

/** A TCP proxy in front of PostgreSQL that a test can cut (reset every connection) or pause. */
class Proxy {
  readonly #server: Server;
  readonly #pairs = new Set<[Socket, Socket]>();
  #paused = false;
  port = 0;

  constructor(target: { host: string; port: number }) {
    this.#server = createServer((client) => {
      const upstream = new Socket();
      upstream.connect(target.port, target.host);
      const pair: [Socket, Socket] = [client, upstream];
      this.#pairs.add(pair);
      const forward = (from: Socket, to: Socket) =>
        from.on("data", (d: Uint8Array) => {
          if (!this.#paused) to.write(d);
        });
      forward(client, upstream);
      forward(upstream, client);
      const end = () => {
        client.destroy();
        upstream.destroy();
        this.#pairs.delete(pair);
      };
      client.on("close", end).on("error", end);
      upstream.on("close", end).on("error", end);
    });
  }

  async listen(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.listen(0, "127.0.0.1", resolve));
    this.port = (this.#server.address() as { port: number }).port;
  }

  /** Resets every connection; new ones are still accepted (the database "restarted"). */
  cut(): void {
    for (const [a, b] of this.#pairs) {
      a.destroy();
      b.destroy();
    }
    this.#pairs.clear();
  }

  /** Silently drops every byte both ways (a network that went quiet), or stops doing so. */
  pause(paused: boolean): void {
    this.#paused = paused;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}

serverTest(
  "PostgresLocationStore reports unavailable during an outage and recovers",
  unavailable,
  async (t) => {
    const target = new URL(TEST_DATABASE_URL);
    const proxy = new Proxy({ host: target.hostname, port: Number(target.port || 5432) });
    await proxy.listen();
    const url = new URL(TEST_DATABASE_URL);
    url.port = String(proxy.port);
    const schema = await tempSchema(TEST_DATABASE_URL);
    const storage = await openStorage(url.href, {
      schema: schema.name,
      connectTimeoutSeconds: 1,
      locations: { commitTimeoutMs: 500, retryAfter: 3 },
    });
    const store = storage.locations;
    let cseq = 0;
    const reg = () =>
      store.register(
        change("sip:outage@example.com", { cseq: ++cseq, contacts: [contact("sip:o@h")] }),
      );
    /** Registers until ok; resolves to how long it took. */
    const recover = async (limitMs: number) => {
      const start = performance.now();
      while (!(await reg()).ok) {
        assert.ok(performance.now() - start < limitMs, `not ok ${limitMs} ms after recovery`);
        await new Promise((r) => setTimeout(r, 50));
      }
      return performance.now() - start;
    };
    try {
      assert.equal((await reg()).ok, true);

      await t.step(
        "connection reset during a commit: unavailable at once, then works again",
        async () => {
          const timeoutsBefore = store.stats().timeouts;
          proxy.pause(true);
          const started = performance.now();
          const inflight = reg();
          await new Promise((r) => setTimeout(r, 150)); // the batch is sent and waits for its answer
          proxy.cut();
          proxy.pause(false);
          assert.deepEqual(await inflight, { ok: false, reason: "unavailable", retryAfter: 3 });
          assert.ok(performance.now() - started < 450, "failed by the reset, not by the timeout");
          assert.equal(store.stats().timeouts, timeoutsBefore);
          const took = await recover(1000);
          assert.ok(took < 1000, `recovered after ${took} ms`);
        },
      );

      await t.step(
        "backend terminated inside a batch transaction: unavailable, no crash",
        async () => {
          // Hold the AOR's batch lock elsewhere, so that the batch waits inside its transaction.
          const admin = postgres(TEST_DATABASE_URL, { max: 1, onnotice: () => {} });
          try {
            const held = admin.begin(async (tx) => {
              await tx`SELECT pg_advisory_xact_lock(hashtextextended(${"sip:outage@example.com"}, 0))`;
              const waiting = reg();
              let pid: number | undefined;
              for (let i = 0; i < 100 && pid === undefined; i++) {
                await new Promise((r) => setTimeout(r, 20));
                const rows = await tx`SELECT pid FROM pg_stat_activity
                WHERE wait_event_type = 'Lock' AND query LIKE '%pg_advisory_xact_lock(k)%'
                  AND pid <> pg_backend_pid()`;
                pid = rows[0]?.pid as number | undefined;
              }
              assert.ok(pid !== undefined, "the batch never waited for the lock");
              await tx`SELECT pg_terminate_backend(${pid})`;
              return [await waiting];
            });
            assert.deepEqual(await held, [{ ok: false, reason: "unavailable", retryAfter: 3 }]);
          } finally {
            await admin.end();
          }
          await new Promise((r) => setTimeout(r, 300)); // a write on the dead socket would throw here
          const took = await recover(1000);
          assert.ok(took < 1000, `recovered after ${took} ms`);
        },
      );

      await t.step(
        "network silent: register() resolves unavailable within the commit timeout",
        async () => {
          proxy.pause(true);
          const started = performance.now();
          const outcomes = await Promise.all([reg(), reg(), reg()]);
          const elapsed = performance.now() - started;
          assert.deepEqual(
            outcomes.map((o) => o.ok ? "ok" : o.reason),
            Array(3).fill("unavailable"),
          );
          assert.ok(elapsed < 1500, `took ${elapsed} ms`);
          assert.ok(store.stats().timeouts >= 1);
          // Still silent: new connections hang too, and are reported unavailable in time.
          const again = await reg();
          assert.equal(again.ok, false);
          proxy.pause(false);
          const took = await recover(1000);
          assert.ok(took < 1000, `recovered after ${took} ms`);
          // The binding the failed requests might have written is consistent: lookups work.
          assert.equal((await store.lookup("sip:outage@example.com", Date.now())).length, 1);
        },
      );

      await t.step(
        "database refusing connections: unavailable at once, never a rejection",
        async () => {
          await proxy.close();
          const started = performance.now();
          const o = await reg();
          assert.deepEqual(o, { ok: false, reason: "unavailable", retryAfter: 3 });
          assert.ok(performance.now() - started < 1500);
        },
      );
    } finally {
      await storage.close();
      await schema.drop();
    }
  },
);

serverTest(
  "migrate() is idempotent and safe when processes start at once",
  unavailable,
  async (t) => {
    const schema = await tempSchema(TEST_DATABASE_URL);
    const conns = Array.from(
      { length: 4 },
      () => connect(TEST_DATABASE_URL, { schema: schema.name, max: 2 }),
    );
    try {
      await t.step("concurrent first runs apply each version exactly once", async () => {
        const results = await Promise.all(conns.map((c) => migrate(c.sql)));
        const all = results.flat().sort();
        assert.deepEqual(all, ["001", "002"]);
        const rows = await conns[0]!.sql`SELECT version FROM schema_migrations ORDER BY version`;
        assert.deepEqual(rows.map((r) => r.version), ["001", "002"]);
      });
      await t.step("a second run applies nothing", async () => {
        assert.deepEqual(await migrate(conns[1]!.sql), []);
      });
      await t.step("tables land in the schema of search_path", async () => {
        const rows = await conns[0]!.sql`
        SELECT table_name FROM information_schema.tables WHERE table_schema = ${schema.name}
        ORDER BY table_name`;
        assert.deepEqual(rows.map((r) => r.table_name), [
          "locations",
          "schema_migrations",
          "subscribers",
        ]);
      });
      await t.step("a failing migration rolls back and is not recorded", async () => {
        const bad = [{
          version: "999",
          name: "bad",
          sql: "CREATE TABLE half (x int); SELECT 1/0;",
        }];
        await assert.rejects(migrate(conns[0]!.sql, bad));
        const [row] = await conns[0]!.sql`SELECT to_regclass('half') AS t`;
        assert.equal(row!.t, null);
        assert.deepEqual(
          (await conns[0]!.sql`SELECT version FROM schema_migrations WHERE version = '999'`).length,
          0,
        );
      });
    } finally {
      await Promise.all(conns.map((c) => c.sql.end()));
      await schema.drop();
    }
  },
);

Deno.test({
  name: "the embedded server multiplexes clients by whole protocol units and transactions",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    const db = await PGlite.create();
    const mux = new PgliteMux(db);
    const port = await mux.listen(0, "127.0.0.1");
    const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
    const clients = Array.from({ length: 4 }, () => connect(url, { max: 2 }));
    const sql = (i: number) => clients[i % clients.length]!.sql;
    try {
      await sql(0)`CREATE TABLE t (id int PRIMARY KEY)`;
      await t.step("concurrent transactions and pipelined queries of 8 connections", async () => {
        const results = await Promise.allSettled(
          Array.from({ length: 200 }, (_, i) =>
            sql(i).begin(async (tx) => {
              await tx`INSERT INTO t VALUES (${i})`;
              const [row] = await tx`SELECT count(*)::int AS n FROM t WHERE id = ${i}`;
              assert.equal(row!.n, 1);
              const [a, b] = await Promise.all([
                tx`SELECT ${i}::int AS x`,
                tx`SELECT ${-i - 1}::int AS x`,
              ]);
              assert.deepEqual([a[0]!.x, b[0]!.x], [i, -i - 1]);
            })),
        );
        assert.deepEqual(results.filter((r) => r.status === "rejected"), []);
        const [row] = await sql(1)`SELECT count(*)::int AS n FROM t`;
        assert.equal(row!.n, 200);
      });
      await t.step(
        "a client holding a transaction blocks others until it ends or dies",
        async () => {
          const holder = connect(url, { max: 1 });
          const conn = await holder.sql.reserve();
          await conn`BEGIN`;
          await conn`INSERT INTO t VALUES (1000)`;
          let done = false;
          const other = sql(2)`INSERT INTO t VALUES (1001)`.then(() => done = true);
          await new Promise((r) => setTimeout(r, 100));
          assert.equal(done, false);
          holder.dropConnections(); // dies inside its transaction: rolled back
          await other;
          const rows = await sql(3)`SELECT id FROM t WHERE id >= 1000 ORDER BY id`;
          assert.deepEqual(rows.map((r) => r.id), [1001]);
          await holder.sql.end({ timeout: 0 });
        },
      );
      await t.step(
        "an error inside an extended-protocol unit leaves the engine usable",
        async () => {
          await assert.rejects(sql(0)`SELECT 1 / ${0}::int`);
          const [row] = await sql(1)`SELECT 2 AS x`;
          assert.equal(row!.x, 2);
        },
      );
    } finally {
      await Promise.all(clients.map((c) => c.sql.end({ timeout: 1 })));
      await mux.close();
      await db.close();
    }
  },
});

serverTest(
  "guardPostgresConnectionLoss() keeps a process alive when a backend dies inside sql.begin()",
  unavailable,
  async () => {
    // In a child process: the guard installs global listeners. Without it this child dies
    // (porsager/postgres#1208).
    const open = new URL("../storage/open.ts", import.meta.url).href;
    const code = `
      import postgres from "postgres";
      import { guardPostgresConnectionLoss } from ${JSON.stringify(open)};
      if (Deno.args[0] === "guard") guardPostgresConnectionLoss();
      const url = ${JSON.stringify(TEST_DATABASE_URL)};
      const sql = postgres(url, { max: 2, onnotice: () => {} });
      const killer = postgres(url, { max: 1 });
      let pid = null;
      const tx = sql.begin(async (t) => {
        pid = (await t\`SELECT pg_backend_pid() AS pid\`)[0].pid;
        await t\`SELECT pg_sleep(2)\`;
      });
      while (pid === null) await new Promise((r) => setTimeout(r, 20));
      await killer\`SELECT pg_terminate_backend(\${pid})\`;
      console.log("tx", await tx.then(() => "ok", (e) => e.code));
      await new Promise((r) => setTimeout(r, 300));
      console.log("after", (await sql\`SELECT 1 AS x\`)[0].x);
      // end() without a timeout would wait for ever for the ROLLBACK begin() wrote to the dead socket.
      await sql.end({ timeout: 0 });
      await killer.end();
    `;
    const run = async (arg: string) => {
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["eval", "--ext=ts", code, arg],
        cwd: new URL("..", import.meta.url),
        stdout: "piped",
        stderr: "piped",
      }).output();
      return { code: out.code, stdout: new TextDecoder().decode(out.stdout) };
    };
    const guarded = await run("guard");
    assert.equal(guarded.code, 0, guarded.stdout);
    assert.match(guarded.stdout, /tx CONNECTION_CLOSED\nafter 1/);
    const unguarded = await run("none");
    assert.notEqual(unguarded.code, 0, "postgres.js fixed the bug: the guard may go");
  },
);
