/** PostgresSubscriberStore against the PostgreSQL server (RFC 3261 §22, RFC 8760 credentials). */
import assert from "node:assert/strict";
import { openStorage } from "../storage/open.ts";
import type { Subscriber } from "../storage/subscriber_store.ts";
import { probeServer, serverTest, tempSchema, TEST_DATABASE_URL } from "./location_store_suite.ts";

const unavailable = await probeServer();

function subscriber(username: string, domain: string, tag = ""): Subscriber {
  return {
    username,
    domain,
    ha1Md5: `md5-${username}-${domain}${tag}`,
    ha1Sha256: `sha256-${username}-${domain}${tag}`,
  };
}

serverTest(
  "PostgresSubscriberStore stores HA1 credentials per (domain, username)",
  unavailable,
  async (t) => {
    const schema = await tempSchema(TEST_DATABASE_URL);
    const storage = await openStorage(TEST_DATABASE_URL, { schema: schema.name });
    const store = storage.subscribers;
    try {
      await t.step("get() of an unknown subscriber is null", async () => {
        assert.equal(await store.get("alice", "example.com"), null);
      });
      await t.step(
        "put() adds, get() returns both HA1 values (RFC 3261 §22.4, RFC 8760 §2)",
        async () => {
          await store.put(subscriber("alice", "example.com"));
          assert.deepEqual(
            await store.get("alice", "example.com"),
            subscriber("alice", "example.com"),
          );
          assert.equal(
            await store.get("alice", "example.org"),
            null,
            "the realm is part of the key",
          );
        },
      );
      await t.step("put() replaces the credentials of an existing subscriber", async () => {
        await store.put(subscriber("alice", "example.com", "-v2"));
        assert.deepEqual(
          await store.get("alice", "example.com"),
          subscriber("alice", "example.com", "-v2"),
        );
      });
      await t.step("list() orders by domain then username", async () => {
        await store.put(subscriber("bob", "example.com"));
        await store.put(subscriber("aaron", "example.org"));
        const all = await store.list();
        assert.deepEqual(all.map((s) => `${s.domain}/${s.username}`), [
          "example.com/alice",
          "example.com/bob",
          "example.org/aaron",
        ]);
      });
      await t.step("remove() says whether a subscriber was removed", async () => {
        assert.equal(await store.remove("bob", "example.com"), true);
        assert.equal(await store.remove("bob", "example.com"), false);
        assert.equal(await store.get("bob", "example.com"), null);
      });
    } finally {
      await storage.close();
      await schema.drop();
    }
  },
);
