//! What to do when sqlparser rejects a query: small token-level pre-checks, not a SQL parser.
//!
//! The input is tokenized with sqlparser's own PostgreSQL tokenizer (so string literals,
//! dollar-quoted bodies, quoted identifiers and comments are never mistaken for keywords) and:
//!
//! 1. Known gaps are normalized and the text parsed again: `FOR NO KEY UPDATE` becomes
//!    `FOR UPDATE` and `FOR KEY SHARE` becomes `FOR SHARE` (a stronger lock of the same
//!    routing class: either is a write), and a statement `TABLE name` becomes
//!    `SELECT * FROM name` (its definition in PostgreSQL).
//! 2. Otherwise the text is split at top-level `;` and each statement parsed on its own, so one
//!    unsupported statement (`DO $$...$$`, `ALTER SYSTEM`, `CHECKPOINT`, ...) does not hide the
//!    transaction control or session changes of its neighbours. Texts with a `BEGIN ATOMIC`
//!    function body are not split (its inner `;` are not statement ends).
//! 3. A statement that still fails gets a conservative [`StatementInfo`] from its leading
//!    keywords: a write; a transaction effect for `BEGIN`/`COMMIT`/`ABORT`/...; a session pin
//!    when it may create session state the classifier cannot track (`DO`, `SET`, `CALL`, `LOAD`,
//!    unknown commands, advisory lock or `set_config` calls, `TEMP` objects).

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use crate::analysis::{PinReason, StatementInfo, StatementKind, TxEffect};
use crate::classify::{classify, SESSION_ADVISORY_LOCKS};

/// Leading keywords of statements that cannot create session state the proxy must track.
const NO_SESSION_STATE: &[&str] = &[
    "SELECT",
    "WITH",
    "VALUES",
    "TABLE",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "ALTER",
    "CREATE",
    "DROP",
    "GRANT",
    "REVOKE",
    "COMMENT",
    "SECURITY",
    "CLUSTER",
    "REINDEX",
    "CHECKPOINT",
    "VACUUM",
    "ANALYZE",
    "ANALYSE",
    "REFRESH",
    "TRUNCATE",
    "COPY",
    "IMPORT",
    "LOCK",
    "NOTIFY",
    "UNLISTEN",
    "EXPLAIN",
    "BEGIN",
    "START",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "SAVEPOINT",
    "RELEASE",
    "FETCH",
    "MOVE",
    "CLOSE",
    "SHOW",
    "DEALLOCATE",
    "DISCARD",
    "REASSIGN",
];

/// Analyse `sql` after sqlparser rejected it as a whole: `(parsed, statements)`.
pub(crate) fn analyze_unparsed(sql: &str) -> (bool, Vec<StatementInfo>) {
    let dialect = PostgreSqlDialect {};
    let tokens = match Tokenizer::new(&dialect, sql)
        .with_unescape(false)
        .tokenize()
    {
        Ok(tokens) => tokens,
        // Unterminated string or comment, invalid character, ...: judge by the first words.
        Err(_) => return (false, vec![unparsed(&words_of_text(sql))]),
    };

    let (tokens, changed) = normalize(tokens);
    if changed {
        if let Ok(stmts) = Parser::parse_sql(&dialect, &render(&tokens)) {
            return (true, stmts.iter().map(classify).collect());
        }
    }

    let mut parsed = true;
    let mut out = Vec::new();
    for piece in split_statements(&tokens) {
        if piece.iter().all(is_blank) {
            continue;
        }
        match Parser::parse_sql(&dialect, &render(piece)) {
            Ok(stmts) => out.extend(stmts.iter().map(classify)),
            Err(_) => {
                parsed = false;
                out.push(unparsed(&words_of_tokens(piece)));
            }
        }
    }
    (parsed, out)
}

fn is_blank(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_) | Token::SemiColon | Token::EOF)
}

/// An unquoted word, upper-cased.
fn keyword(t: &Token) -> Option<String> {
    match t {
        Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
        _ => None,
    }
}

fn render(tokens: &[Token]) -> String {
    tokens.iter().map(ToString::to_string).collect()
}

/// Rewrite the locking clauses and the `TABLE name` form sqlparser does not know.
fn normalize(tokens: Vec<Token>) -> (Vec<Token>, bool) {
    let mut out: Vec<Token> = Vec::with_capacity(tokens.len());
    let mut changed = false;
    let mut at_statement_start = true;
    let mut i = 0;
    while i < tokens.len() {
        let tok = &tokens[i];
        if matches!(tok, Token::Whitespace(_)) {
            out.push(tok.clone());
            i += 1;
            continue;
        }
        let kw = keyword(tok);
        if at_statement_start && kw.as_deref() == Some("TABLE") {
            out.push(Token::make_keyword("SELECT"));
            out.push(Token::Whitespace(Whitespace::Space));
            out.push(Token::Mul);
            out.push(Token::Whitespace(Whitespace::Space));
            out.push(Token::make_keyword("FROM"));
            changed = true;
            at_statement_start = false;
            i += 1;
            continue;
        }
        at_statement_start = matches!(tok, Token::SemiColon);
        if kw.as_deref() == Some("FOR") {
            let next: Vec<(usize, String)> = tokens[i + 1..]
                .iter()
                .enumerate()
                .filter(|(_, t)| !matches!(t, Token::Whitespace(_)))
                .take(3)
                .map(|(j, t)| (i + 1 + j, keyword(t).unwrap_or_default()))
                .collect();
            let words: Vec<&str> = next.iter().map(|(_, w)| w.as_str()).collect();
            let replacement = match words.as_slice() {
                ["NO", "KEY", "UPDATE", ..] => Some(("UPDATE", next[2].0)),
                ["KEY", "SHARE", ..] => Some(("SHARE", next[1].0)),
                _ => None,
            };
            if let Some((lock, last)) = replacement {
                out.push(tok.clone());
                out.push(Token::Whitespace(Whitespace::Space));
                out.push(Token::make_keyword(lock));
                changed = true;
                i = last + 1;
                continue;
            }
        }
        out.push(tok.clone());
        i += 1;
    }
    (out, changed)
}

/// Split at top-level `;`, unless a `BEGIN ATOMIC` body makes `;` ambiguous.
fn split_statements(tokens: &[Token]) -> Vec<&[Token]> {
    let significant: Vec<String> = tokens.iter().filter_map(keyword).collect();
    let atomic_body = significant
        .windows(2)
        .any(|w| w[0] == "BEGIN" && w[1] == "ATOMIC");
    if atomic_body {
        return vec![tokens];
    }
    tokens.split(|t| matches!(t, Token::SemiColon)).collect()
}

/// The significant tokens of a statement as upper-cased words; other tokens become `""` so the
/// leading-keyword checks see them.
fn words_of_tokens(tokens: &[Token]) -> Vec<String> {
    tokens
        .iter()
        .filter(|t| !is_blank(t))
        .map(|t| keyword(t).unwrap_or_default())
        .collect()
}

/// Fallback when even tokenizing failed: the first identifier-like words of the text.
fn words_of_text(sql: &str) -> Vec<String> {
    crate::hints::skip_leading_comments(sql)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .take(256)
        .map(str::to_ascii_uppercase)
        .collect()
}

/// A text too long to parse: judged by its first words, plus a scan of the whole text for
/// session-level advisory locks (the `_xact_` variants do not contain these names).
pub(crate) fn unparsed_huge(sql: &str) -> StatementInfo {
    let mut info = unparsed(&words_of_text(sql));
    let lower = sql.to_ascii_lowercase();
    if SESSION_ADVISORY_LOCKS.iter().any(|f| lower.contains(f)) {
        info.session.pins = Some(PinReason::AdvisoryLock);
    }
    info
}

/// The conservative description of a statement the parser rejected.
fn unparsed(words: &[String]) -> StatementInfo {
    let mut info = StatementInfo::new(StatementKind::Write, false);
    let lead = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    let has = |w: &str| words.iter().any(|x| x == w);
    let has_pair = |a: &str, b: &str| words.windows(2).any(|p| p[0] == a && p[1] == b);

    info.tx = match lead {
        "BEGIN" | "START" => TxEffect::Begin {
            read_only: has_pair("READ", "ONLY") && !has("SERIALIZABLE"),
        },
        "COMMIT" | "END" | "ROLLBACK" | "ABORT" if second == "PREPARED" => TxEffect::None,
        _ if has("CHAIN") && matches!(lead, "COMMIT" | "END" | "ROLLBACK" | "ABORT") => {
            TxEffect::Other
        }
        "COMMIT" | "END" => TxEffect::Commit,
        "ROLLBACK" | "ABORT" if has("TO") => TxEffect::Savepoint,
        "ROLLBACK" | "ABORT" => TxEffect::Rollback,
        "SAVEPOINT" | "RELEASE" => TxEffect::Savepoint,
        "PREPARE" if second == "TRANSACTION" => TxEffect::Other,
        _ => TxEffect::None,
    };

    // Conservative: COPY anywhere as a word (it cannot hide in a DO block, but an
    // unparsed text is not looked into further).
    info.copies = has("COPY");
    let advisory = words.iter().any(|w| {
        SESSION_ADVISORY_LOCKS
            .iter()
            .any(|f| w.eq_ignore_ascii_case(f))
    });
    info.session.pins = if advisory {
        Some(PinReason::AdvisoryLock)
    } else if lead == "LISTEN" {
        Some(PinReason::Listen)
    } else if lead == "PREPARE" {
        // PREPARE TRANSACTION ends the transaction and leaves nothing in the session.
        (second != "TRANSACTION").then_some(PinReason::SqlPrepare)
    } else if lead == "DECLARE" && has_pair("WITH", "HOLD") {
        Some(PinReason::HoldCursor)
    } else if matches!(lead, "CREATE" | "SELECT" | "WITH")
        && (has("TEMP")
            || has("TEMPORARY")
            || words
                .iter()
                .any(|w| w == "PG_TEMP" || w.starts_with("PG_TEMP_")))
    {
        Some(PinReason::TempTable)
    } else if has("SET_CONFIG") || !NO_SESSION_STATE.contains(&lead) {
        Some(PinReason::Other)
    } else {
        None
    };
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(sql: &str) -> Vec<Token> {
        Tokenizer::new(&PostgreSqlDialect {}, sql)
            .with_unescape(false)
            .tokenize()
            .expect("tokenizes")
    }

    #[test]
    fn normalizes_lock_clauses_and_table() {
        let (t, changed) = normalize(tokens(
            "SELECT * FROM t FOR NO KEY UPDATE; TABLE u FOR KEY SHARE",
        ));
        assert!(changed);
        assert_eq!(
            render(&t),
            "SELECT * FROM t FOR UPDATE; SELECT * FROM u FOR SHARE"
        );
    }

    #[test]
    fn normalize_leaves_strings_and_identifiers_alone() {
        let sql = "SELECT 'FOR NO KEY UPDATE', \"table\" FROM t WHERE x = $$FOR KEY SHARE$$";
        let (t, changed) = normalize(tokens(sql));
        assert!(!changed);
        assert_eq!(render(&t), sql);
    }

    #[test]
    fn split_respects_atomic_bodies() {
        let t = tokens("DO $$ BEGIN PERFORM 1; END $$; SELECT 1");
        assert_eq!(split_statements(&t).len(), 2);
        let t = tokens("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END; SELECT 2");
        assert_eq!(split_statements(&t).len(), 1);
    }

    #[test]
    fn unparsed_statements_get_conservative_effects() {
        let w = |s: &str| words_of_text(s);
        let do_block = unparsed(&w("DO $$ BEGIN END $$"));
        assert_eq!(do_block.kind, StatementKind::Write);
        assert_eq!(do_block.session.pins, Some(PinReason::Other));
        let alter = unparsed(&w("ALTER SYSTEM SET work_mem = '1MB'"));
        assert_eq!(alter.session.pins, None);
        assert_eq!(unparsed(&w("ABORT WORK")).tx, TxEffect::Rollback);
        assert_eq!(unparsed(&w("COMMIT PREPARED 'x'")).tx, TxEffect::None);
        assert_eq!(unparsed(&w("PREPARE TRANSACTION 'x'")).tx, TxEffect::Other);
        assert_eq!(unparsed(&w("PREPARE TRANSACTION 'x'")).session.pins, None);
        assert_eq!(
            unparsed(&w("SELECT pg_try_advisory_lock(1) FOR"))
                .session
                .pins,
            Some(PinReason::AdvisoryLock)
        );
        assert_eq!(
            unparsed(&w("BEGIN READ ONLY ISOLATION LEVEL SERIALIZABLE")).tx,
            TxEffect::Begin { read_only: false }
        );
    }
}
