-- Bindings of the location service (RFC 3261 §10), one row per (AOR, binding key).
-- Tables are created unqualified: they land in the first schema of search_path, so a test can run
-- in a schema of its own.
CREATE TABLE locations (
  aor text NOT NULL,
  key text NOT NULL,
  contact text NOT NULL,
  expires_at timestamptz NOT NULL,
  q double precision,
  call_id text NOT NULL,
  cseq bigint NOT NULL,
  instance_id text,
  reg_id integer,
  transport text NOT NULL,
  source_address text NOT NULL,
  source_port integer NOT NULL,
  worker integer NOT NULL,
  flow_id bigint NOT NULL,
  path text[] NOT NULL DEFAULT '{}',
  user_agent text,
  updated_at timestamptz NOT NULL,
  PRIMARY KEY (aor, key)
);
-- Lookup by AOR uses the primary key's leading column; the sweep and count use this one.
CREATE INDEX locations_expires_at ON locations (expires_at);
