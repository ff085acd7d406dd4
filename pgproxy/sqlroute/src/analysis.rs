//! The result types of statement classification and the routing decision built on them.
//!
//! An [`Analysis`] describes one query string as a client sent it (one simple-query text or one
//! Parse message); it holds one [`StatementInfo`] per statement. The types are plain data so the
//! proxy can keep them in an `Arc` and share them between sessions. The only decision made here is
//! [`Analysis::is_read`]: whether the query, taken in isolation, may run on a replica. Transaction
//! and session context (inside `BEGIN READ ONLY`, pinned sessions, ...) is the proxy's business.

use std::time::Duration;

use crate::catalog::FunctionCatalog;

/// Everything the proxy needs to know about one query string.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// `false` when the parser failed on at least one statement. The proxy routes such a query to
    /// the primary and counts it in a metric. Statements that could not be parsed are still listed,
    /// with a conservative [`StatementInfo`] derived from their leading keywords.
    pub parsed: bool,
    /// One entry per statement, in order; empty for an empty query (only blanks, comments or `;`).
    pub statements: Vec<StatementInfo>,
    /// Routing hints from the comments at the start of the query.
    pub hint: Hints,
}

/// What one statement does.
#[derive(Debug, Clone, PartialEq)]
pub struct StatementInfo {
    /// Coarse class of the statement.
    pub kind: StatementKind,
    /// `true` if the statement may run on a replica provided every function in `functions` is
    /// read-safe. For [`StatementKind::Utility`] statements this is `true` unless the statement
    /// starts a read-write transaction.
    pub read_only_candidate: bool,
    /// Functions called anywhere in the statement, named by the last path component, folded like
    /// PostgreSQL folds identifiers (unquoted: lower case; quoted: verbatim); deduplicated.
    pub functions: Vec<String>,
    /// Relations read or written, as written in the statement (schema-qualified when the
    /// statement qualifies them), folded like `functions`; CTE names are left out; deduplicated.
    pub tables: Vec<String>,
    /// Effect on the transaction state.
    pub tx: TxEffect,
    /// Effect on the session state.
    pub session: SessionEffect,
    /// Reads state a replica does not have or has its own of, so only the primary can
    /// answer it as a client of the cluster expects: views of prepared transactions,
    /// locks, activity and replication ([`crate::PRIMARY_STATE_VIEWS`]), and whether the
    /// session is read-only (`SHOW transaction_read_only`).
    pub primary_state: bool,
    /// Unlogged relations the statement creates (`CREATE UNLOGGED TABLE`, `ALTER TABLE
    /// ... SET UNLOGGED`, `SELECT ... INTO UNLOGGED`), by name (last part, folded): a hot
    /// standby cannot read them.
    pub creates_unlogged: Vec<String>,
    /// A `COPY` (to or from the client): no message may be pipelined behind it.
    pub copies: bool,
}

/// Coarse class of a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// Reads data only: `SELECT`, `WITH` without data-modifying CTEs, `VALUES`, `TABLE`,
    /// `EXPLAIN` (without `ANALYZE` of a write), `COPY ... TO STDOUT`.
    Read,
    /// Anything that writes or may write, or must run on the primary: DML, DDL, `SELECT ... INTO`,
    /// locking reads, `COPY FROM`, `CALL`, `DO`, `LOCK`, `LISTEN`/`NOTIFY`/`UNLISTEN`, SQL-level
    /// `PREPARE`/`EXECUTE`, `DECLARE CURSOR`, `VACUUM`, `ANALYZE`, and every unparsed statement.
    Write,
    /// Session and transaction control that runs wherever the session's current backend is:
    /// `SET`, `RESET`, `SHOW`, `BEGIN`/`START TRANSACTION`, `COMMIT`, `ROLLBACK`, savepoints,
    /// `DISCARD`, `DEALLOCATE`, `FETCH`, `CLOSE`.
    Utility,
}

/// Effect of a statement on the transaction state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxEffect {
    /// No transaction control.
    None,
    /// `BEGIN` / `START TRANSACTION`. `read_only` is `true` when the transaction may run on a hot
    /// standby as a whole: `READ ONLY` and not `SERIALIZABLE` (PostgreSQL refuses serializable
    /// transactions on a standby, so such a transaction is reported with `read_only: false`).
    Begin {
        /// The transaction may run on a replica.
        read_only: bool,
    },
    /// `SET TRANSACTION READ ONLY` (not combined with `SERIALIZABLE`).
    SetTransactionReadOnly,
    /// `COMMIT` / `END`.
    Commit,
    /// `ROLLBACK` / `ABORT` (not `ROLLBACK TO SAVEPOINT`, which is [`TxEffect::Savepoint`]).
    Rollback,
    /// `SAVEPOINT`, `RELEASE SAVEPOINT`, `ROLLBACK TO SAVEPOINT`.
    Savepoint,
    /// Other transaction control whose outcome the proxy should read from the backend's
    /// ReadyForQuery status: `COMMIT/ROLLBACK AND CHAIN`, `PREPARE TRANSACTION`, any other
    /// `SET TRANSACTION`.
    Other,
}

/// Effect of a statement on the session state (what must be replayed or pinned).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionEffect {
    /// Session-level settings, `(name, value)`: the value is SQL text to replay as
    /// `SET name = value`. Not `SET LOCAL` and not `SET TRANSACTION` (transaction-scoped).
    pub set: Vec<(String, String)>,
    /// `RESET name` (and `SET name TO DEFAULT`, `SET ROLE NONE`).
    pub reset: Vec<String>,
    /// `RESET ALL` / `DISCARD ALL`.
    pub reset_all: bool,
    /// The statement creates state that pins the client to its backend.
    pub pins: Option<PinReason>,
    /// `DEALLOCATE` (and `DISCARD ALL`, which deallocates everything).
    pub deallocate: Option<Deallocate>,
}

/// What a `DEALLOCATE` drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deallocate {
    All,
    /// One statement, by name (folded like an identifier).
    Name(String),
}

/// Why a statement pins the client to its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// `CREATE TEMP TABLE` / `VIEW` / `SEQUENCE`, `SELECT ... INTO TEMP`.
    TempTable,
    /// `LISTEN`.
    Listen,
    /// A session-level advisory lock (`pg_advisory_lock`, `pg_try_advisory_lock`, and their
    /// `_shared` variants; not the `_xact_` ones, which end with the transaction).
    AdvisoryLock,
    /// `DECLARE ... WITH HOLD`.
    HoldCursor,
    /// SQL-level `PREPARE`.
    SqlPrepare,
    /// State the classifier cannot track: `SET SESSION AUTHORIZATION`, `set_config()` with
    /// non-literal arguments, `LOAD`, `DO` and other unparsed statements that may create state.
    Other,
}

/// Routing hints written as comments at the very start of a query.
///
/// `/* meridian:primary */`, `/* meridian:cache ttl=30s */`, `/* meridian:min_lsn=0/16B3748 */`;
/// several may be combined in one comment or given in successive comments (`--` comments too).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hints {
    /// Force the primary.
    pub primary: bool,
    /// Make a read cacheable for this long.
    pub cache_ttl: Option<Duration>,
    /// Serve from a replica only once it has replayed this LSN (`X/Y`, hexadecimal).
    pub min_lsn: Option<String>,
}

impl StatementInfo {
    /// A statement of `kind` with no functions, tables or effects.
    pub fn new(kind: StatementKind, read_only_candidate: bool) -> Self {
        Self {
            kind,
            read_only_candidate,
            functions: Vec::new(),
            tables: Vec::new(),
            tx: TxEffect::None,
            session: SessionEffect::default(),
            primary_state: false,
            creates_unlogged: Vec::new(),
            copies: false,
        }
    }
}

impl Analysis {
    /// The routing decision for this query in isolation: `true` if it parsed, every statement is
    /// a read candidate, every called function is read-safe in `catalog`, and no hint forces the
    /// primary. An empty query is a read (it touches nothing).
    pub fn is_read(&self, catalog: &FunctionCatalog) -> bool {
        self.parsed
            && !self.hint.primary
            && self.statements.iter().all(|s| {
                s.read_only_candidate
                    && !s.primary_state
                    && s.functions.iter().all(|f| catalog.is_read_safe(f))
            })
    }

    /// The effect of the last statement that has a transaction effect, or [`TxEffect::None`].
    pub fn tx_effect(&self) -> TxEffect {
        self.statements
            .iter()
            .rev()
            .map(|s| s.tx)
            .find(|tx| *tx != TxEffect::None)
            .unwrap_or(TxEffect::None)
    }

    /// Some statement is a `COPY` (or might be: an unparsed text naming COPY).
    pub fn may_copy(&self) -> bool {
        self.statements.iter().any(|s| s.copies)
    }

    /// Some statement reads state only the primary has (see [`StatementInfo::primary_state`]).
    pub fn needs_primary(&self) -> bool {
        self.statements.iter().any(|s| s.primary_state)
    }

    /// The first pin reason among the statements, if any statement pins the session.
    pub fn pins(&self) -> Option<PinReason> {
        self.statements.iter().find_map(|s| s.session.pins)
    }

    /// Every relation named by any statement, deduplicated, in order of appearance.
    pub fn tables(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for t in self.statements.iter().flat_map(|s| s.tables.iter()) {
            if !out.contains(&t.as_str()) {
                out.push(t);
            }
        }
        out
    }
}
