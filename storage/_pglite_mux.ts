/**
 * A PostgreSQL wire-protocol server for one PGlite engine that several clients may use at once.
 *
 * PGlite is one backend session. pglite-socket's multiplexer interleaves clients message by message,
 * which breaks the extended protocol (Parse/Bind/Execute of one client between another's: "portal does
 * not exist"). Here a client holds the engine for a whole unit: from its first message to the Sync
 * that ends an extended-protocol sequence (or one simple Query), and for as long as a transaction it
 * opened stays open. Others wait their turn, whole units at a time.
 *
 * ```
 * client A: Parse Bind Execute Sync | BEGIN ... COMMIT (pinned)        | ...
 * client B:          (waits)                           | Parse ... Sync |
 * ```
 *
 * Sessions share one backend: SET and prepared statements are shared (postgres.js names its statements
 * per connection, so they do not clash; startup parameters such as search_path are not applied).
 *
 * @module
 */
import { createServer, type Server, type Socket } from "node:net";
import type { PGlite } from "@electric-sql/pglite";

const SSL_REQUEST = 80877103;
const CANCEL_REQUEST = 80877102;
const PROTOCOL_3 = 196608;
const SYNC = new Uint8Array([0x53, 0, 0, 0, 4]);

function simpleQuery(text: string): Uint8Array {
  const body = new TextEncoder().encode(text + "\0");
  const out = new Uint8Array(5 + body.length);
  out[0] = 0x51; // Q
  new DataView(out.buffer).setInt32(1, 4 + body.length);
  out.set(body, 5);
  return out;
}

interface Client {
  readonly socket: Socket;
  buffered: Uint8Array;
  started: boolean;
  /** Complete messages not yet run. */
  readonly pending: Uint8Array[];
  /** Inside an extended-protocol sequence not yet ended by Sync. */
  midUnit: boolean;
  closed: boolean;
}

/** A TCP server multiplexing clients onto `db` by whole protocol units. */
export class PgliteMux {
  readonly #db: PGlite;
  readonly #server: Server;
  readonly #clients = new Set<Client>();
  #owner: Client | null = null;
  readonly #waiting: Client[] = [];
  #running = false;

  /** A server for `db`; call {@link listen}. */
  constructor(db: PGlite) {
    this.#db = db;
    this.#server = createServer((socket) => this.#accept(socket));
  }

  /** Listens on `host:port` (0: a free port); resolves to the port. */
  listen(port: number, host: string): Promise<number> {
    return new Promise((resolve, reject) => {
      this.#server.once("error", reject);
      this.#server.listen(port, host, () => {
        this.#server.off("error", reject);
        resolve((this.#server.address() as { port: number }).port);
      });
    });
  }

  /** Closes every client and the listener. */
  async close(): Promise<void> {
    for (const c of this.#clients) c.socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    while (this.#running) await new Promise((r) => setTimeout(r, 5));
  }

  #accept(socket: Socket): void {
    socket.setNoDelay(true);
    const client: Client = {
      socket,
      buffered: new Uint8Array(0),
      started: false,
      pending: [],
      midUnit: false,
      closed: false,
    };
    this.#clients.add(client);
    socket.on("data", (chunk: Uint8Array) => {
      const all = new Uint8Array(client.buffered.length + chunk.length);
      all.set(client.buffered);
      all.set(chunk, client.buffered.length);
      client.buffered = all;
      this.#split(client);
      this.#schedule(client);
    });
    const gone = () => {
      if (client.closed) return;
      client.closed = true;
      client.pending.length = 0;
      this.#clients.delete(client);
      this.#schedule(client);
    };
    socket.on("close", gone);
    socket.on("error", gone);
  }

  /** Cuts complete messages off the client's buffer. */
  #split(c: Client): void {
    let buf = c.buffered;
    for (;;) {
      const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
      if (!c.started) {
        if (buf.length < 8) break;
        const len = view.getInt32(0);
        const code = view.getInt32(4);
        if (buf.length < len) break;
        if (code === SSL_REQUEST) {
          c.socket.write("N");
        } else if (code === CANCEL_REQUEST) {
          c.socket.destroy(); // not supported
        } else {
          if (code !== PROTOCOL_3) c.socket.destroy();
          c.pending.push(buf.slice(0, len));
          c.started = true;
        }
        buf = buf.subarray(len);
        continue;
      }
      if (buf.length < 5) break;
      const len = 1 + view.getInt32(1);
      if (buf.length < len) break;
      c.pending.push(buf.slice(0, len));
      buf = buf.subarray(len);
    }
    c.buffered = buf.slice();
  }

  #schedule(c: Client): void {
    if (this.#owner === null) this.#owner = c;
    else if (this.#owner !== c && !this.#waiting.includes(c) && !c.closed) this.#waiting.push(c);
    if (!this.#running) void this.#run();
  }

  /** Runs the owner's messages; hands the engine on at unit boundaries outside transactions. */
  async #run(): Promise<void> {
    this.#running = true;
    try {
      while (this.#owner) {
        const c = this.#owner;
        if (c.closed) {
          await this.#cleanUp(c);
          this.#next();
          continue;
        }
        const msg = c.pending.shift();
        if (!msg) {
          // Waiting for more of this unit or transaction from the owner, or it is done.
          if (!c.midUnit && !this.#db.isInTransaction()) this.#next();
          else break;
          continue;
        }
        const type = c.started && msg.length >= 5 && msg[0] !== 0 ? msg[0]! : 0;
        if (type === 0x58) { // Terminate
          c.socket.end();
          c.closed = true;
          continue;
        }
        let reply: Uint8Array;
        try {
          reply = await this.#db.execProtocolRaw(msg, { throwOnError: false });
        } catch {
          c.socket.destroy();
          c.closed = true;
          continue;
        }
        if (reply.length > 0 && !c.closed) c.socket.write(reply);
        const isStartup = type === 0 && msg.length >= 8 &&
          new DataView(msg.buffer, msg.byteOffset).getInt32(4) === PROTOCOL_3;
        if (type === 0x53 || type === 0x51 || isStartup) c.midUnit = false; // Sync, Query
        else c.midUnit = true;
      }
    } finally {
      this.#running = false;
    }
  }

  #next(): void {
    this.#owner = null;
    while (this.#waiting.length > 0) {
      const c = this.#waiting.shift()!;
      if (!c.closed) {
        this.#owner = c;
        return;
      }
    }
  }

  /** Leaves the engine clean after a client went away mid-unit or mid-transaction. */
  async #cleanUp(c: Client): Promise<void> {
    if (c.midUnit) await this.#db.execProtocolRaw(SYNC, { throwOnError: false }).catch(() => {});
    c.midUnit = false;
    if (this.#db.isInTransaction()) {
      await this.#db.execProtocolRaw(simpleQuery("ROLLBACK"), { throwOnError: false }).catch(
        () => {},
      );
    }
  }
}
