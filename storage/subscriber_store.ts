/**
 * Subscribers: who may register, with their digest credentials (RFC 3261 §22, RFC 8760). Only HA1
 * values are stored, never the password.
 *
 * @module
 */

/** One subscriber's credentials. */
export interface Subscriber {
  readonly username: string;
  /** The realm the HA1 values were computed for (the domain). */
  readonly domain: string;
  /** hex(MD5(username ":" realm ":" password)) */
  readonly ha1Md5: string;
  /** hex(SHA-256(username ":" realm ":" password)), RFC 8760 */
  readonly ha1Sha256: string;
}

/** Subscriber storage. */
export interface SubscriberStore {
  /** The subscriber, or null when unknown. Rejects only when the store is unreachable. */
  get(username: string, domain: string): Promise<Subscriber | null>;
  /** Adds or replaces a subscriber. */
  put(subscriber: Subscriber): Promise<void>;
  /** Removes a subscriber; resolves to whether one was removed. */
  remove(username: string, domain: string): Promise<boolean>;
  /** All subscribers, ordered by domain then username. */
  list(): Promise<readonly Subscriber[]>;
}
