/**
 * The location service (RFC 3261 §10): the registrar's view of bindings, behind one small interface so
 * that the in-memory store and the PostgreSQL store are interchangeable and tested by one suite.
 *
 * The registrar validates a REGISTER and computes what it asks for (a {@link RegisterChange}); the store
 * applies it atomically per AOR, with the Call-ID/CSeq ordering rules of RFC 3261 §10.3 steps 6-7, and
 * resolves only once the change is durable. Implementations batch many changes into one commit (group
 * commit); callers may have thousands in flight.
 *
 * @module
 */

/** One contact the REGISTER asks to add, refresh or remove (RFC 3261 §10.3 step 7). */
export interface ContactChange {
  /**
   * The binding's identity within the AOR: `"<instance>;reg-id=<n>"` when the Contact carries
   * `+sip.instance` and `reg-id` (RFC 5626 §6), else the contact URI normalised for comparison
   * (RFC 3261 §19.1.4).
   */
  readonly key: string;
  /** The Contact as it is returned in 200 OK: `<uri>` plus params other than `expires`. */
  readonly contact: string;
  /** Granted lifetime in seconds; 0 removes the binding. */
  readonly expires: number;
  /** The `q` parameter, 0 to 1, or null when absent. */
  readonly q: number | null;
  readonly instanceId: string | null;
  readonly regId: number | null;
}

/** Where the REGISTER arrived: kept with each binding so a later proxy can reach the user's flow. */
export interface BindingSource {
  readonly transport: "udp" | "tcp";
  readonly address: string;
  readonly port: number;
  /** Which worker process owns the flow. */
  readonly worker: number;
  /** The flow within that worker (TCP connection id; 0 for UDP). */
  readonly flowId: number;
}

/** What one REGISTER asks of the location service, already validated by the registrar. */
export interface RegisterChange {
  /** The canonical address-of-record, e.g. `sip:alice@example.com` (RFC 3261 §10.3 step 5). */
  readonly aor: string;
  readonly callId: string;
  readonly cseq: number;
  /** Contacts to add, refresh or remove. Empty with `removeAll` false: a query (§10.3 step 8 only). */
  readonly contacts: readonly ContactChange[];
  /** `Contact: *` with `Expires: 0`: remove every binding (§10.3 step 6). */
  readonly removeAll: boolean;
  /** The request's time, milliseconds since the epoch; expiry is computed from it. */
  readonly now: number;
  readonly source: BindingSource;
  /** Path header values (RFC 3327), in order. */
  readonly path: readonly string[];
  readonly userAgent: string | null;
  /** Refuse the change if the AOR would hold more bindings than this. */
  readonly maxBindings: number;
}

/** A binding as stored. */
export interface Binding {
  readonly aor: string;
  readonly key: string;
  readonly contact: string;
  /** Milliseconds since the epoch. */
  readonly expiresAt: number;
  readonly q: number | null;
  readonly callId: string;
  readonly cseq: number;
  readonly instanceId: string | null;
  readonly regId: number | null;
  readonly source: BindingSource;
  readonly path: readonly string[];
  readonly userAgent: string | null;
  /** Milliseconds since the epoch. */
  readonly updatedAt: number;
}

/** The outcome of {@link LocationStore.register}. */
export type RegisterOutcome =
  /** Applied and durable; `bindings` are all unexpired bindings of the AOR afterwards (§10.3 step 8). */
  | { readonly ok: true; readonly bindings: readonly Binding[] }
  /** §10.3 steps 6-7: a binding with the same Call-ID has a CSeq not lower than the request's. Nothing changed. */
  | { readonly ok: false; readonly reason: "out-of-order" }
  /** The AOR would exceed `maxBindings`. Nothing changed. */
  | { readonly ok: false; readonly reason: "too-many-bindings" }
  /** The store cannot commit now (database down, overloaded). Nothing is promised; retry later. */
  | { readonly ok: false; readonly reason: "unavailable"; readonly retryAfter: number };

/** The location service. */
export interface LocationStore {
  /** Applies one REGISTER's changes atomically for its AOR; resolves after the change is durable. Never rejects. */
  register(change: RegisterChange): Promise<RegisterOutcome>;
  /** All unexpired bindings of an AOR at `now`, highest q first. */
  lookup(aor: string, now: number): Promise<readonly Binding[]>;
  /** Deletes bindings expired at `now`; resolves to how many were removed. */
  sweep(now: number): Promise<number>;
  /** How many unexpired bindings are held (for metrics). */
  count(now: number): Promise<number>;
  /** Commits what is pending and releases resources. */
  close(): Promise<void>;
}
