//! Pure generation of the files and strings a node's PostgreSQL reads: the
//! `meridian.conf` include file with the node's settings, `pg_hba.conf`, and
//! libpq conninfo strings (for `primary_conninfo` and for clients).
//!
//! Nothing here touches the disk or the network; [`super::node`] writes what
//! these functions render. Values are quoted the way PostgreSQL's configuration
//! parser and libpq expect, so a path or password with spaces or quotes cannot
//! break a file. This module does not validate setting names or units: a wrong
//! name is reported by PostgreSQL at start-up, in the node's log.

use std::fmt;
use std::path::PathBuf;

/// Name of the include file Meridian owns inside a data directory. Meridian
/// rewrites it as a whole; `postgresql.conf` only gets one `include` line.
pub const INCLUDE_FILE: &str = "meridian.conf";

/// The line appended to `postgresql.conf` so that [`INCLUDE_FILE`] is read.
pub const INCLUDE_LINE: &str = "include_if_exists = 'meridian.conf'";

/// The database superuser created by `initdb` and used for replication.
pub const SUPERUSER: &str = "postgres";

/// Where a standby streams from: rendered into `primary_conninfo`,
/// `primary_slot_name` and `recovery_target_timeline = 'latest'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyOf {
    /// Connection to the upstream (normally the primary).
    pub upstream: Conninfo,
    /// Physical replication slot on the upstream, if any.
    pub slot: Option<String>,
}

/// The settings Meridian controls in a node's `meridian.conf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgSettings {
    /// `listen_addresses`. Default `127.0.0.1`.
    pub listen_addresses: String,
    /// `port`. Default 5432 (tests always pick a free one).
    pub port: u16,
    /// `unix_socket_directories`: a per-node directory, or `None` for no unix
    /// socket at all (`''`). Default `None`.
    pub unix_socket_dir: Option<PathBuf>,
    /// `max_connections`. Default 200.
    pub max_connections: u32,
    /// `shared_buffers`. Default `32MB` (small: several nodes share a machine in tests).
    pub shared_buffers: String,
    /// `max_wal_senders`. Default 10.
    pub max_wal_senders: u32,
    /// `max_replication_slots`. Default 10.
    pub max_replication_slots: u32,
    /// `wal_keep_size`. Default `128MB`.
    pub wal_keep_size: String,
    /// `max_slot_wal_keep_size`: caps the WAL a dead replica's slot can pin.
    /// Default `1GB`.
    pub max_slot_wal_keep_size: String,
    /// `fsync`. Default on; tests turn it off for speed (safe against a crash
    /// of PostgreSQL, not of the machine).
    pub fsync: bool,
    /// Where this node streams from when it is a standby.
    pub standby: Option<StandbyOf>,
    /// Further settings, written last (so they win), values quoted automatically.
    pub extra: Vec<(String, String)>,
}

impl Default for PgSettings {
    fn default() -> Self {
        PgSettings {
            listen_addresses: "127.0.0.1".into(),
            port: 5432,
            unix_socket_dir: None,
            max_connections: 200,
            shared_buffers: "32MB".into(),
            max_wal_senders: 10,
            max_replication_slots: 10,
            wal_keep_size: "128MB".into(),
            max_slot_wal_keep_size: "1GB".into(),
            fsync: true,
            standby: None,
            extra: Vec::new(),
        }
    }
}

/// Quotes a value for `postgresql.conf`: always single-quoted, with `'` doubled
/// and `\` escaped (the configuration lexer processes backslash escapes).
pub fn quote_conf_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl PgSettings {
    /// All settings as `(name, value)` pairs in the order they are written.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| p.push((k.to_owned(), v));
        set("listen_addresses", self.listen_addresses.clone());
        set("port", self.port.to_string());
        set(
            "unix_socket_directories",
            self.unix_socket_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        );
        set("max_connections", self.max_connections.to_string());
        set("shared_buffers", self.shared_buffers.clone());
        set("wal_level", "logical".into());
        set("max_wal_senders", self.max_wal_senders.to_string());
        set(
            "max_replication_slots",
            self.max_replication_slots.to_string(),
        );
        set("wal_keep_size", self.wal_keep_size.clone());
        set(
            "max_slot_wal_keep_size",
            self.max_slot_wal_keep_size.clone(),
        );
        // pg_rewind needs hint-bit changes WAL-logged (data checksums do it too;
        // initdb enables both, so an old primary can always be rewound).
        set("wal_log_hints", "on".into());
        set("full_page_writes", "on".into());
        // fsync off survives a crash of PostgreSQL (the kernel keeps the
        // writes), only not one of the machine. synchronous_commit stays on:
        // off would lose acknowledged commits on kill -9, which failover tests
        // must be able to rule out.
        set("fsync", on_off(self.fsync).into());
        set("hot_standby", "on".into());
        set("hot_standby_feedback", "on".into());
        set("logging_collector", "off".into());
        set("log_line_prefix", "%m [%p] %q%u@%d ".into());
        set("recovery_target_timeline", "latest".into());
        if let Some(standby) = &self.standby {
            set("primary_conninfo", standby.upstream.to_string());
            set(
                "primary_slot_name",
                standby.slot.clone().unwrap_or_default(),
            );
        }
        for (k, v) in &self.extra {
            set(k, v.clone());
        }
        p
    }

    /// The content of [`INCLUDE_FILE`].
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Written by Meridian; rewritten as a whole on every change. Do not edit.\n",
        );
        for (k, v) in self.pairs() {
            out.push_str(&k);
            out.push_str(" = ");
            out.push_str(&quote_conf_value(&v));
            out.push('\n');
        }
        out
    }
}

/// The `pg_hba.conf` lines that trust every user, database and replication
/// connection from loopback (IPv4 and IPv6) — and nothing else.
pub fn trust_loopback_hba() -> Vec<String> {
    vec![
        "host all all 127.0.0.1/32 trust".into(),
        "host all all ::1/128 trust".into(),
        "host replication all 127.0.0.1/32 trust".into(),
        "host replication all ::1/128 trust".into(),
    ]
}

/// The content of `pg_hba.conf` for the given lines (first match wins, so
/// password rules for specific users must come before broader trust lines).
pub fn render_hba(lines: &[String]) -> String {
    let mut out = String::from(
        "# Written by Meridian; rewritten as a whole on every change. Do not edit.\n\
         # TYPE DATABASE USER ADDRESS METHOD\n",
    );
    for line in lines {
        out.push_str(line.trim());
        out.push('\n');
    }
    out
}

/// Adds [`INCLUDE_LINE`] to the text of a `postgresql.conf` unless it is there.
/// Returns `None` when the file already includes it.
pub fn with_include_line(postgresql_conf: &str) -> Option<String> {
    if postgresql_conf.lines().any(|l| l.trim() == INCLUDE_LINE) {
        return None;
    }
    let mut out = postgresql_conf.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("\n# Meridian's settings (must stay last)\n");
    out.push_str(INCLUDE_LINE);
    out.push('\n');
    Some(out)
}

/// A libpq key/value connection string, e.g.
/// `host=127.0.0.1 port=5433 user=postgres dbname=postgres`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conninfo {
    /// `host`
    pub host: String,
    /// `port`
    pub port: u16,
    /// `user`
    pub user: String,
    /// `dbname`, omitted when `None` (a replication connection needs none).
    pub dbname: Option<String>,
    /// `application_name`, omitted when `None`; a standby uses its node name,
    /// which shows in `pg_stat_replication`.
    pub application_name: Option<String>,
    /// Further `key=value` pairs (e.g. `password`, `sslmode`, `connect_timeout`).
    pub extra: Vec<(String, String)>,
}

impl Conninfo {
    /// A connection as `user` to `dbname` on `host:port`.
    pub fn new(host: &str, port: u16, user: &str, dbname: Option<&str>) -> Conninfo {
        Conninfo {
            host: host.into(),
            port,
            user: user.into(),
            dbname: dbname.map(Into::into),
            application_name: None,
            extra: Vec::new(),
        }
    }
}

/// Quotes a conninfo value when needed: empty values and values with spaces,
/// `'` or `\` are single-quoted with `'` and `\` backslash-escaped.
pub fn quote_conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\' || c == '=');
    if plain {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

impl fmt::Display for Conninfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host={} port={} user={}",
            quote_conninfo_value(&self.host),
            self.port,
            quote_conninfo_value(&self.user)
        )?;
        if let Some(db) = &self.dbname {
            write!(f, " dbname={}", quote_conninfo_value(db))?;
        }
        if let Some(app) = &self.application_name {
            write!(f, " application_name={}", quote_conninfo_value(app))?;
        }
        for (k, v) in &self.extra {
            write!(f, " {}={}", k, quote_conninfo_value(v))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(rendered: &str, key: &str) -> Option<String> {
        rendered
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .map(str::to_owned)
    }

    #[test]
    fn default_settings_are_replication_ready() {
        let text = PgSettings::default().render();
        assert_eq!(value_of(&text, "wal_level").as_deref(), Some("'logical'"));
        assert_eq!(value_of(&text, "hot_standby").as_deref(), Some("'on'"));
        assert_eq!(
            value_of(&text, "hot_standby_feedback").as_deref(),
            Some("'on'")
        );
        assert_eq!(value_of(&text, "wal_log_hints").as_deref(), Some("'on'"));
        assert_eq!(value_of(&text, "fsync").as_deref(), Some("'on'"));
        assert_eq!(value_of(&text, "max_connections").as_deref(), Some("'200'"));
        assert_eq!(
            value_of(&text, "unix_socket_directories").as_deref(),
            Some("''")
        );
        assert_eq!(
            value_of(&text, "recovery_target_timeline").as_deref(),
            Some("'latest'")
        );
        assert!(value_of(&text, "primary_conninfo").is_none());
        assert!(value_of(&text, "synchronous_commit").is_none());
    }

    #[test]
    fn fsync_off_keeps_commits_synchronous() {
        let s = PgSettings {
            fsync: false,
            ..Default::default()
        };
        let text = s.render();
        assert_eq!(value_of(&text, "fsync").as_deref(), Some("'off'"));
        // Acknowledged commits must survive kill -9 of the postmaster.
        assert!(value_of(&text, "synchronous_commit").is_none());
        // pg_rewind needs full pages even when fsync is off.
        assert_eq!(value_of(&text, "full_page_writes").as_deref(), Some("'on'"));
    }

    #[test]
    fn standby_settings_carry_conninfo_and_slot() {
        let mut upstream = Conninfo::new("127.0.0.1", 5433, "postgres", None);
        upstream.application_name = Some("node 1".into());
        let s = PgSettings {
            port: 6000,
            standby: Some(StandbyOf {
                upstream,
                slot: Some("node1".into()),
            }),
            ..Default::default()
        };
        let text = s.render();
        assert_eq!(value_of(&text, "port").as_deref(), Some("'6000'"));
        // The conninfo quotes `node 1` with single quotes, which the conf
        // quoting then doubles.
        assert_eq!(
            value_of(&text, "primary_conninfo").as_deref(),
            Some("'host=127.0.0.1 port=5433 user=postgres application_name=''node 1'''")
        );
        assert_eq!(
            value_of(&text, "primary_slot_name").as_deref(),
            Some("'node1'")
        );
    }

    #[test]
    fn extra_settings_come_last_so_they_win() {
        let s = PgSettings {
            extra: vec![("shared_buffers".into(), "64MB".into())],
            ..Default::default()
        };
        let pairs = s.pairs();
        let last = pairs.last().unwrap();
        assert_eq!(last, &("shared_buffers".to_owned(), "64MB".to_owned()));
        let first = pairs
            .iter()
            .position(|(k, _)| k == "shared_buffers")
            .unwrap();
        assert!(first < pairs.len() - 1);
    }

    #[test]
    fn conf_quoting_escapes_quotes_backslashes_and_newlines() {
        assert_eq!(quote_conf_value("plain"), "'plain'");
        assert_eq!(quote_conf_value(""), "''");
        assert_eq!(quote_conf_value("it's"), "'it''s'");
        assert_eq!(quote_conf_value(r"a\b"), r"'a\\b'");
        assert_eq!(quote_conf_value("a\nb"), r"'a\nb'");
    }

    #[test]
    fn conninfo_quotes_only_when_needed() {
        assert_eq!(quote_conninfo_value("abc"), "abc");
        assert_eq!(quote_conninfo_value(""), "''");
        assert_eq!(quote_conninfo_value("a b"), "'a b'");
        assert_eq!(quote_conninfo_value("it's"), r"'it\'s'");
        assert_eq!(quote_conninfo_value(r"a\b"), r"'a\\b'");
        assert_eq!(quote_conninfo_value("a=b"), "'a=b'");
    }

    #[test]
    fn conninfo_renders_all_parts_in_order() {
        let mut c = Conninfo::new("127.0.0.1", 6543, "app", Some("app db"));
        c.application_name = Some("node2".into());
        c.extra.push(("password".into(), "p w".into()));
        assert_eq!(
            c.to_string(),
            "host=127.0.0.1 port=6543 user=app dbname='app db' application_name=node2 password='p w'"
        );
    }

    #[test]
    fn hba_keeps_order_and_trust_is_loopback_only() {
        let mut lines = vec!["host all app 127.0.0.1/32 scram-sha-256".to_owned()];
        lines.extend(trust_loopback_hba());
        let text = render_hba(&lines);
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(body[0], "host all app 127.0.0.1/32 scram-sha-256");
        assert_eq!(body.len(), 5);
        for l in &body[1..] {
            assert!(l.ends_with("trust"), "{l}");
            assert!(l.contains("127.0.0.1/32") || l.contains("::1/128"), "{l}");
        }
        assert!(body.iter().any(|l| l.starts_with("host replication all")));
    }

    #[test]
    fn include_line_is_added_once() {
        let first = with_include_line("max_connections = 100").unwrap();
        assert!(first.ends_with(&format!("{INCLUDE_LINE}\n")));
        assert!(first.starts_with("max_connections = 100\n"));
        assert_eq!(with_include_line(&first), None);
        assert!(with_include_line("").unwrap().contains(INCLUDE_LINE));
    }
}
