/**
 * Storage as the command line sees it: which database `serve` uses (a PostgreSQL server from `--db` or
 * `DATABASE_URL`, else the embedded engine in `--data-dir`), and the `migrate` and `user` commands.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { ConfigError } from "../config.ts";
import { log } from "../log.ts";
import { ha1 } from "../sip/digest.ts";
import { defaultDataDir, type Embedded, startEmbedded } from "./embedded.ts";
import { openStorage, type Storage } from "./open.ts";

/** What {@link openConfiguredStorage} needs of the serve configuration. */
export interface StorageConfig {
  readonly db: string | null;
  readonly dataDir: string;
  readonly commitWindowMs: number;
  readonly commitBatch: number;
}

/** Open storage, with whatever must be stopped after it. */
export interface OpenedStorage extends Storage {
  /** The embedded engine, when one was started. */
  readonly embedded: Embedded | null;
}

/**
 * The configured database's URL: the server's, or the embedded engine's after starting it. Its first
 * open takes seconds; it is started (and logged) before anything listens.
 */
export async function startDatabase(
  config: Pick<StorageConfig, "db" | "dataDir">,
): Promise<{ url: string; embedded: Embedded | null }> {
  if (config.db !== null) return { url: config.db, embedded: null };
  log.info("starting embedded PostgreSQL (PGlite); the first open takes a few seconds", {
    dataDir: config.dataDir,
  });
  const embedded = await startEmbedded({ dataDir: config.dataDir });
  log.info("embedded PostgreSQL ready", {
    openMs: Math.round(embedded.timings.openMs),
    listenMs: Math.round(embedded.timings.listenMs),
  });
  return { url: embedded.url, embedded };
}

/** Opens the configured database ({@link startDatabase}), runs migrations and opens the stores. */
export async function openConfiguredStorage(config: StorageConfig): Promise<OpenedStorage> {
  const { url, embedded } = await startDatabase(config);
  let storage: Storage;
  try {
    storage = await openStorage(url, {
      ...(embedded ? { max: embedded.maxConnections } : {}),
      locations: { batchWindowMs: config.commitWindowMs, maxBatchSize: config.commitBatch },
    });
  } catch (error) {
    await embedded?.stop();
    throw error;
  }
  if (storage.migrated.length > 0) log.info("migrated", { versions: storage.migrated.join(",") });
  const started = embedded;
  return {
    ...storage,
    embedded,
    async close() {
      await storage.close();
      await started?.stop();
    },
  };
}

const USER_HELP = `Usage:
  citysip user add USER@DOMAIN [--db URL | --data-dir DIR]   (password from the terminal or stdin)
  citysip user del USER@DOMAIN [--db URL | --data-dir DIR]
  citysip user list [--db URL | --data-dir DIR]`;

async function readPassword(): Promise<string> {
  if (Deno.stdin.isTerminal()) {
    // Read without echo: the password never shows on screen or in `ps`.
    await Deno.stdout.write(new TextEncoder().encode("Password: "));
    Deno.stdin.setRaw(true);
    const chars: number[] = [];
    const buf = new Uint8Array(1);
    try {
      while ((await Deno.stdin.read(buf)) === 1) {
        const c = buf[0]!;
        if (c === 13 || c === 10) break;
        if (c === 3) throw new ConfigError("cancelled");
        if (c === 127) chars.pop();
        else chars.push(c);
      }
    } finally {
      Deno.stdin.setRaw(false);
      await Deno.stdout.write(new TextEncoder().encode("\n"));
    }
    return new TextDecoder().decode(new Uint8Array(chars));
  }
  const text = await new Response(Deno.stdin.readable).text();
  return text.split(/\r?\n/)[0] ?? "";
}

function splitUser(raw: string | undefined): { username: string; domain: string } {
  const m = raw === undefined ? null : /^([^@\s:]+)@([A-Za-z0-9.\-]+)$/.exec(raw);
  if (!m) throw new ConfigError(`invalid user "${raw ?? ""}": expected USER@DOMAIN`);
  return { username: m[1]!, domain: m[2]!.toLowerCase() };
}

/** Runs `citysip migrate ...` or `citysip user ...`; resolves to the exit status. */
export async function runStorageCommand(
  command: "migrate" | "user",
  args: string[],
): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        db: { type: "string" },
        "data-dir": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (error) {
    throw new ConfigError((error as Error).message.split("\n")[0]!);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(
      command === "user" ? USER_HELP : "Usage: citysip migrate [--db URL | --data-dir DIR]",
    );
    return 0;
  }
  const db = values.db ?? Deno.env.get("DATABASE_URL") ?? null;
  if (db !== null && !/^postgres(ql)?:\/\//.test(db)) {
    throw new ConfigError(`invalid --db "${db}": expected a postgres:// URL`);
  }
  const [action, target] = positionals;
  if (command === "migrate" && positionals.length > 0) {
    throw new ConfigError(`unexpected argument "${positionals[0]}"`);
  }
  if (command === "user" && !["add", "del", "list"].includes(action ?? "")) {
    throw new ConfigError(`unknown user action "${action ?? ""}": expected add, del or list`);
  }
  const who = command === "user" && action !== "list" ? splitUser(target) : null;
  const password = who !== null && action === "add" ? await readPassword() : "";
  if (who !== null && action === "add" && password === "") throw new ConfigError("empty password");

  const storage = await openConfiguredStorage({
    db,
    dataDir: values["data-dir"] ?? defaultDataDir(),
    commitWindowMs: 2,
    commitBatch: 1000,
  });
  try {
    if (command === "migrate") {
      console.log(
        storage.migrated.length > 0 ? `applied ${storage.migrated.join(", ")}` : "up to date",
      );
    } else if (action === "list") {
      for (const s of await storage.subscribers.list()) console.log(`${s.username}@${s.domain}`);
    } else if (action === "add" && who) {
      await storage.subscribers.put({
        ...who,
        ha1Md5: ha1(who.username, who.domain, password, "MD5"),
        ha1Sha256: ha1(who.username, who.domain, password, "SHA-256"),
      });
      console.log(`added ${who.username}@${who.domain}`);
    } else if (action === "del" && who) {
      const removed = await storage.subscribers.remove(who.username, who.domain);
      console.log(removed ? `removed ${who.username}@${who.domain}` : `no such user`);
      if (!removed) return 1;
    }
  } finally {
    await storage.close();
  }
  return 0;
}
