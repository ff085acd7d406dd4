//! Statements the proxy answers itself: `SET`/`RESET`/`SHOW` of its own session settings
//! (`meridian.min_lsn`, `meridian.max_staleness`, `meridian.last_commit_lsn`) and, in a
//! virtual session, SQL `DEALLOCATE` of a statement the client prepared through the
//! protocol (the server knows it under another name). In the simple protocol one Query
//! is one such command; in the extended protocol a statement parsed from such a text and
//! its portals are the proxy's, so `Parse`/`Bind`/`Describe`/`Execute`/`Close` of them
//! get the proxy's own answers and never reach a backend.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use meridian_shared::lsn::Lsn;

use crate::error::ProxyError;
use crate::ryw::{self, Command, Setting};
use crate::wire::{self, Frame};

/// A statement the proxy executes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalCmd {
    Meridian(Command),
    /// `DEALLOCATE name` of a protocol-level statement.
    Deallocate(Bytes),
    /// `COMMIT`/`ROLLBACK` of a transaction the proxy lost: answered `ROLLBACK`.
    EndLostTransaction,
}

/// The session's read-your-writes settings and knowledge.
#[derive(Debug, Default, Clone, Copy)]
pub struct RywState {
    /// Highest commit LSN of this session's writes.
    pub last_commit_lsn: Option<Lsn>,
    /// `SET meridian.min_lsn`: the causal token reads must wait for.
    pub min_lsn: Option<Lsn>,
    /// `SET meridian.max_staleness`.
    pub max_staleness: Option<Duration>,
}

impl RywState {
    /// Runs one of the proxy's own commands: its DataRow (for SHOW) and CommandComplete.
    pub fn execute(&mut self, cmd: &Command) -> Result<Vec<Frame>, ProxyError> {
        let bad = |e: ryw::BadValue| ProxyError::InvalidSetting {
            message: e.to_string(),
        };
        Ok(match cmd {
            Command::Show(s) => {
                let value = match s {
                    Setting::LastCommitLsn => self.last_commit_lsn.unwrap_or(Lsn::ZERO).to_string(),
                    Setting::MinLsn => self.min_lsn.unwrap_or(Lsn::ZERO).to_string(),
                    Setting::MaxStaleness => ryw::format_staleness(self.max_staleness),
                };
                vec![wire::data_row_text(&value), wire::command_complete("SHOW")]
            }
            Command::Set(Setting::MinLsn, v) => {
                self.min_lsn = ryw::parse_min_lsn(v).map_err(bad)?;
                vec![wire::command_complete("SET")]
            }
            Command::Set(Setting::MaxStaleness, v) => {
                self.max_staleness = Some(ryw::parse_staleness(v).map_err(bad)?);
                vec![wire::command_complete("SET")]
            }
            Command::Set(Setting::LastCommitLsn, _) | Command::Reset(Setting::LastCommitLsn) => {
                return Err(ProxyError::ReadOnlySetting {
                    name: Setting::LastCommitLsn.name(),
                })
            }
            Command::Reset(Setting::MinLsn) => {
                self.min_lsn = None;
                vec![wire::command_complete("RESET")]
            }
            Command::Reset(Setting::MaxStaleness) => {
                self.max_staleness = None;
                vec![wire::command_complete("RESET")]
            }
        })
    }

    /// `RESET ALL` / `DISCARD ALL` took effect.
    pub fn reset_all(&mut self) {
        self.min_lsn = None;
        self.max_staleness = None;
    }
}

/// The `RowDescription` of a command's result (`SHOW` has one text column).
pub fn row_description(cmd: &LocalCmd) -> Option<Frame> {
    match cmd {
        LocalCmd::Meridian(Command::Show(s)) => Some(wire::row_description_text(s.name())),
        _ => None,
    }
}

/// The proxy's statements and portals of the extended protocol.
#[derive(Debug, Default)]
pub struct LocalStatements {
    statements: HashMap<Bytes, LocalCmd>,
    portals: HashMap<Bytes, LocalCmd>,
}

impl LocalStatements {
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty() && self.portals.is_empty()
    }

    pub fn prepare(&mut self, name: Bytes, cmd: LocalCmd) {
        self.statements.insert(name, cmd);
    }

    /// A `Parse` of a statement that is not the proxy's reuses `name`.
    pub fn forget_statement(&mut self, name: &[u8]) -> Option<LocalCmd> {
        self.statements.remove(name)
    }

    pub fn statement(&self, name: &[u8]) -> Option<&LocalCmd> {
        self.statements.get(name)
    }

    /// Binds `portal` to statement `stmt` if it is the proxy's; else forgets `portal`.
    pub fn bind(&mut self, portal: &Bytes, stmt: &[u8]) -> bool {
        match self.statements.get(stmt).cloned() {
            Some(cmd) => {
                self.portals.insert(portal.clone(), cmd);
                true
            }
            None => {
                self.portals.remove(portal);
                false
            }
        }
    }

    pub fn portal(&self, name: &[u8]) -> Option<&LocalCmd> {
        self.portals.get(name)
    }

    pub fn forget_portal(&mut self, name: &[u8]) -> Option<LocalCmd> {
        self.portals.remove(name)
    }
}

/// Recognises a text the proxy answers itself. `is_client_statement` tells whether a
/// `DEALLOCATE`d name is one of the client's protocol-level statements (virtual mode).
pub fn recognise(text: &[u8], is_client_statement: impl Fn(&[u8]) -> bool) -> Option<LocalCmd> {
    // Every query passes here: look at the first word before reading the whole text.
    let verb = first_word(text);
    if !LOCAL_VERBS.iter().any(|v| verb.eq_ignore_ascii_case(v)) {
        return None;
    }
    let sql = std::str::from_utf8(text).ok()?;
    if let Some(cmd) = ryw::parse_command(sql) {
        return Some(LocalCmd::Meridian(cmd));
    }
    let name = deallocate_name(sql)?;
    is_client_statement(name.as_bytes()).then(|| LocalCmd::Deallocate(Bytes::from(name)))
}

/// The first words of the statements [`recognise`] may answer.
const LOCAL_VERBS: [&[u8]; 4] = [b"show", b"set", b"reset", b"deallocate"];

/// The leading ASCII letters after leading whitespace.
fn first_word(text: &[u8]) -> &[u8] {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let rest = &text[start..];
    let len = rest
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    &rest[..len]
}

/// The name of `DEALLOCATE [PREPARE] name` (one statement; `ALL` is not a name).
fn deallocate_name(sql: &str) -> Option<String> {
    let s = sql.trim().trim_end_matches(';').trim_end();
    let mut words = s.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("prepare") {
        name = words.next()?;
    }
    if words.next().is_some() || name.eq_ignore_ascii_case("all") {
        return None;
    }
    Some(
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => name.to_lowercase(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deallocate_of_a_client_statement_is_recognised() {
        let known = |n: &[u8]| n == b"_pg3_1" || n == b"Mixed";
        assert_eq!(
            recognise(b"DEALLOCATE _pg3_1", known),
            Some(LocalCmd::Deallocate(Bytes::from_static(b"_pg3_1")))
        );
        assert_eq!(
            recognise(b"deallocate prepare \"Mixed\";", known),
            Some(LocalCmd::Deallocate(Bytes::from_static(b"Mixed")))
        );
        assert_eq!(recognise(b"DEALLOCATE other", known), None);
        assert_eq!(recognise(b"DEALLOCATE ALL", known), None);
        assert_eq!(recognise(b"\xa4 DEALLOCATE", known), None);
        assert!(matches!(
            recognise(b"SHOW meridian.min_lsn", known),
            Some(LocalCmd::Meridian(Command::Show(Setting::MinLsn)))
        ));
        assert!(matches!(
            recognise(b"\n\t set  meridian.min_lsn = default ;", known),
            Some(LocalCmd::Meridian(Command::Reset(Setting::MinLsn)))
        ));
        assert!(matches!(
            recognise(b"reset meridian.min_lsn", known),
            Some(LocalCmd::Meridian(Command::Reset(Setting::MinLsn)))
        ));
        assert_eq!(recognise(b"SELECT 'SHOW meridian.min_lsn'", known), None);
        assert_eq!(recognise(b"SHOWX meridian.min_lsn", known), None);
    }

    #[test]
    fn settings_execute_and_refuse_bad_values() {
        let mut s = RywState::default();
        let out = s
            .execute(&Command::Set(Setting::MinLsn, "0/16B3748".into()))
            .unwrap_or_default();
        assert_eq!(out, vec![wire::command_complete("SET")]);
        assert!(s.min_lsn.is_some());
        let e = s
            .execute(&Command::Set(Setting::MaxStaleness, "soon".into()))
            .unwrap_err();
        assert_eq!(e.sqlstate().as_str(), "22023");
        let e = s
            .execute(&Command::Reset(Setting::LastCommitLsn))
            .unwrap_err();
        assert_eq!(e.sqlstate().as_str(), "55P02");
        s.reset_all();
        assert!(s.min_lsn.is_none());
    }
}
