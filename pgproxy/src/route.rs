//! The routing decision for one statement (or one extended-protocol batch):
//! primary or replica. Pure: it sees the statement's analysis, the function
//! catalog and the session's situation, and nothing else.

use meridian_sqlroute::{Analysis, FunctionCatalog, StatementKind, TxEffect};

/// Which backend of the session a statement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Primary,
    Replica,
}

/// What the session knows when it routes a statement.
#[derive(Debug, Clone, Copy)]
pub struct SessionView {
    /// The backend of the transaction in progress, if any.
    pub in_tx: Option<Which>,
    /// The session is pinned (temp tables, locks, listeners...): primary only.
    pub pinned: bool,
    /// `default_transaction_read_only` is on for the session.
    pub read_only_session: bool,
    /// A replica exists and replica reads are enabled.
    pub replica_available: bool,
    /// A backend the session already holds, preferred for utility statements.
    pub held: Option<Which>,
}

/// Why a statement went where it went (for metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Transaction,
    Pinned,
    Hint,
    ParseFailed,
    /// Reads state only the primary has (prepared transactions, locks, read-only-ness).
    PrimaryState,
    ReadOnlyTransaction,
    WriteTransaction,
    Utility,
    Read,
    Write,
    NoReplica,
}

/// Decides where `analysis` runs.
pub fn route(analysis: &Analysis, catalog: &FunctionCatalog, s: SessionView) -> (Which, Reason) {
    if let Some(w) = s.in_tx {
        return (w, Reason::Transaction);
    }
    if s.pinned {
        return (Which::Primary, Reason::Pinned);
    }
    if analysis.hint.primary {
        return (Which::Primary, Reason::Hint);
    }
    if !analysis.parsed {
        return (Which::Primary, Reason::ParseFailed);
    }
    if analysis.needs_primary() {
        return (Which::Primary, Reason::PrimaryState);
    }
    let replica = |reason| {
        if s.replica_available {
            (Which::Replica, reason)
        } else {
            (Which::Primary, Reason::NoReplica)
        }
    };
    if let TxEffect::Begin { read_only } = analysis.tx_effect() {
        return if read_only || s.read_only_session {
            replica(Reason::ReadOnlyTransaction)
        } else {
            (Which::Primary, Reason::WriteTransaction)
        };
    }
    if !analysis.statements.is_empty()
        && analysis
            .statements
            .iter()
            .all(|st| st.kind == StatementKind::Utility && st.tx == TxEffect::None)
    {
        return match s.held {
            Some(w) => (w, Reason::Utility),
            None => replica(Reason::Utility),
        };
    }
    if s.read_only_session || analysis.is_read(catalog) {
        return replica(Reason::Read);
    }
    (Which::Primary, Reason::Write)
}

/// Where a transaction whose `BEGIN` was deferred runs, decided by its first
/// statement: a replica if the transaction is read only (`BEGIN READ ONLY`, a
/// read-only session, or `SET TRANSACTION READ ONLY` first), else the primary.
pub fn route_deferred_begin(begin_read_only: bool, first: &Analysis, s: SessionView) -> Which {
    let read_only = begin_read_only
        || s.read_only_session
        || first
            .statements
            .first()
            .is_some_and(|st| st.tx == TxEffect::SetTransactionReadOnly);
    if read_only && s.replica_available && !s.pinned {
        Which::Replica
    } else {
        Which::Primary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_sqlroute::Classifier;

    fn view() -> SessionView {
        SessionView {
            in_tx: None,
            pinned: false,
            read_only_session: false,
            replica_available: true,
            held: None,
        }
    }

    fn go(sql: &str, s: SessionView) -> Which {
        let c = Classifier::new(16);
        route(
            &c.analyze(sql),
            &FunctionCatalog::with_builtin_defaults(),
            s,
        )
        .0
    }

    #[test]
    fn reads_and_writes() {
        assert_eq!(go("SELECT 1", view()), Which::Replica);
        assert_eq!(go("SELECT lower('A')", view()), Which::Replica);
        assert_eq!(go("INSERT INTO t VALUES (1)", view()), Which::Primary);
        assert_eq!(go("SELECT nextval('s')", view()), Which::Primary);
        assert_eq!(
            go("/* meridian:primary */ SELECT 1", view()),
            Which::Primary
        );
    }

    #[test]
    fn transactions() {
        assert_eq!(go("BEGIN", view()), Which::Primary);
        assert_eq!(go("BEGIN READ ONLY", view()), Which::Replica);
        let ro = SessionView {
            read_only_session: true,
            ..view()
        };
        assert_eq!(go("BEGIN", ro), Which::Replica);
        let tx = SessionView {
            in_tx: Some(Which::Primary),
            ..view()
        };
        assert_eq!(go("SELECT 1", tx), Which::Primary);
    }

    #[test]
    fn deferred_begin_follows_the_first_statement() {
        let c = Classifier::new(16);
        let ro = c.analyze("SET TRANSACTION READ ONLY");
        let read = c.analyze("SELECT 1");
        assert_eq!(route_deferred_begin(false, &ro, view()), Which::Replica);
        assert_eq!(route_deferred_begin(false, &read, view()), Which::Primary);
        assert_eq!(route_deferred_begin(true, &read, view()), Which::Replica);
        let pinned = SessionView {
            pinned: true,
            ..view()
        };
        assert_eq!(route_deferred_begin(true, &read, pinned), Which::Primary);
        let none = SessionView {
            replica_available: false,
            ..view()
        };
        assert_eq!(route_deferred_begin(false, &ro, none), Which::Primary);
    }

    #[test]
    fn pinned_and_no_replica() {
        let pinned = SessionView {
            pinned: true,
            ..view()
        };
        assert_eq!(go("SELECT 1", pinned), Which::Primary);
        let none = SessionView {
            replica_available: false,
            ..view()
        };
        assert_eq!(go("SELECT 1", none), Which::Primary);
    }

    #[test]
    fn primary_state_goes_to_the_primary() {
        assert_eq!(
            go("SELECT gid FROM pg_prepared_xacts", view()),
            Which::Primary
        );
        assert_eq!(
            go("SELECT count(*) FROM pg_catalog.pg_locks", view()),
            Which::Primary
        );
        // Activity is read where reads run: a client finds its own read query there.
        assert_eq!(
            go("SELECT count(*) FROM pg_catalog.pg_stat_activity", view()),
            Which::Replica
        );
        assert_eq!(go("SHOW transaction_read_only", view()), Which::Primary);
        assert_eq!(go("SHOW search_path", view()), Which::Replica);
        // A user table of the same name is not a system view.
        assert_eq!(go("SELECT * FROM app.pg_locks", view()), Which::Replica);
        // Inside a read-only transaction on a replica, it stays there.
        let tx = SessionView {
            in_tx: Some(Which::Replica),
            ..view()
        };
        assert_eq!(go("SHOW transaction_read_only", tx), Which::Replica);
    }

    #[test]
    fn utility_runs_where_the_session_is() {
        let held = SessionView {
            held: Some(Which::Primary),
            ..view()
        };
        assert_eq!(go("SET search_path = a", held), Which::Primary);
        assert_eq!(go("SET search_path = a", view()), Which::Replica);
    }
}
