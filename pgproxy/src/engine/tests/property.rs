//! The property: for random client pipelines and random answer timing, what the client
//! receives through the engine equals what it receives from the model server directly,
//! byte for byte, in every kind of session; and no backend is released while it owes
//! answers or holds a transaction.

use proptest::prelude::*;

use super::scripted::ALL;
use super::*;

// ---------------------------------------------------------------------------
// The property: random pipelines, random answer timing
// ---------------------------------------------------------------------------

fn statement() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        4 => Just("select 1"),
        2 => Just("insert into t values (1)"),
        1 => Just("select fail"),
        1 => Just("begin"),
        1 => Just("commit"),
        1 => Just("rollback"),
        1 => Just("set search_path = public"),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Query(&'static str),
    /// Parse (named or not) + Bind + optional Describe + Execute.
    Group {
        name: Option<u8>,
        sql: &'static str,
        describe: bool,
    },
    /// Bind + Execute of a named statement prepared earlier.
    Reuse(u8),
    Close(u8),
    Sync,
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => statement().prop_map(Op::Query),
        4 => (proptest::option::of(0u8..3), statement(), any::<bool>())
            .prop_map(|(name, sql, describe)| Op::Group { name, sql, describe }),
        2 => (0u8..3).prop_map(Op::Reuse),
        1 => (0u8..3).prop_map(Op::Close),
        3 => Just(Op::Sync),
        1 => Just(Op::Flush),
    ]
}

fn render(ops: &[Op]) -> Vec<Frame> {
    let mut out = Vec::new();
    for o in ops {
        match o {
            Op::Query(sql) => out.push(q(sql)),
            Op::Group {
                name,
                sql,
                describe,
            } => {
                let n = name.map(|n| format!("s{n}")).unwrap_or_default();
                out.push(p(&n, sql));
                out.push(b("", &n));
                if *describe {
                    out.push(dp(""));
                }
                out.push(e("", 0));
            }
            Op::Reuse(n) => {
                out.push(b("", &format!("s{n}")));
                out.push(e("", 0));
            }
            Op::Close(n) => out.push(cs(&format!("s{n}"))),
            Op::Sync => out.push(s()),
            Op::Flush => out.push(h()),
        }
    }
    // Every pipeline ends with a Sync and a rollback so that the model ends idle.
    out.push(s());
    out.push(q("rollback"));
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(400), ..ProptestConfig::default() })]

    #[test]
    fn through_the_engine_equals_directly(
        ops in proptest::collection::vec(op(), 1..40),
        schedule in proptest::collection::vec(any::<u8>(), 1..16),
        mode in 0usize..4,
    ) {
        let (pool, bound, replica) = ALL[mode];
        let client = render(&ops);
        let mut h = Harness::new(pool, bound, replica);
        h.run(&client, &schedule);
        let got = h.client_frames();
        let want = direct(&client);
        prop_assert_eq!(tags(&got), tags(&want));
        prop_assert_eq!(got, want);
        prop_assert!(!h.closed);
        prop_assert!(h.engine.is_idle());
        // Idle exactly when the protocol says: the models owe nothing.
        for m in &h.models {
            prop_assert!(m.out.is_empty());
        }
    }
}
