//! Which functions may run on a replica: the function catalog learned from the primary.
//!
//! PostgreSQL marks every function `immutable`, `stable` or `volatile` (`pg_proc.provolatile`) and
//! enforces that non-volatile functions do not modify the database, so "immutable or stable" is a
//! sound test for "does not write". Volatile functions are unsafe by default (`nextval`,
//! `set_config`, `pg_advisory_lock`, any plpgsql function left at the default volatility), except
//! for a short built-in list of volatile functions that only read or wait ([`VOLATILE_READ_SAFE`])
//! and names the operator adds with [`FunctionCatalog::add_read_safe`]; two stable functions that
//! assign a transaction id ([`STABLE_PRIMARY_ONLY`]) never run there. SQL constructs that look
//! like calls but are not in `pg_proc` (`coalesce`, `current_user`, ...) are always safe.
//!
//! Limits: functions are known by name only (the last path component), so the catalog keeps the
//! worst volatility over all overloads and schemas of a name; a function mislabelled `stable` by
//! its author is trusted; functions called inside views or other functions are not seen.

use std::collections::{HashMap, HashSet};

/// Volatility class of a function, ordered from safest to least safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Volatility {
    /// Same result for the same arguments forever (`provolatile = 'i'`).
    Immutable,
    /// Same result within one statement, no writes (`'s'`).
    Stable,
    /// May do anything (`'v'`, and any unknown code).
    Volatile,
}

impl Volatility {
    /// From `pg_proc.provolatile`; anything unknown is treated as volatile.
    pub fn from_provolatile(code: char) -> Self {
        match code {
            'i' => Volatility::Immutable,
            's' => Volatility::Stable,
            _ => Volatility::Volatile,
        }
    }
}

/// Volatile functions that never write and behave the same on a hot standby: randomness, clocks,
/// sleeping, replication status. `txid_current_if_assigned` and `pg_current_xact_id_if_assigned`
/// are deliberately absent (they answer about the primary's transaction), as are `currval` and
/// `lastval` (they depend on the session that called `nextval`).
pub const VOLATILE_READ_SAFE: &[&str] = &[
    "random",
    "random_normal",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_stat_get_activity",
];

/// Functions marked `stable` that still cannot run on a hot standby: they assign the
/// transaction an id ("cannot execute txid_current() during recovery"). Never read-safe.
pub const STABLE_PRIMARY_ONLY: &[&str] = &["txid_current", "pg_current_xact_id"];

/// SQL syntax that the parser reports as a function call but that is not a `pg_proc` function,
/// so the catalog never lists it. All of it is read-only.
pub const SQL_SYNTAX_FUNCTIONS: &[&str] = &[
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "row",
    "grouping",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtime",
    "localtimestamp",
    "current_user",
    "current_role",
    "session_user",
    "user",
    "system_user",
    "current_catalog",
    "current_schema",
];

/// Common immutable functions, known before the first catalog refresh.
const BUILTIN_IMMUTABLE: &[&str] = &[
    "lower",
    "upper",
    "initcap",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "substring",
    "strpos",
    "position",
    "replace",
    "split_part",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "lpad",
    "rpad",
    "left",
    "right",
    "repeat",
    "reverse",
    "md5",
    "sha256",
    "encode",
    "decode",
    "chr",
    "ascii",
    "abs",
    "round",
    "floor",
    "ceil",
    "ceiling",
    "trunc",
    "mod",
    "power",
    "sqrt",
    "exp",
    "ln",
    "log",
    "sign",
    "div",
    "width_bucket",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "string_to_array",
    "array_length",
    "array_upper",
    "array_lower",
    "array_position",
    "array_positions",
    "array_remove",
    "array_append",
    "array_prepend",
    "array_cat",
    "cardinality",
    "unnest",
    "generate_series",
    "generate_subscripts",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "jsonb_set",
    "jsonb_insert",
    "jsonb_strip_nulls",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "json_extract_path",
    "json_extract_path_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_array_elements",
    "json_array_elements_text",
    "jsonb_array_length",
    "json_array_length",
    "jsonb_each",
    "jsonb_each_text",
    "json_each",
    "json_each_text",
    "jsonb_object_keys",
    "json_object_keys",
    "jsonb_typeof",
    "json_typeof",
    "jsonb_build_object",
    "jsonb_build_array",
    "jsonb_pretty",
    "jsonb_path_query",
    "jsonb_path_exists",
    "to_hex",
    "date_part",
    "make_date",
    "make_time",
    "make_interval",
    "isfinite",
    "num_nonnulls",
    "num_nulls",
    "overlay",
];

/// Common stable functions (and aggregates and window functions, which are immutable or stable
/// depending on their state functions), known before the first catalog refresh.
const BUILTIN_STABLE: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "current_setting",
    "current_database",
    "current_schemas",
    "version",
    "pg_backend_pid",
    "inet_server_addr",
    "inet_server_port",
    "inet_client_addr",
    "inet_client_port",
    "pg_postmaster_start_time",
    "pg_typeof",
    "format",
    "format_type",
    "concat",
    "concat_ws",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "date_trunc",
    "age",
    "timezone",
    "extract",
    "to_json",
    "to_jsonb",
    "row_to_json",
    "array_to_json",
    "json_build_object",
    "json_build_array",
    "array_to_string",
    "to_regclass",
    "to_regtype",
    "to_regproc",
    "has_table_privilege",
    "has_schema_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "pg_has_role",
    "pg_table_is_visible",
    "pg_get_userbyid",
    "obj_description",
    "col_description",
    "pg_get_indexdef",
    "pg_get_viewdef",
    "pg_get_constraintdef",
    "pg_get_expr",
    "pg_encoding_to_char",
    "to_tsvector",
    "to_tsquery",
    "plainto_tsquery",
    "phraseto_tsquery",
    "websearch_to_tsquery",
    "ts_rank",
    "ts_headline",
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    "txid_current_snapshot",
    "pg_current_snapshot",
    "pg_size_pretty",
];

/// Function name → worst volatility over its overloads, plus names declared read-safe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionCatalog {
    volatility: HashMap<String, Volatility>,
    extra_read_safe: HashSet<String>,
}

impl FunctionCatalog {
    /// An empty catalog: only [`SQL_SYNTAX_FUNCTIONS`] and [`VOLATILE_READ_SAFE`] are safe.
    pub fn new() -> Self {
        Self::default()
    }

    /// A catalog from `(proname, provolatile)` rows, e.g.
    /// `SELECT proname, provolatile FROM pg_proc`. Names are kept verbatim (as `pg_proc` stores
    /// them); overloads collapse to the least safe volatility.
    pub fn from_rows(rows: impl IntoIterator<Item = (String, char)>) -> Self {
        let mut catalog = Self::new();
        for (name, code) in rows {
            catalog.insert(name, Volatility::from_provolatile(code));
        }
        catalog
    }

    /// A small built-in list of common immutable and stable functions (`now`, `lower`, `count`,
    /// ...) so routing works before the first catalog refresh.
    pub fn with_builtin_defaults() -> Self {
        let mut catalog = Self::new();
        for name in BUILTIN_IMMUTABLE {
            catalog.insert((*name).to_owned(), Volatility::Immutable);
        }
        for name in BUILTIN_STABLE {
            catalog.insert((*name).to_owned(), Volatility::Stable);
        }
        catalog
    }

    /// Record `name` with `volatility`, keeping the least safe class seen for the name.
    pub fn insert(&mut self, name: String, volatility: Volatility) {
        self.volatility
            .entry(name)
            .and_modify(|v| *v = (*v).max(volatility))
            .or_insert(volatility);
    }

    /// The recorded volatility of `name`, if the catalog knows it.
    pub fn volatility(&self, name: &str) -> Option<Volatility> {
        self.volatility.get(name).copied()
    }

    /// Number of distinct function names with a known volatility.
    pub fn len(&self) -> usize {
        self.volatility.len()
    }

    /// `true` when no function volatility is known.
    pub fn is_empty(&self) -> bool {
        self.volatility.is_empty()
    }

    /// May a call to `name` run on a replica? Immutable or stable functions (but not
    /// [`STABLE_PRIMARY_ONLY`]), SQL syntax that looks like a call, the built-in allow-list of
    /// read-only volatile functions, and names added by the operator; unknown names are not safe.
    pub fn is_read_safe(&self, name: &str) -> bool {
        if STABLE_PRIMARY_ONLY.contains(&name) {
            return false;
        }
        SQL_SYNTAX_FUNCTIONS.contains(&name)
            || VOLATILE_READ_SAFE.contains(&name)
            || self.extra_read_safe.contains(name)
            || matches!(
                self.volatility.get(name),
                Some(Volatility::Immutable | Volatility::Stable)
            )
    }

    /// Declare functions read-safe whatever their volatility (operator configuration, e.g. a
    /// volatile reporting function that only reads). Names are matched verbatim.
    pub fn add_read_safe(&mut self, names: impl IntoIterator<Item = String>) {
        self.extra_read_safe.extend(names);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_volatility_over_overloads_wins() {
        let cat = FunctionCatalog::from_rows([
            ("f".to_owned(), 'i'),
            ("f".to_owned(), 'v'),
            ("f".to_owned(), 's'),
            ("g".to_owned(), 's'),
            ("g".to_owned(), 'i'),
        ]);
        assert_eq!(cat.volatility("f"), Some(Volatility::Volatile));
        assert_eq!(cat.volatility("g"), Some(Volatility::Stable));
        assert!(!cat.is_read_safe("f"));
        assert!(cat.is_read_safe("g"));
        assert_eq!(cat.len(), 2);
    }

    #[test]
    fn unknown_and_volatile_are_unsafe() {
        let cat = FunctionCatalog::new();
        assert!(cat.is_empty());
        assert!(!cat.is_read_safe("lower"));
        assert!(!cat.is_read_safe("nextval"));
        let cat =
            FunctionCatalog::from_rows([("nextval".to_owned(), 'v'), ("odd".to_owned(), 'x')]);
        assert!(!cat.is_read_safe("nextval"));
        assert_eq!(cat.volatility("odd"), Some(Volatility::Volatile));
    }

    #[test]
    fn allow_lists_apply_to_every_catalog() {
        let cat = FunctionCatalog::from_rows([("random".to_owned(), 'v')]);
        assert!(cat.is_read_safe("random"));
        assert!(cat.is_read_safe("coalesce"));
        assert!(cat.is_read_safe("pg_is_in_recovery"));
        assert!(!cat.is_read_safe("txid_current_if_assigned"));
        assert!(!cat.is_read_safe("pg_advisory_lock"));
    }

    #[test]
    fn builtin_defaults_cover_common_functions() {
        let cat = FunctionCatalog::with_builtin_defaults();
        for f in [
            "now",
            "lower",
            "upper",
            "count",
            "sum",
            "coalesce",
            "date_trunc",
        ] {
            assert!(cat.is_read_safe(f), "{f}");
        }
        for f in [
            "nextval",
            "setval",
            "set_config",
            "pg_advisory_lock",
            "my_func",
        ] {
            assert!(!cat.is_read_safe(f), "{f}");
        }
    }

    #[test]
    fn stable_functions_that_assign_a_transaction_id_go_to_the_primary() {
        let mut cat = FunctionCatalog::from_rows([
            ("txid_current".to_owned(), 's'),
            ("pg_current_xact_id".to_owned(), 's'),
            ("txid_current_snapshot".to_owned(), 's'),
        ]);
        assert!(!cat.is_read_safe("txid_current"));
        assert!(!cat.is_read_safe("pg_current_xact_id"));
        assert!(cat.is_read_safe("txid_current_snapshot"));
        cat.add_read_safe(["txid_current".to_owned()]);
        assert!(
            !cat.is_read_safe("txid_current"),
            "fails on a standby whatever the config"
        );
    }

    #[test]
    fn operator_additions() {
        let mut cat = FunctionCatalog::from_rows([("report".to_owned(), 'v')]);
        assert!(!cat.is_read_safe("report"));
        cat.add_read_safe(["report".to_owned()]);
        assert!(cat.is_read_safe("report"));
        assert_eq!(cat.volatility("report"), Some(Volatility::Volatile));
    }
}
