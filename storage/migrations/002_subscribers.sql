-- Subscribers and their digest HA1 values (RFC 3261 §22, RFC 8760); never the password.
CREATE TABLE subscribers (
  domain text NOT NULL,
  username text NOT NULL,
  ha1_md5 text NOT NULL,
  ha1_sha256 text NOT NULL,
  PRIMARY KEY (domain, username)
);
