//! Classification of one parsed statement: read or write, functions, tables, effects.
//!
//! A single walk with sqlparser's `Visitor` collects what can hide anywhere in a statement:
//! function calls (projection, `WHERE`, `FROM` table functions, subqueries, CTEs), relations,
//! locking clauses, `SELECT ... INTO`, and data-modifying statements nested in CTEs. The match on
//! the top-level statement then decides the kind and the transaction and session effects. The
//! module only sees the AST; it knows nothing about the session the statement runs in.

use std::ops::ControlFlow;

use sqlparser::ast::{
    ContextModifier, CopyTarget, DiscardObject, Expr, FunctionArg, FunctionArgExpr,
    FunctionArguments, Ident, ObjectName, ObjectNamePart, Query, Reset, Select, Set, SetExpr,
    Statement, TableFactor, TransactionAccessMode, TransactionIsolationLevel, TransactionMode,
    Value, Visit, Visitor,
};

use crate::analysis::{Deallocate, PinReason, StatementInfo, StatementKind, TxEffect};

/// Session-level advisory lock functions: they hold a lock past the end of the transaction.
pub(crate) const SESSION_ADVISORY_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// System views whose content differs on a hot standby or is the primary's alone: a
/// replica has no prepared transactions, its own locks, no replication slots or senders
/// of the primary's. Reads of them go to the primary. `pg_stat_activity` is not among
/// them: it is read where reads run, so a client sees its own reads running there
/// (libpq's cancel tests watch for their `pg_sleep` that way).
pub const PRIMARY_STATE_VIEWS: &[&str] = &[
    "pg_prepared_xacts",
    "pg_locks",
    "pg_stat_replication",
    "pg_replication_slots",
    "pg_stat_replication_slots",
];

/// Settings whose value on a replica is not the session's through the proxy (a hot
/// standby is read-only; the proxy is a read-write endpoint).
const PRIMARY_STATE_SETTINGS: &[&str] = &[
    "transaction_read_only",
    "default_transaction_read_only",
    "in_hot_standby",
];

/// Classify one parsed statement.
pub(crate) fn classify(stmt: &Statement) -> StatementInfo {
    let mut c = Collector::default();
    // The collector never breaks; the result carries no information.
    let _ = stmt.visit(&mut c);

    let mut info = StatementInfo::new(StatementKind::Write, false);
    match stmt {
        Statement::Query(_) => {
            let write = c.locks || c.into.is_some() || c.nested_write;
            info.kind = if write {
                StatementKind::Write
            } else {
                StatementKind::Read
            };
            info.read_only_candidate = !write;
            if c.into == Some(true) {
                info.session.pins = Some(PinReason::TempTable);
            }
        }
        Statement::Explain {
            analyze,
            options,
            statement,
            ..
        } => {
            let analyze = *analyze
                || options.iter().flatten().any(|o| {
                    o.name.value.eq_ignore_ascii_case("analyze")
                        && o.arg.as_ref().is_none_or(is_true_option)
                });
            if analyze {
                // EXPLAIN ANALYZE runs the statement: it is whatever the statement is.
                let inner = classify(statement);
                info.kind = if inner.read_only_candidate {
                    StatementKind::Read
                } else {
                    StatementKind::Write
                };
                info.read_only_candidate = inner.read_only_candidate;
                info.session = inner.session;
                info.functions = inner.functions;
                info.tables = inner.tables;
                return info;
            }
            // Plain EXPLAIN only plans: nothing is executed, no function is called.
            info.kind = StatementKind::Read;
            info.read_only_candidate = true;
            c.functions.clear();
            c.advisory = false;
            c.session_sets.clear();
            c.opaque_session = false;
        }
        Statement::ExplainTable { .. } => {
            info.kind = StatementKind::Read;
            info.read_only_candidate = true;
        }
        Statement::Copy { to, target, .. } => {
            info.copies = true;
            let to_client = *to && matches!(target, CopyTarget::Stdout);
            let write = !to_client || c.locks || c.nested_write;
            info.kind = if write {
                StatementKind::Write
            } else {
                StatementKind::Read
            };
            info.read_only_candidate = !write;
        }
        Statement::ShowVariable { variable } => {
            utility(&mut info, true);
            let name = variable.iter().map(fold).collect::<Vec<_>>().join(".");
            info.primary_state = PRIMARY_STATE_SETTINGS.contains(&name.as_str());
        }
        Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCreate { .. } => utility(&mut info, true),
        Statement::StartTransaction { modes, .. } => {
            let read_only = transaction_may_run_on_replica(modes);
            utility(&mut info, read_only);
            info.tx = TxEffect::Begin { read_only };
        }
        Statement::Commit { chain, .. } => {
            utility(&mut info, true);
            info.tx = if *chain {
                TxEffect::Other
            } else {
                TxEffect::Commit
            };
        }
        Statement::Rollback { chain, savepoint } => {
            utility(&mut info, true);
            info.tx = match (savepoint, chain) {
                (Some(_), _) => TxEffect::Savepoint,
                (None, true) => TxEffect::Other,
                (None, false) => TxEffect::Rollback,
            };
        }
        Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => {
            utility(&mut info, true);
            info.tx = TxEffect::Savepoint;
        }
        Statement::Set(set) => {
            utility(&mut info, true);
            apply_set(set, &mut info);
        }
        Statement::Reset(reset) => {
            utility(&mut info, true);
            match &reset.reset {
                Reset::ALL => info.session.reset_all = true,
                Reset::SessionAuthorization => {
                    info.session.reset.push("session_authorization".to_owned())
                }
                Reset::ConfigurationParameter(name) => info.session.reset.push(object_name(name)),
            }
        }
        Statement::Discard { object_type } => {
            utility(&mut info, true);
            if matches!(object_type, DiscardObject::ALL) {
                info.session.reset_all = true;
                info.session.deallocate = Some(Deallocate::All);
            }
        }
        Statement::Deallocate { name, .. } => {
            utility(&mut info, true);
            info.session.deallocate = Some(
                if name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all") {
                    Deallocate::All
                } else {
                    Deallocate::Name(fold(name))
                },
            );
        }
        Statement::Fetch { .. } | Statement::Close { .. } => utility(&mut info, true),
        // A cursor outside a transaction block needs WITH HOLD; either way it is session
        // state, so DECLARE goes to the primary. Inside a read-only transaction the proxy keeps
        // the transaction's backend and this classification does not matter.
        Statement::Declare { stmts, .. } if stmts.iter().any(|d| d.hold == Some(true)) => {
            info.session.pins = Some(PinReason::HoldCursor);
        }
        Statement::Prepare { .. } => info.session.pins = Some(PinReason::SqlPrepare),
        Statement::LISTEN { .. } => info.session.pins = Some(PinReason::Listen),
        Statement::CreateTable(t) if t.temporary => info.session.pins = Some(PinReason::TempTable),
        Statement::CreateView(v) if v.temporary => info.session.pins = Some(PinReason::TempTable),
        Statement::CreateSequence {
            temporary: true, ..
        } => info.session.pins = Some(PinReason::TempTable),
        Statement::Load { .. } => info.session.pins = Some(PinReason::Other),
        Statement::CreateTable(t) if t.unlogged => info.creates_unlogged.push(last_part(&t.name)),
        Statement::AlterTable(t)
            if t.operations
                .iter()
                .any(|o| matches!(o, sqlparser::ast::AlterTableOperation::SetUnlogged)) =>
        {
            info.creates_unlogged.push(last_part(&t.name))
        }
        // An object created in the session's temporary schema, however it is spelled.
        Statement::CreateTable(t) if in_temp_schema(&t.name) => {
            info.session.pins = Some(PinReason::TempTable)
        }
        Statement::CreateView(v) if in_temp_schema(&v.name) => {
            info.session.pins = Some(PinReason::TempTable)
        }
        Statement::CreateSequence { name, .. }
        | Statement::CreateType { name, .. }
        | Statement::CreateDomain(sqlparser::ast::CreateDomain { name, .. })
        | Statement::CreateFunction(sqlparser::ast::CreateFunction { name, .. })
            if in_temp_schema(name) =>
        {
            info.session.pins = Some(PinReason::TempTable)
        }
        // DML, DDL, CALL, LOCK, NOTIFY, UNLISTEN, EXECUTE, VACUUM, ANALYZE, ...: the defaults.
        _ => {}
    }

    if info.session.pins.is_none() {
        if c.advisory {
            info.session.pins = Some(PinReason::AdvisoryLock);
        } else if c.opaque_session {
            info.session.pins = Some(PinReason::Other);
        }
    }
    info.session.set.extend(c.session_sets);
    info.creates_unlogged.extend(c.unlogged_into);
    c.tables.retain(|t| !c.cte_names.contains(t));
    info.primary_state |= c.primary_state;
    info.primary_state |= c.tables.iter().any(|t| {
        let (schema, name) = t.rsplit_once('.').unwrap_or(("pg_catalog", t));
        schema == "pg_catalog" && PRIMARY_STATE_VIEWS.contains(&name)
    });
    info.tables = c.tables;
    info.functions = c.functions;
    info
}

/// The first argument may name one of [`PRIMARY_STATE_SETTINGS`]: it is such a literal,
/// or not a literal at all.
fn names_primary_state_setting(args: &FunctionArguments) -> bool {
    let FunctionArguments::List(list) = args else {
        return true;
    };
    match list.args.first().map(literal_arg) {
        Some(Some(Value::SingleQuotedString(name))) => {
            PRIMARY_STATE_SETTINGS.contains(&name.to_ascii_lowercase().as_str())
        }
        Some(Some(Value::Placeholder(_)) | None) => true,
        Some(Some(_)) | None => false,
    }
}

/// `pg_temp.x` or `pg_temp_N.x`: the session's own temporary schema.
fn in_temp_schema(name: &ObjectName) -> bool {
    name.0.len() > 1
        && name.0.first().is_some_and(|p| {
            let schema = fold_part(p);
            schema == "pg_temp" || schema.starts_with("pg_temp_")
        })
}

fn utility(info: &mut StatementInfo, read_only_candidate: bool) {
    info.kind = StatementKind::Utility;
    info.read_only_candidate = read_only_candidate;
}

/// `READ ONLY` and not `SERIALIZABLE` (refused on a hot standby).
fn transaction_may_run_on_replica(modes: &[TransactionMode]) -> bool {
    let read_only = modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::AccessMode(TransactionAccessMode::ReadOnly)
        )
    });
    let serializable = modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::IsolationLevel(TransactionIsolationLevel::Serializable)
        )
    });
    read_only && !serializable
}

fn apply_set(set: &Set, info: &mut StatementInfo) {
    let session = &mut info.session;
    match set {
        Set::SingleAssignment {
            scope,
            variable,
            values,
            ..
        } => {
            if *scope == Some(ContextModifier::Local) {
                return;
            }
            let name = object_name(variable);
            if is_default(values) {
                session.reset.push(name);
            } else {
                session.set.push((name, join_exprs(values)));
            }
        }
        Set::MultipleAssignments { assignments } => {
            for a in assignments {
                if a.scope == Some(ContextModifier::Local) {
                    continue;
                }
                let name = object_name(&a.name);
                if is_default(std::slice::from_ref(&a.value)) {
                    session.reset.push(name);
                } else {
                    session.set.push((name, a.value.to_string()));
                }
            }
        }
        Set::SetTimeZone { local, value } => {
            if *local {
                return;
            }
            let is_keyword = matches!(value, Expr::Identifier(Ident { value: v, quote_style: None, .. })
                if v.eq_ignore_ascii_case("local") || v.eq_ignore_ascii_case("default"));
            if is_keyword {
                session.reset.push("timezone".to_owned());
            } else {
                session.set.push(("timezone".to_owned(), value.to_string()));
            }
        }
        Set::SetRole {
            context_modifier,
            role_name,
        } => {
            if *context_modifier == Some(ContextModifier::Local) {
                return;
            }
            match role_name {
                Some(role) => session.set.push(("role".to_owned(), role.to_string())),
                None => session.reset.push("role".to_owned()),
            }
        }
        Set::SetNames { charset_name, .. } => session.set.push((
            "client_encoding".to_owned(),
            quote_literal(&charset_name.value),
        )),
        Set::SetNamesDefault {} => session.reset.push("client_encoding".to_owned()),
        Set::SetTransaction {
            modes,
            snapshot,
            session: characteristics,
        } => {
            if *characteristics {
                // SET SESSION CHARACTERISTICS AS TRANSACTION ...: session defaults.
                for mode in modes {
                    session.set.push(match mode {
                        TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => {
                            ("default_transaction_read_only".to_owned(), "on".to_owned())
                        }
                        TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => {
                            ("default_transaction_read_only".to_owned(), "off".to_owned())
                        }
                        TransactionMode::IsolationLevel(level) => (
                            "default_transaction_isolation".to_owned(),
                            quote_literal(&level.to_string().to_ascii_lowercase()),
                        ),
                    });
                }
            } else if snapshot.is_none() && transaction_may_run_on_replica(modes) {
                info.tx = TxEffect::SetTransactionReadOnly;
            } else {
                info.tx = TxEffect::Other;
            }
        }
        Set::SetSessionAuthorization(param) => {
            if param.scope != ContextModifier::Local {
                session.pins = Some(PinReason::Other);
            }
        }
        Set::ParenthesizedAssignments { .. } | Set::SetSessionParam(_) => {
            session.pins = Some(PinReason::Other)
        }
    }
}

/// `SET x TO DEFAULT` / `SET x = DEFAULT`: the parser gives an unquoted identifier `DEFAULT`.
fn is_default(values: &[Expr]) -> bool {
    matches!(values, [Expr::Identifier(Ident { value, quote_style: None, .. })]
        if value.eq_ignore_ascii_case("default"))
}

fn join_exprs(values: &[Expr]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_true_option(arg: &Expr) -> bool {
    match arg {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => *b,
            Value::Number(n, _) => n != "0",
            Value::SingleQuotedString(s) => !is_false_word(s),
            _ => true,
        },
        Expr::Identifier(i) => !is_false_word(&i.value),
        _ => true,
    }
}

fn is_false_word(s: &str) -> bool {
    ["off", "false", "0", "no"]
        .iter()
        .any(|w| s.eq_ignore_ascii_case(w))
}

/// A SQL string literal with `'` doubled.
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Fold an identifier like PostgreSQL: unquoted to lower case, quoted verbatim.
fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_none() {
        ident.value.to_lowercase()
    } else {
        ident.value.clone()
    }
}

fn fold_part(part: &ObjectNamePart) -> String {
    match part {
        ObjectNamePart::Identifier(ident) => fold(ident),
        other => other.to_string().to_lowercase(),
    }
}

/// All parts, folded, joined with `.`.
fn object_name(name: &ObjectName) -> String {
    name.0.iter().map(fold_part).collect::<Vec<_>>().join(".")
}

/// The last part, folded.
fn last_part(name: &ObjectName) -> String {
    name.0.last().map(fold_part).unwrap_or_default()
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// The value of a literal positional argument.
fn literal_arg(arg: &FunctionArg) -> Option<&Value> {
    match arg {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v))) => Some(&v.value),
        _ => None,
    }
}

/// What one walk over a statement finds.
#[derive(Default)]
struct Collector {
    functions: Vec<String>,
    tables: Vec<String>,
    cte_names: Vec<String>,
    /// The next relation visited is the name of a table function, not a table.
    skip_relation: bool,
    /// A locking clause (`FOR UPDATE/SHARE`) anywhere.
    locks: bool,
    /// `SELECT ... INTO`; `Some(true)` if into a temporary table.
    into: Option<bool>,
    /// `SELECT ... INTO UNLOGGED name`.
    unlogged_into: Vec<String>,
    /// INSERT/UPDATE/DELETE/MERGE below the top-level statement (data-modifying CTEs).
    nested_write: bool,
    statements_seen: usize,
    /// A session-level advisory lock function is called.
    advisory: bool,
    /// `set_config(name, value, false)` with literal arguments.
    session_sets: Vec<(String, String)>,
    /// `set_config` with arguments the classifier cannot evaluate.
    opaque_session: bool,
    /// `current_setting` of one of [`PRIMARY_STATE_SETTINGS`], or of a name that is not
    /// a literal (a parameter: it could be one of them). `pg_is_in_recovery()` stays a
    /// read: it is how a client sees where its reads run.
    primary_state: bool,
}

impl Collector {
    fn function(&mut self, name: String) {
        if SESSION_ADVISORY_LOCKS.contains(&name.as_str()) {
            self.advisory = true;
        }
        push_unique(&mut self.functions, name);
    }

    fn set_config(&mut self, args: &FunctionArguments) {
        let FunctionArguments::List(list) = args else {
            self.opaque_session = true;
            return;
        };
        let values: Vec<Option<&Value>> = list.args.iter().map(literal_arg).collect();
        match values.as_slice() {
            [Some(Value::SingleQuotedString(name)), Some(Value::SingleQuotedString(value)), Some(is_local)] =>
            {
                let local = match is_local {
                    Value::Boolean(b) => Some(*b),
                    Value::SingleQuotedString(s) => Some(!is_false_word(s)),
                    _ => None,
                };
                match local {
                    Some(true) => {}
                    Some(false) => self
                        .session_sets
                        .push((name.to_lowercase(), quote_literal(value))),
                    None => self.opaque_session = true,
                }
            }
            _ => self.opaque_session = true,
        }
    }
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        self.statements_seen += 1;
        if self.statements_seen > 1
            && matches!(
                stmt,
                Statement::Insert(_)
                    | Statement::Update(_)
                    | Statement::Delete(_)
                    | Statement::Merge(_)
            )
        {
            self.nested_write = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            self.locks = true;
        }
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                push_unique(&mut self.cte_names, fold(&cte.alias.name));
            }
        }
        if matches!(
            *query.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ) {
            self.nested_write = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if let Some(into) = &select.into {
            self.into = Some(self.into.unwrap_or(false) || into.temporary);
            if into.unlogged {
                for target in &into.targets {
                    match target {
                        Expr::Identifier(i) => self.unlogged_into.push(fold(i)),
                        Expr::CompoundIdentifier(parts) => {
                            self.unlogged_into.extend(parts.last().map(fold))
                        }
                        _ => {}
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => {
                self.function(last_part(name));
                self.skip_relation = true;
            }
            TableFactor::Function { name, .. } => self.function(last_part(name)),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if std::mem::take(&mut self.skip_relation) {
            return ControlFlow::Continue(());
        }
        push_unique(&mut self.tables, object_name(relation));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let name = last_part(&f.name);
            if name == "set_config" {
                self.set_config(&f.args);
            }
            self.primary_state |= name == "current_setting" && names_primary_state_setting(&f.args);
            self.function(name);
        }
        ControlFlow::Continue(())
    }
}
