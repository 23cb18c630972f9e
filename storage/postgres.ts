/**
 * The PostgreSQL stores, on postgres.js.
 *
 * {@link PostgresLocationStore} commits REGISTERs in groups: `register()` queues the change; one flusher
 * takes up to `maxBatchSize` queued changes (after at most `batchWindowMs`) and applies them in one
 * transaction, in arrival order, then resolves every caller of the batch once it has committed. Batches
 * run one after another, so a refresh never overtakes the registration it refreshes.
 *
 * A batch transaction, on a reserved connection, in two round trips whatever its size:
 * 1. BEGIN, per-AOR advisory locks (taken in hash order, so that batches of several processes never
 *    deadlock) and a read of the batch's AORs' bindings, pipelined: the read's snapshot is taken after
 *    the locks, so it sees what other processes committed;
 * 2. the changes computed in order by {@link applyRegister}, the same function as the in-memory store,
 *    so the semantics are the same by construction; then the DELETE of bindings that went, the upsert
 *    of those that changed, and COMMIT, pipelined.
 *
 * Why not `sql.begin()`: when the backend dies inside a transaction, postgres.js 3.4.9's begin()
 * writes its own ROLLBACK to the closed socket, an uncaught TypeError that ends the process
 * (porsager/postgres#1208, #1154). Measured against begin() (four round trips), the two round trips
 * gain nothing noticeable on loopback: the cost is the server's work and the fsync.
 *
 * @module
 */
import postgres from "postgres";
import type { Binding, LocationStore, RegisterChange, RegisterOutcome } from "./location_store.ts";
import { applyRegister } from "./memory.ts";
import type { Subscriber, SubscriberStore } from "./subscriber_store.ts";

/** Options of {@link PostgresLocationStore}. */
export interface PostgresLocationStoreOptions {
  /**
   * How long the first change queued on an idle store waits for others to join its batch, in ms.
   * @default {2}
   */
  readonly batchWindowMs?: number;
  /**
   * The most changes one batch (one transaction) holds.
   * @default {1000}
   */
  readonly maxBatchSize?: number;
  /**
   * A batch that has not committed after this many ms is reported `unavailable` to its callers, and
   * `onCommitTimeout` is called so the hung connection can be dropped. Also bounds `lookup`, `sweep`
   * and `count`.
   * @default {2000}
   */
  readonly commitTimeoutMs?: number;
  /**
   * The `retryAfter` (seconds) of an `unavailable` outcome.
   * @default {1}
   */
  readonly retryAfter?: number;
  /** Called after a commit timed out, e.g. to destroy the sockets of the connection that hung. */
  readonly onCommitTimeout?: () => void;
  /** Called with the error of each batch that did not commit (for the caller's log). */
  readonly onBatchError?: (err: unknown) => void;
}

/** Counters of {@link PostgresLocationStore}, for metrics and tests. */
export interface GroupCommitStats {
  /** Batches attempted (committed or failed). */
  readonly batches: number;
  /** Changes attempted. */
  readonly ops: number;
  /** Batches that did not commit (database error, unreachable, timed out). */
  readonly failedBatches: number;
  /** Of those, batches that hit `commitTimeoutMs`. */
  readonly timeouts: number;
  /** Changes in the latest batch. */
  readonly lastBatchSize: number;
  /** Changes in the largest batch so far. */
  readonly largestBatchSize: number;
  /** Changes waiting for a batch now. */
  readonly queued: number;
  /** Commit time of successful batches, from the start of the transaction. */
  readonly commitSeconds: Histogram;
}

/** A cumulative histogram in Prometheus' shape. */
export interface Histogram {
  /** Upper bounds, ascending; the last bucket is +Inf and is not listed. */
  readonly bounds: readonly number[];
  /** `counts[i]` observations ≤ `bounds[i]`; `counts[bounds.length]` is the total count. */
  readonly counts: readonly number[];
  /** Sum of the observations. */
  readonly sum: number;
  /** Number of observations. */
  readonly count: number;
}

const COMMIT_BOUNDS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5];

interface Pending {
  readonly change: RegisterChange;
  readonly resolve: (outcome: RegisterOutcome) => void;
}

interface LocationRow {
  aor: string;
  key: string;
  contact: string;
  expires_ms: number;
  q: number | null;
  call_id: string;
  cseq: number;
  instance_id: string | null;
  reg_id: number | null;
  transport: string;
  source_address: string;
  source_port: number;
  worker: number;
  flow_id: number;
  path: string[];
  user_agent: string | null;
  updated_ms: number;
}

const SELECT_COLUMNS = `aor, key, contact,
  (extract(epoch FROM expires_at) * 1000)::float8 AS expires_ms, q, call_id, cseq::float8 AS cseq,
  instance_id, reg_id, transport, source_address, source_port, worker, flow_id::float8 AS flow_id,
  path, user_agent, (extract(epoch FROM updated_at) * 1000)::float8 AS updated_ms`;

const ORDER = "coalesce(q, 1) DESC, updated_at DESC";

function toBinding(r: LocationRow): Binding {
  return {
    aor: r.aor,
    key: r.key,
    contact: r.contact,
    expiresAt: r.expires_ms,
    q: r.q,
    callId: r.call_id,
    cseq: r.cseq,
    instanceId: r.instance_id,
    regId: r.reg_id,
    source: {
      transport: r.transport === "tcp" ? "tcp" : "udp",
      address: r.source_address,
      port: r.source_port,
      worker: r.worker,
      flowId: r.flow_id,
    },
    path: r.path,
    userAgent: r.user_agent,
    updatedAt: r.updated_ms,
  };
}

function toRow(b: Binding): Record<string, unknown> {
  return {
    aor: b.aor,
    key: b.key,
    contact: b.contact,
    expires_ms: b.expiresAt,
    q: b.q,
    call_id: b.callId,
    cseq: b.cseq,
    instance_id: b.instanceId,
    reg_id: b.regId,
    transport: b.source.transport,
    source_address: b.source.address,
    source_port: b.source.port,
    worker: b.source.worker,
    flow_id: b.source.flowId,
    path: b.path,
    user_agent: b.userAgent,
    updated_ms: b.updatedAt,
  };
}

/** How long one `reserve()` may take before it is asked again (see `#reserve`). */
const RESERVE_RETRY_MS = 250;

class TimeoutError extends Error {
  constructor(ms: number) {
    super(`Timed out after ${ms} ms`);
    this.name = "TimeoutError";
  }
}

/** Resolves like `p`, or rejects with a TimeoutError after `ms`. */
function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(ms)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/** The location service on PostgreSQL, with group commit. */
export class PostgresLocationStore implements LocationStore {
  readonly #sql: postgres.Sql;
  readonly #windowMs: number;
  readonly #maxBatch: number;
  readonly #timeoutMs: number;
  readonly #retryAfter: number;
  readonly #onCommitTimeout: (() => void) | undefined;
  readonly #onBatchError: ((err: unknown) => void) | undefined;
  #queue: Pending[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  #flushing: Promise<void> | undefined;
  #closed = false;
  #batches = 0;
  #ops = 0;
  #failed = 0;
  #timeouts = 0;
  #lastBatch = 0;
  #largestBatch = 0;
  readonly #commitCounts = new Array<number>(COMMIT_BOUNDS.length + 1).fill(0);
  #commitSum = 0;

  /**
   * A store on `sql`; the caller keeps ownership of `sql` (ends it after {@link close}).
   *
   * @param sql a postgres.js instance whose `search_path` leads to the migrated tables
   * @param options batching and outage behaviour
   */
  constructor(sql: postgres.Sql, options: PostgresLocationStoreOptions = {}) {
    this.#sql = sql;
    this.#windowMs = options.batchWindowMs ?? 2;
    this.#maxBatch = options.maxBatchSize ?? 1000;
    this.#timeoutMs = options.commitTimeoutMs ?? 2000;
    this.#retryAfter = options.retryAfter ?? 1;
    this.#onCommitTimeout = options.onCommitTimeout;
    this.#onBatchError = options.onBatchError;
    if (!(this.#maxBatch >= 1)) throw new RangeError(`Invalid maxBatchSize ${this.#maxBatch}`);
    if (!(this.#windowMs >= 0)) throw new RangeError(`Invalid batchWindowMs ${this.#windowMs}`);
    if (!(this.#timeoutMs > 0)) throw new RangeError(`Invalid commitTimeoutMs ${this.#timeoutMs}`);
  }

  /** Queues the change; resolves once its batch committed, or `unavailable`. Never rejects. */
  register(change: RegisterChange): Promise<RegisterOutcome> {
    if (this.#closed) return Promise.resolve(this.#unavailable());
    return new Promise((resolve) => {
      this.#queue.push({ change, resolve });
      this.#schedule();
    });
  }

  /** All unexpired bindings of an AOR at `now`, highest q first, then most recently updated. */
  async lookup(aor: string, now: number): Promise<readonly Binding[]> {
    const rows = await withTimeout(
      this.#sql.unsafe<LocationRow[]>(
        `SELECT ${SELECT_COLUMNS} FROM locations
         WHERE aor = $1 AND expires_at > to_timestamp($2::float8 / 1000) ORDER BY ${ORDER}`,
        [aor, now],
      ),
      this.#timeoutMs,
    );
    return rows.map(toBinding);
  }

  /**
   * Deletes the bindings expired at `now`, in chunks of 5,000 rows. Rows a register batch holds
   * locked are skipped (a later sweep takes them), so a sweep never waits for a batch nor deadlocks
   * with one.
   */
  async sweep(now: number): Promise<number> {
    const chunk = 5000;
    let removed = 0;
    for (;;) {
      const result = await withTimeout(
        this.#sql`DELETE FROM locations WHERE (aor, key) IN (
          SELECT aor, key FROM locations WHERE expires_at <= to_timestamp(${now}::float8 / 1000)
          LIMIT ${chunk} FOR UPDATE SKIP LOCKED)`,
        this.#timeoutMs,
      );
      removed += result.count;
      if (result.count < chunk) return removed;
    }
  }

  /** How many unexpired bindings all processes hold at `now`. */
  async count(now: number): Promise<number> {
    const [row] = await withTimeout(
      this.#sql<{ n: number }[]>`SELECT count(*)::float8 AS n FROM locations
        WHERE expires_at > to_timestamp(${now}::float8 / 1000)`,
      this.#timeoutMs,
    );
    return row?.n ?? 0;
  }

  /** Commits what is queued, then refuses further changes (`unavailable`). Does not end `sql`. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
    if (this.#queue.length > 0 && !this.#flushing) this.#flushing = this.#flush();
    while (this.#flushing) await this.#flushing;
  }

  /** Counters since construction. */
  stats(): GroupCommitStats {
    return {
      batches: this.#batches,
      ops: this.#ops,
      failedBatches: this.#failed,
      timeouts: this.#timeouts,
      lastBatchSize: this.#lastBatch,
      largestBatchSize: this.#largestBatch,
      queued: this.#queue.length,
      commitSeconds: {
        bounds: COMMIT_BOUNDS,
        counts: [...this.#commitCounts],
        sum: this.#commitSum,
        count: this.#commitCounts[COMMIT_BOUNDS.length]!,
      },
    };
  }

  #unavailable(): RegisterOutcome {
    return { ok: false, reason: "unavailable", retryAfter: this.#retryAfter };
  }

  #schedule(): void {
    if (this.#flushing) return; // the running flush loop takes it
    if (this.#queue.length >= this.#maxBatch) {
      if (this.#timer !== undefined) clearTimeout(this.#timer);
      this.#timer = undefined;
      this.#flushing = this.#flush();
    } else if (this.#timer === undefined) {
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        if (!this.#flushing) this.#flushing = this.#flush();
      }, this.#windowMs);
    }
  }

  /** Runs batches one after another until the queue is empty. */
  async #flush(): Promise<void> {
    try {
      while (this.#queue.length > 0) {
        const batch = this.#queue.length <= this.#maxBatch
          ? this.#queue
          : this.#queue.slice(0, this.#maxBatch);
        this.#queue = batch === this.#queue ? [] : this.#queue.slice(this.#maxBatch);
        await this.#commit(batch);
      }
    } finally {
      this.#flushing = undefined;
    }
  }

  async #commit(batch: Pending[]): Promise<void> {
    this.#batches++;
    this.#ops += batch.length;
    this.#lastBatch = batch.length;
    if (batch.length > this.#largestBatch) this.#largestBatch = batch.length;
    const started = performance.now();
    const state = { abandoned: false, commitSent: false };
    const attempt = this.#transact(batch, state);
    let outcomes: RegisterOutcome[];
    try {
      outcomes = await withTimeout(attempt, this.#timeoutMs);
      this.#observe((performance.now() - started) / 1000);
    } catch (err) {
      this.#failed++;
      const unavailable = this.#unavailable();
      for (const p of batch) p.resolve(unavailable);
      this.#onBatchError?.(err);
      if (err instanceof TimeoutError) {
        this.#timeouts++;
        state.abandoned = true;
        this.#onCommitTimeout?.();
        // An abandoned attempt never starts its transaction later (a reserve() issued while the pool
        // was resetting can stay pending long after the database is back). Only one whose COMMIT is
        // already on the wire could still land, out of order: wait for that to settle (dropping the
        // connection settles it), but not for ever.
        if (state.commitSent) await withTimeout(attempt, this.#timeoutMs).catch(() => {});
      }
      return;
    }
    for (let i = 0; i < batch.length; i++) batch[i]!.resolve(outcomes[i]!);
  }

  #observe(seconds: number): void {
    this.#commitSum += seconds;
    for (let i = 0; i < COMMIT_BOUNDS.length; i++) {
      if (seconds <= COMMIT_BOUNDS[i]!) this.#commitCounts[i]!++;
    }
    this.#commitCounts[COMMIT_BOUNDS.length]!++;
  }

  /**
   * A reserved connection. A `reserve()` issued while postgres.js resets its connections can stay
   * pending long after the database is back, while a new one succeeds: so ask again every
   * {@link RESERVE_RETRY_MS}, and hand any late arrival straight back to the pool.
   */
  async #reserve(state: { abandoned: boolean }): Promise<postgres.ReservedSql> {
    for (;;) {
      const pending = this.#sql.reserve();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const conn = await Promise.race([
        pending,
        new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), RESERVE_RETRY_MS)),
      ]).finally(() => clearTimeout(timer));
      if (conn !== null && !state.abandoned) return conn;
      if (conn !== null) conn.release();
      else pending.then((late) => late.release(), () => {});
      if (state.abandoned) {
        throw new Error("Cannot commit: the batch was abandoned while waiting for a connection");
      }
    }
  }

  /**
   * One transaction for the batch on a reserved connection, in two round trips: BEGIN, the locks and
   * the read pipelined; then the writes and COMMIT pipelined. Resolves to each change's outcome
   * after COMMIT succeeded.
   */
  async #transact(
    batch: readonly Pending[],
    state: { abandoned: boolean; commitSent: boolean },
  ): Promise<RegisterOutcome[]> {
    const aors = [...new Set(batch.map((p) => p.change.aor))];
    const conn = await this.#reserve(state);
    // postgres.js gives a reserved connection no close notice, and a query issued on it after it
    // closed is written to a dead socket (an uncaught TypeError): learn of the close the way
    // postgres.js's own begin() does, through the undocumented `onexecute` query option.
    // Queries postgres.js had not sent yet when the connection closed never settle: race them
    // against the close.
    let closed = false;
    let onClose: (err: unknown) => void = () => {};
    const whenClosed = new Promise<never>((_, reject) => onClose = reject);
    whenClosed.catch(() => {});
    const watch = {
      onexecute: (c: { onclose?: (e: unknown) => void }) => {
        c.onclose = (err) => {
          closed = true;
          onClose(err);
        };
      },
    } as postgres.UnsafeQueryOptions;
    try {
      const [, , , rows] = await Promise.race([
        whenClosed,
        Promise.all([
          conn.unsafe("BEGIN", [], watch).execute(),
          // Every statement of a batch reaches rows by primary key. While the table grows fast its
          // statistics lag, and the planner then chose sequential scans for `aor = ANY($1)` and the
          // DELETE's join (measured: 7,022 seq scans reading 473 M rows in one bench run).
          conn.unsafe("SET LOCAL enable_seqscan = off").execute(),
          conn`SELECT pg_advisory_xact_lock(k) FROM (
               SELECT DISTINCT hashtextextended(a, 0) AS k FROM unnest(${aors}::text[]) AS a
               ORDER BY 1
             ) AS locks`.execute(),
          conn.unsafe<LocationRow[]>(
            `SELECT ${SELECT_COLUMNS} FROM locations WHERE aor = ANY($1::text[])
           ORDER BY aor, ${ORDER}`,
            [aors],
          ).execute(),
        ]),
      ]).catch(async (err) => {
        // A statement failed on a live connection: end the transaction before the pool reuses it.
        if (!closed && err instanceof postgres.PostgresError) await conn`ROLLBACK`.catch(() => {});
        throw err;
      });
      const { outcomes, goneAors, goneKeys, upserts } = plan(rows, batch);
      const writes: Promise<unknown>[] = [];
      if (goneAors.length > 0) {
        writes.push(
          conn`DELETE FROM locations AS l USING unnest(${goneAors}::text[], ${goneKeys}::text[])
               AS g(aor, key) WHERE l.aor = g.aor AND l.key = g.key`.execute(),
        );
      }
      if (upserts.length > 0) writes.push(upsert(conn, upserts));
      if (state.abandoned) {
        // Its callers were told "unavailable": the batch must not land after newer ones.
        for (const w of writes) w.catch(() => {});
        await conn`ROLLBACK`.catch(() => {});
        throw new Error("Cannot commit: the batch was abandoned");
      }
      // After a failed write the server answers COMMIT with ROLLBACK; either way, all settle.
      state.commitSent = true;
      const commit = conn`COMMIT`.execute();
      const settled = await Promise.race([whenClosed, Promise.allSettled([...writes, commit])]);
      const failed = settled.find((r): r is PromiseRejectedResult => r.status === "rejected");
      if (failed) throw failed.reason;
      const tag =
        (settled[settled.length - 1] as PromiseFulfilledResult<{ command: string }>).value;
      if (tag.command !== "COMMIT") {
        throw new Error(`Cannot commit: server answered ${tag.command}`);
      }
      return outcomes;
    } finally {
      // A closed connection stays with postgres.js, which reconnects it; releasing it would put it
      // back in the open pool.
      if (!closed) conn.release();
    }
  }
}

/** What a batch does: each change's outcome, and the rows to delete and upsert. */
function plan(rows: readonly LocationRow[], batch: readonly Pending[]): {
  outcomes: RegisterOutcome[];
  goneAors: string[];
  goneKeys: string[];
  upserts: Record<string, unknown>[];
} {
  const state = new Map<string, readonly Binding[]>();
  const read = new Set<Binding>();
  for (const r of rows) {
    const b = toBinding(r);
    read.add(b);
    const list = state.get(b.aor) as Binding[] | undefined;
    if (list) list.push(b);
    else state.set(b.aor, [b]);
  }
  const outcomes: RegisterOutcome[] = [];
  const touched = new Set<string>();
  for (const { change } of batch) {
    const result = applyRegister(state.get(change.aor) ?? [], change);
    if (result.ok) {
      state.set(change.aor, result.bindings);
      touched.add(change.aor);
      outcomes.push({ ok: true, bindings: result.bindings });
    } else {
      outcomes.push(result);
    }
  }
  // Bindings read that are no longer there (removed, expired, replaced) go; new and changed
  // bindings (objects applyRegister created) are upserted.
  const goneAors: string[] = [];
  const goneKeys: string[] = [];
  const upserts: Record<string, unknown>[] = [];
  const kept = new Set<Binding>();
  for (const aor of touched) {
    for (const b of state.get(aor) ?? []) {
      if (read.has(b)) kept.add(b);
      else upserts.push(toRow(b));
    }
  }
  for (const b of read) {
    if (touched.has(b.aor) && !kept.has(b)) {
      goneAors.push(b.aor);
      goneKeys.push(b.key);
    }
  }
  return { outcomes, goneAors, goneKeys, upserts };
}

function upsert(conn: postgres.Sql, rows: Record<string, unknown>[]): Promise<unknown> {
  return conn`
      INSERT INTO locations AS l (aor, key, contact, expires_at, q, call_id, cseq, instance_id,
        reg_id, transport, source_address, source_port, worker, flow_id, path, user_agent,
        updated_at)
      SELECT aor, key, contact, to_timestamp(expires_ms / 1000), q, call_id, cseq, instance_id,
        reg_id, transport, source_address, source_port, worker, flow_id, path, user_agent,
        to_timestamp(updated_ms / 1000)
      FROM jsonb_to_recordset(${JSON.stringify(rows)}::text::jsonb) AS r(aor text, key text,
        contact text, expires_ms float8, q float8, call_id text, cseq bigint, instance_id text,
        reg_id integer, transport text, source_address text, source_port integer,
        worker integer, flow_id bigint, path text[], user_agent text, updated_ms float8)
      ON CONFLICT (aor, key) DO UPDATE SET contact = excluded.contact,
        expires_at = excluded.expires_at, q = excluded.q, call_id = excluded.call_id,
        cseq = excluded.cseq, instance_id = excluded.instance_id, reg_id = excluded.reg_id,
        transport = excluded.transport, source_address = excluded.source_address,
        source_port = excluded.source_port, worker = excluded.worker,
        flow_id = excluded.flow_id, path = excluded.path, user_agent = excluded.user_agent,
        updated_at = excluded.updated_at`.execute();
}

interface SubscriberRow {
  username: string;
  domain: string;
  ha1_md5: string;
  ha1_sha256: string;
}

function toSubscriber(r: SubscriberRow): Subscriber {
  return { username: r.username, domain: r.domain, ha1Md5: r.ha1_md5, ha1Sha256: r.ha1_sha256 };
}

/** Subscribers in the `subscribers` table. */
export class PostgresSubscriberStore implements SubscriberStore {
  readonly #sql: postgres.Sql;
  readonly #timeoutMs: number;

  /**
   * A store on `sql`, which the caller keeps ownership of.
   *
   * @param sql a postgres.js instance whose `search_path` leads to the migrated tables
   * @param options `timeoutMs`: each call rejects after this long (a silent network must not hold
   *   an authentication for ever), default 2000
   */
  constructor(sql: postgres.Sql, options: { readonly timeoutMs?: number } = {}) {
    this.#sql = sql;
    this.#timeoutMs = options.timeoutMs ?? 2000;
  }

  /** The subscriber, or null. */
  async get(username: string, domain: string): Promise<Subscriber | null> {
    const [row] = await withTimeout(
      this.#sql<SubscriberRow[]>`
        SELECT username, domain, ha1_md5, ha1_sha256 FROM subscribers
        WHERE domain = ${domain} AND username = ${username}`,
      this.#timeoutMs,
    );
    return row ? toSubscriber(row) : null;
  }

  /** Adds or replaces a subscriber. */
  async put(s: Subscriber): Promise<void> {
    await withTimeout(
      this.#sql`
      INSERT INTO subscribers (domain, username, ha1_md5, ha1_sha256)
      VALUES (${s.domain}, ${s.username}, ${s.ha1Md5}, ${s.ha1Sha256})
      ON CONFLICT (domain, username) DO UPDATE
      SET ha1_md5 = excluded.ha1_md5, ha1_sha256 = excluded.ha1_sha256`,
      this.#timeoutMs,
    );
  }

  /** Removes a subscriber; resolves to whether one was removed. */
  async remove(username: string, domain: string): Promise<boolean> {
    const result = await withTimeout(
      this.#sql`DELETE FROM subscribers WHERE domain = ${domain} AND username = ${username}`,
      this.#timeoutMs,
    );
    return result.count > 0;
  }

  /** All subscribers, by domain then username. */
  async list(): Promise<readonly Subscriber[]> {
    const rows = await withTimeout(
      this.#sql<SubscriberRow[]>`
        SELECT username, domain, ha1_md5, ha1_sha256 FROM subscribers ORDER BY domain, username`,
      this.#timeoutMs,
    );
    return rows.map(toSubscriber);
  }
}
