/**
 * Versioned schema migrations: `storage/migrations/NNN_name.sql`, applied in order, each in its own
 * transaction, recorded in `schema_migrations`. Safe to run from several processes at once: each
 * migration's transaction first takes an advisory lock scoped to the current schema, then checks
 * whether the version is already recorded.
 *
 * Tables are created in the first schema of `search_path`, so tests can use a schema of their own.
 * (`deno compile` needs `--include storage/migrations` for the files to be found.)
 *
 * @module
 */
import type postgres from "postgres";

/** One migration file. */
export interface Migration {
  /** The `NNN` prefix of the file name, e.g. `"001"`. */
  readonly version: string;
  /** The rest of the file name without `.sql`, e.g. `"locations"`. */
  readonly name: string;
  /** The file's SQL, run as one simple-protocol query. */
  readonly sql: string;
}

const MIGRATIONS_DIR = new URL("./migrations/", import.meta.url);

/** Reads the migration files, ordered by version. */
export async function readMigrations(dir: URL = MIGRATIONS_DIR): Promise<Migration[]> {
  const found: Migration[] = [];
  for await (const entry of Deno.readDir(dir)) {
    const m = /^(\d+)_([\w-]+)\.sql$/.exec(entry.name);
    if (!entry.isFile || !m) continue;
    found.push({
      version: m[1]!,
      name: m[2]!,
      sql: await Deno.readTextFile(new URL(entry.name, dir)),
    });
  }
  found.sort((a, b) => Number(a.version) - Number(b.version));
  for (let i = 1; i < found.length; i++) {
    if (Number(found[i]!.version) === Number(found[i - 1]!.version)) {
      throw new RangeError(`Cannot migrate: duplicate migration version ${found[i]!.version}`);
    }
  }
  return found;
}

/**
 * Applies the migrations not yet recorded in `schema_migrations`, in order, one transaction each.
 * Idempotent; concurrent callers wait for each other on an advisory lock.
 *
 * @returns the versions this call applied (empty when the schema was up to date)
 */
export async function migrate(
  sql: postgres.Sql,
  migrations?: readonly Migration[],
): Promise<string[]> {
  const all = migrations ?? await readMigrations();
  const applied: string[] = [];
  for (const m of all) {
    const done = await sql.begin(async (tx) => {
      await tx`SELECT pg_advisory_xact_lock(hashtextextended('citysip.migrate.' || current_schema(), 0))`;
      await tx`CREATE TABLE IF NOT EXISTS schema_migrations (
        version text PRIMARY KEY,
        name text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
      )`;
      const [row] = await tx`SELECT 1 FROM schema_migrations WHERE version = ${m.version}`;
      if (row) return false;
      await tx.unsafe(m.sql);
      await tx`INSERT INTO schema_migrations (version, name) VALUES (${m.version}, ${m.name})`;
      return true;
    });
    if (done) applied.push(m.version);
  }
  return applied;
}
