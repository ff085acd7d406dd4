//! Session parameters: what the client set with session-level `SET` (and its startup
//! parameters), to replay on every backend the session uses.
//!
//! A `SET` takes effect for the session only when its transaction commits (an explicit
//! one, or the implicit transaction of a multi-statement query or an extended batch):
//! the statements that completed are kept aside ([`Params::stage`]) and applied or
//! dropped when the transaction ends ([`Params::settle`]). The replay
//! ([`Params::prelude`]) is one multi-statement query, sent in front of the client's
//! statement (no round trip of its own) only when the backend's applied parameters
//! differ, compared by a hash of the whole list. A backend that served a session with
//! other parameters is first brought back to its defaults, role and session
//! authorization included (`RESET ALL` alone leaves `SET ROLE` in place).
//!
//! Limits: `ROLLBACK TO SAVEPOINT` does not undo a `SET` made after the savepoint here.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use meridian_sqlroute::{Analysis, TxEffect};

use super::backend_state::BackendState;

/// What clears a backend's session parameters, role and session authorization.
pub const RESET_SQL: &str = "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;";

#[derive(Debug, Default)]
pub struct Params {
    list: Vec<(String, String)>,
    hash: u64,
    /// Statements that completed in the transaction still open.
    staged: Vec<Arc<Analysis>>,
}

/// A reset of the whole session (`RESET ALL`, `DISCARD ALL`) took effect.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub reset_all: bool,
}

impl Params {
    /// `(name, SQL value)` in the order they were first set.
    pub fn list(&self) -> &[(String, String)] {
        &self.list
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Sets a parameter now (startup parameters, which are not transactional).
    pub fn set(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        match self.list.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 = value.to_owned(),
            None => self.list.push((name, value.to_owned())),
        }
        self.rehash();
    }

    fn reset(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.list.retain(|(n, _)| *n != name);
        self.rehash();
    }

    fn reset_all(&mut self) {
        self.list.clear();
        self.rehash();
    }

    fn rehash(&mut self) {
        self.hash = if self.list.is_empty() {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.list.hash(&mut h);
            h.finish() | 1
        };
    }

    /// `default_transaction_read_only` is on.
    pub fn read_only(&self) -> bool {
        self.list
            .iter()
            .find(|(n, _)| n == "default_transaction_read_only")
            .is_some_and(|(_, v)| {
                let v = v.trim_matches('\'').to_ascii_lowercase();
                matches!(v.as_str(), "on" | "true" | "1" | "yes" | "t" | "y")
            })
    }

    /// A statement of the open transaction completed.
    pub fn stage(&mut self, analysis: Arc<Analysis>) {
        let has_effect = analysis.statements.iter().any(|s| {
            s.session.reset_all || !s.session.set.is_empty() || !s.session.reset.is_empty()
        }) || analysis.tx_effect() == TxEffect::Rollback;
        if has_effect {
            self.staged.push(analysis);
        }
    }

    /// The transaction ended (`committed`: its effects stand). Applies or drops the staged
    /// statements; `backend` (the one the statements ran on) then holds these parameters.
    pub fn settle(&mut self, committed: bool, backend: Option<&mut BackendState>) -> Settled {
        let staged = std::mem::take(&mut self.staged);
        let rolled_back = staged.iter().any(|a| a.tx_effect() == TxEffect::Rollback);
        let mut settled = Settled::default();
        if !committed || rolled_back || staged.is_empty() {
            return settled;
        }
        for a in &staged {
            for st in &a.statements {
                let eff = &st.session;
                if eff.reset_all {
                    self.reset_all();
                    settled.reset_all = true;
                }
                for name in &eff.reset {
                    self.reset(name);
                }
                for (name, value) in &eff.set {
                    self.set(name, value);
                }
            }
        }
        if let Some(b) = backend {
            b.params_hash = self.hash;
        }
        settled
    }

    /// SQL that brings backend `b` to these parameters, if anything is needed; `b` is
    /// marked as holding them.
    pub fn prelude(&self, b: &mut BackendState) -> Option<String> {
        if b.params_hash == self.hash {
            return None;
        }
        let mut sql = String::new();
        if b.params_hash != 0 {
            sql.push_str(RESET_SQL);
        }
        for (name, value) in &self.list {
            sql.push_str("SET ");
            sql.push_str(name);
            sql.push_str(" = ");
            sql.push_str(value);
            sql.push(';');
        }
        b.params_hash = self.hash;
        (!sql.is_empty()).then_some(sql)
    }
}

/// A SQL string literal of `v` that means `v` whatever `standard_conforming_strings`
/// says: with a backslash in it, an escape string (`E'...'`, backslashes doubled), so a
/// client value can never end the literal early in the proxy's own SET.
pub fn quote_literal(v: &str) -> String {
    if v.contains('\\') {
        format!("E'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", v.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_sqlroute::Classifier;

    fn a(sql: &str) -> Arc<Analysis> {
        Classifier::new(0).analyze(sql)
    }

    #[test]
    fn a_set_counts_only_once_its_transaction_commits() {
        let mut p = Params::default();
        p.stage(a("SET search_path = app"));
        assert!(p.list().is_empty());
        p.settle(false, None);
        assert!(p.list().is_empty(), "rolled back");
        p.stage(a("SET search_path = app"));
        p.stage(a("ROLLBACK"));
        p.settle(true, None);
        assert!(p.list().is_empty(), "ROLLBACK ends it");
        p.stage(a("SET search_path = app"));
        let mut b = BackendState::new(1, vec![]);
        p.settle(true, Some(&mut b));
        assert_eq!(p.list(), &[("search_path".to_owned(), "app".to_owned())]);
        assert_eq!(b.params_hash, p.hash());
        p.stage(a("RESET ALL"));
        assert!(p.settle(true, None).reset_all);
        assert!(p.list().is_empty());
    }

    #[test]
    fn the_prelude_resets_role_and_authorization_of_a_used_backend() {
        let mut p = Params::default();
        p.set("application_name", &quote_literal("it's"));
        let mut fresh = BackendState::new(1, vec![]);
        assert_eq!(
            p.prelude(&mut fresh).as_deref(),
            Some("SET application_name = 'it''s';")
        );
        assert_eq!(p.prelude(&mut fresh), None, "already applied");
        let mut used = BackendState::new(2, vec![]);
        used.params_hash = 42;
        let sql = p.prelude(&mut used).unwrap_or_default();
        assert!(sql.starts_with(RESET_SQL), "{sql}");
        let mut dirty_default = BackendState::new(3, vec![]);
        dirty_default.params_hash = 42;
        assert_eq!(
            Params::default().prelude(&mut dirty_default).as_deref(),
            Some(RESET_SQL)
        );
    }

    #[test]
    fn literals_hold_quotes_and_backslashes_whatever_the_server_setting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            quote_literal(r"a\'; DROP TABLE t; --"),
            r"E'a\\''; DROP TABLE t; --'"
        );
    }

    #[test]
    fn read_only_session_follows_the_parameter() {
        let mut p = Params::default();
        assert!(!p.read_only());
        p.set("default_transaction_read_only", "on");
        assert!(p.read_only());
        p.set("default_transaction_read_only", "'off'");
        assert!(!p.read_only());
    }
}
