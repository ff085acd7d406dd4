//! Literal-stripped fingerprints of query texts, so that queries differing only in their
//! literal values share one cached analysis.
//!
//! Applications that inline values (`... WHERE aid = 12345`, every `pgbench -S` query in the
//! simple protocol) send a new text for every query: the per-text cache misses every time and
//! each query pays a full sqlparser parse. [`fingerprint`] is a single pass over the bytes that
//! copies the text after its leading comments verbatim, except that the contents of numeric and
//! string literals become a one-byte placeholder of the literal's class. Two texts with the same
//! fingerprint are the same token sequence up to literal values, so their analyses are equal
//! whenever the literal values neither steer the parser nor reach the analysis. The classifier
//! shares an analysis by fingerprint only when both are certain: every replaced literal is a
//! plain value in the syntax tree ([`literal_values`] counts them; sqlparser reads a few string
//! and number tokens as something else: `'name'` as an identifier, `varchar(10)`'s modifier as a
//! `u64`, a COPY `DELIMITER` as one character), and the analysis is [`reusable`].
//! The routing hints live in the leading comments, which the fingerprint leaves out: the caller
//! re-derives them from the actual text (they may carry a per-query value, `min_lsn`).
//!
//! Limits: this is a conservative lexer, not a SQL tokenizer. It returns `None` (no fingerprint:
//! the caller falls back to the exact text) for anything where its idea of a token boundary
//! might differ from sqlparser's or PostgreSQL's: comments after the first token, nested or
//! unterminated comments, dollar quotes, backslashes or prefixes on string literals (`E'..'`,
//! `U&'..'`, `B'..'`), numbers that are not plain `123` or `1.5`, integers of more than 18 digits
//! (sqlparser parses type modifiers such as `varchar(10)` as `u64`, so the value can decide
//! whether a text parses), non-ASCII or control bytes outside literals, unusual punctuation,
//! and the word `EXPLAIN` (whose option values, `ANALYZE off`, decide the route).

use std::ops::ControlFlow;

use sqlparser::ast::{Statement, Value, ValueWithSpan, Visit, Visitor};

use crate::analysis::{Analysis, SessionEffect, StatementKind, TxEffect};

/// Placeholder for an integer of 1 to 9 digits.
const SMALL_INT: char = '\u{1}';
/// Placeholder for a string literal.
const STRING: char = '\u{2}';
/// Placeholder for an integer of 10 to 18 digits.
const BIG_INT: char = '\u{3}';
/// Placeholder for a decimal `digits.digits` of at most 18 digits.
const DECIMAL: char = '\u{4}';

/// Longest integer (in digits) that still gets a fingerprint: every such value fits in a `u64`.
const MAX_INT_DIGITS: usize = 18;

/// Punctuation copied as is; any other byte outside literals and words means no fingerprint.
const PUNCTUATION: &[u8] = b"(),;.:+-*/<>=!~^|&%@[]?";

/// A literal-stripped query text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The text after the leading comments, each literal's contents replaced by a placeholder
    /// byte of its class (bytes that cannot otherwise occur in a fingerprinted text).
    pub text: String,
    /// How many literals were replaced.
    pub literals: usize,
}

/// The fingerprint of `sql`, or `None` when the text is outside what the lexer handles with
/// certainty (see the module documentation).
pub fn fingerprint(sql: &str) -> Option<Fingerprint> {
    let body = skip_leading_comments(sql)?;
    let b = body.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut literals = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                out.push(c as char);
                i += 1;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let end = i + b[i..].iter().take_while(|&&c| is_ident_byte(c)).count();
                let word = &body[i..end];
                if word.eq_ignore_ascii_case("explain") {
                    return None;
                }
                // A quote right after a word is a prefixed literal (E'..', B'..', X'..', N'..')
                // or something stranger: no fingerprint.
                if matches!(b.get(end), Some(b'\'' | b'"')) {
                    return None;
                }
                out.push_str(word);
                i = end;
            }
            b'0'..=b'9' => {
                // A digit after `.` may be part of a number the real tokenizer reads as `.5`.
                if i > 0 && b[i - 1] == b'.' {
                    return None;
                }
                let int = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                let mut end = i + int;
                let mut digits = int;
                let mut class = if int <= 9 { SMALL_INT } else { BIG_INT };
                if b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(u8::is_ascii_digit) {
                    let frac = b[end + 1..]
                        .iter()
                        .take_while(|c| c.is_ascii_digit())
                        .count();
                    end += 1 + frac;
                    digits += frac;
                    class = DECIMAL;
                }
                if digits > MAX_INT_DIGITS {
                    return None;
                }
                // `1e5`, `1.`, `1..2`, `0x1F`, `1_000`, `12abc`: not a plain number.
                if b.get(end)
                    .is_some_and(|&c| is_ident_byte(c) || matches!(c, b'.' | b'\'' | b'"'))
                {
                    return None;
                }
                out.push(class);
                literals += 1;
                i = end;
            }
            b'\'' => {
                // `U&'...'` has escapes whose validity depends on the contents.
                if i > 0 && b[i - 1] == b'&' {
                    return None;
                }
                let end = string_end(b, i)?;
                if b.get(end).is_some_and(|&c| is_ident_byte(c) || c == b'"') {
                    return None;
                }
                out.push(STRING);
                literals += 1;
                i = end;
            }
            b'"' => {
                let end = quoted_identifier_end(b, i)?;
                if b.get(end).is_some_and(|&c| is_ident_byte(c) || c == b'\'') {
                    return None;
                }
                out.push_str(&body[i..end]);
                i = end;
            }
            b'$' => {
                // `$1` is a parameter; anything else starts a dollar quote.
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                let end = i + 1 + digits;
                if digits == 0
                    || b.get(end)
                        .is_some_and(|&c| is_ident_byte(c) || matches!(c, b'\'' | b'"'))
                {
                    return None;
                }
                out.push_str(&body[i..end]);
                i = end;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            _ if PUNCTUATION.contains(&c) => {
                out.push(c as char);
                i += 1;
            }
            _ => return None,
        }
    }
    Some(Fingerprint {
        text: out,
        literals,
    })
}

/// Whether an analysis computed for one text holds for every text with the same fingerprint:
/// it parsed, and nothing in it was derived from a literal's value. Literal values reach an
/// analysis only through session and transaction control (`SET x = 'v'`, `set_config('x', 'v',
/// false)`, `BEGIN`/`SET TRANSACTION`, all utility statements or effects excluded here),
/// `current_setting('name')` (a few names make a read the primary's) and `EXPLAIN`
/// options (excluded by [`fingerprint`]).
pub fn reusable(analysis: &Analysis) -> bool {
    analysis.parsed
        && analysis.statements.iter().all(|s| {
            matches!(s.kind, StatementKind::Read | StatementKind::Write)
                && s.tx == TxEffect::None
                && s.session == SessionEffect::default()
                && !s
                    .functions
                    .iter()
                    .any(|f| f == "set_config" || f == "current_setting")
        })
}

/// Number and string literal values anywhere in the syntax trees. When this equals the number
/// of literals [`fingerprint`] replaced, each of them became a value (and nothing else: not an
/// identifier, which sqlparser accepts as `'name'` in some places, not a `u64` type modifier,
/// not a COPY option character), so their contents did not steer the parser.
pub(crate) fn literal_values(stmts: &[Statement]) -> usize {
    struct Count(usize);
    impl Visitor for Count {
        type Break = ();
        fn pre_visit_value(&mut self, value: &ValueWithSpan) -> ControlFlow<()> {
            if matches!(
                value.value,
                Value::Number(..) | Value::SingleQuotedString(_)
            ) {
                self.0 += 1;
            }
            ControlFlow::Continue(())
        }
    }
    let mut count = Count(0);
    for stmt in stmts {
        // The visitor never breaks.
        let _ = stmt.visit(&mut count);
    }
    count.0
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$'
}

/// The text after the leading comments and blanks, or `None` if a leading comment is nested,
/// unterminated or has a line break the two sides might read differently (`\r`).
fn skip_leading_comments(sql: &str) -> Option<&str> {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            let len = b[i..].iter().position(|&c| c == b'\n')?;
            if b[i..i + len].contains(&b'\r') {
                return None;
            }
            i += len + 1;
        } else if b[i..].starts_with(b"/*") {
            let body = &b[i + 2..];
            let len = body.windows(2).position(|w| w == b"*/")?;
            if body[..len].windows(2).any(|w| w == b"/*") {
                return None;
            }
            // A body ending in `/` would read as `/*/` + `*/` ... keep it simple: refuse.
            if body[..len].last() == Some(&b'/') {
                return None;
            }
            i += 2 + len + 2;
        } else {
            return Some(&sql[i..]);
        }
    }
}

/// End (exclusive) of the standard-conforming string literal starting at `start`, or `None` if
/// it is unterminated or contains a backslash.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match b.get(i)? {
            b'\\' => return None,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// End (exclusive) of the quoted identifier starting at `start`; `None` if unterminated or it
/// holds a control byte (which could be mistaken for a placeholder).
fn quoted_identifier_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match b.get(i)? {
            c if *c < 0x20 || *c == 0x7f => return None,
            b'"' if b.get(i + 1) == Some(&b'"') => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(sql: &str) -> Option<String> {
        fingerprint(sql).map(|f| f.text)
    }

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            fp("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = \u{1};")
        );
        assert_eq!(
            fp("SELECT 'a''b', 1.5, 12345678901, $1, t1.c2").as_deref(),
            Some("SELECT \u{2}, \u{4}, \u{3}, $1, t1.c2")
        );
        assert_eq!(
            fp("SELECT \"it's\", x FROM \"T\"\"q\" WHERE y = 'ünïcode'").as_deref(),
            Some("SELECT \"it's\", x FROM \"T\"\"q\" WHERE y = \u{2}")
        );
    }

    #[test]
    fn same_shape_same_fingerprint() {
        assert_eq!(
            fp("SELECT * FROM t WHERE a = 1 AND b = 'x'"),
            fp("SELECT * FROM t WHERE a = 987654 AND b = 'another value'")
        );
        assert_ne!(fp("SELECT 1"), fp("SELECT '1'"));
        assert_ne!(fp("SELECT 1"), fp("SELECT 1.0"));
        assert_ne!(fp("SELECT 1"), fp("SELECT 1234567890"));
        assert_ne!(fp("SELECT a"), fp("SELECT A"));
    }

    #[test]
    fn leading_comments_are_left_out() {
        assert_eq!(
            fp("/* meridian:min_lsn=0/1 */ SELECT 1").as_deref(),
            Some("SELECT \u{1}")
        );
        assert_eq!(
            fp("-- note\n/* meridian:primary */\nSELECT 2").as_deref(),
            Some("SELECT \u{1}")
        );
        assert_eq!(fp("  ").as_deref(), Some(""));
    }

    #[test]
    fn uncertain_texts_have_no_fingerprint() {
        for sql in [
            "SELECT 1 -- trailing",
            "SELECT /* inner */ 1",
            "/* a /* nested */ */ SELECT 1",
            "/* unterminated SELECT 1",
            "-- no newline",
            "SELECT E'a\\nb'",
            "SELECT 'a\\'",
            "SELECT U&'d!0061t' UESCAPE '!'",
            "SELECT x'1F', b'01', n'x'",
            "SELECT $$ body $$",
            "SELECT $tag$ body $tag$",
            "SELECT 1e5",
            "SELECT .5",
            "SELECT 1.",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1234567890123456789",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "EXPLAIN (ANALYZE 0) UPDATE t SET a = 1",
            "explain analyze select 1",
            "SELECT a # b",
            "SELECT café FROM t",
            "SELECT 1\u{b}",
            "SELECT `x`",
        ] {
            assert_eq!(fp(sql), None, "{sql:?}");
        }
    }

    #[test]
    fn only_literal_free_analyses_are_reusable() {
        use crate::analyze_uncached;
        for sql in [
            "SELECT * FROM t WHERE id = 1",
            "INSERT INTO t VALUES (1, 'x')",
            "UPDATE t SET a = 'b' WHERE id = 2",
            "SELECT nextval('s')",
            "",
        ] {
            assert!(reusable(&analyze_uncached(sql)), "{sql:?}");
        }
        for sql in [
            "SET search_path = 'a'",
            "SELECT set_config('x', 'v', false)",
            "SELECT set_config('x', 'v', true)",
            "BEGIN READ ONLY",
            "SHOW x",
            "SELECT pg_advisory_lock(1)",
            "CREATE TEMP TABLE x (a int)",
            "DO $$ BEGIN END $$",
            "SELEC 1",
        ] {
            assert!(!reusable(&analyze_uncached(sql)), "{sql:?}");
        }
    }
}
