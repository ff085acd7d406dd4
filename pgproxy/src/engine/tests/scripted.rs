//! Scripted message sequences through the engine, most compared with the model server
//! answering the same client directly; the protocol situations the engine must get right.

use super::*;

// ---------------------------------------------------------------------------
// Scripted sequences
// ---------------------------------------------------------------------------

pub(super) const ALL: [(PoolMode, bool, bool); 4] = [
    (PoolMode::Session, true, false),
    (PoolMode::Session, false, true),
    (PoolMode::Transaction, false, false),
    (PoolMode::Transaction, false, true),
];

fn in_all_modes(client: &[Frame]) {
    for (mode, bound, replica) in ALL {
        for schedule in [&[0u8][..], &[2, 1, 2, 0, 1]] {
            same_as_direct(mode, bound, replica, client, schedule);
        }
    }
}

#[test]
fn many_parse_bind_execute_without_sync_then_sync() {
    let mut c = Vec::new();
    for i in 0..20 {
        let sql = if i % 3 == 0 {
            "insert into t values (1)".to_owned()
        } else {
            format!("select {i}")
        };
        c.extend([p("", &sql), b("", ""), e("", 0)]);
    }
    c.push(s());
    in_all_modes(&c);
}

#[test]
fn an_error_in_a_pipeline_inside_a_transaction_then_rollback_in_the_same_pipeline() {
    in_all_modes(&[
        p("", "begin"),
        b("", ""),
        e("", 0),
        p("", "insert into t values (1)"),
        b("", ""),
        e("", 0),
        p("", "select fail"),
        b("", ""),
        e("", 0),
        p("", "insert into t values (2)"),
        b("", ""),
        e("", 0),
        s(),
        p("", "rollback"),
        b("", ""),
        e("", 0),
        s(),
        q("select 1"),
    ]);
}

#[test]
fn an_error_in_a_pipeline_with_flush_and_no_sync_then_more_then_sync() {
    // psycopg's pipeline mode: Flush after each query, Sync only at the end; the
    // messages after the error must be skipped, then the Sync answered.
    in_all_modes(&[
        p("", "insert into t values (1)"),
        b("", ""),
        dp(""),
        e("", 0),
        h(),
        p("", "select fail"),
        b("", ""),
        e("", 0),
        h(),
        p("", "commit"),
        b("", ""),
        e("", 0),
        h(),
        s(),
        q("select 2"),
    ]);
}

#[test]
fn an_error_after_the_transaction_in_the_same_pipeline() {
    in_all_modes(&[
        q("begin"),
        q("insert into t values (1)"),
        q("commit"),
        p("", "select fail"),
        b("", ""),
        e("", 0),
        s(),
        q("select 1"),
    ]);
}

#[test]
fn flush_without_sync_gets_answers_and_a_later_sync_ends_the_batch() {
    in_all_modes(&[
        p("s1", "select 1"),
        ds("s1"),
        h(),
        b("", "s1"),
        e("", 0),
        h(),
        s(),
    ]);
}

#[test]
fn a_multi_statement_query_is_one_implicit_transaction() {
    in_all_modes(&[
        q("insert into t values (1); select 1; insert into t values (2)"),
        q("insert into t values (1); select fail; insert into t values (2)"),
        q("select 1"),
        q(""),
    ]);
}

#[test]
fn reprepare_on_another_backend_and_close_of_a_statement_in_use() {
    in_all_modes(&[
        p("s1", "select 1"),
        s(),
        b("", "s1"),
        e("", 0),
        s(),
        q("insert into t values (1)"),
        b("", "s1"),
        e("", 0),
        s(),
        cs("s1"),
        s(),
        b("", "s1"),
        e("", 0),
        s(),
        p("s1", "select 2"),
        b("", "s1"),
        e("", 0),
        s(),
    ]);
}

#[test]
fn duplicate_statement_names_fail_as_on_the_server() {
    in_all_modes(&[
        p("s1", "select 1"),
        s(),
        q("begin"),
        q("insert into t values (1)"),
        p("s1", "select 2"),
        b("", "s1"),
        e("", 0),
        s(),
        q("commit"),
    ]);
}

#[test]
fn deallocate_all_and_discard_all_drop_statements() {
    in_all_modes(&[
        p("s1", "select 1"),
        s(),
        q("deallocate all"),
        b("", "s1"),
        e("", 0),
        s(),
        p("s1", "select 1"),
        b("", "s1"),
        e("", 0),
        s(),
        q("discard all"),
        p("s1", "select 1"),
        s(),
    ]);
}

#[test]
fn describe_of_a_portal_and_portal_suspension() {
    in_all_modes(&[
        q("begin"),
        p("s", "select 1"),
        b("c1", "s"),
        dp("c1"),
        e("c1", 2),
        s(),
        e("c1", 2),
        e("c1", 2),
        s(),
        q("commit"),
    ]);
}

#[test]
fn a_failed_parse_forgets_the_name() {
    in_all_modes(&[
        p("s1", "badparse"),
        b("", "s1"),
        e("", 0),
        s(),
        p("s1", "select 1"),
        b("", "s1"),
        e("", 0),
        s(),
    ]);
}

#[test]
fn an_empty_transaction_touches_no_backend() {
    let mut h = Harness::new(PoolMode::Session, false, true);
    h.run(&[q("BEGIN"), q("COMMIT")], &[0]);
    assert_eq!(tags(&h.client_frames()), "CZCZ");
    assert_eq!(h.models[0].received + h.models[1].received, 0);
}

#[test]
fn a_write_after_a_read_in_one_batch_moves_to_the_primary() {
    let mut h = Harness::new(PoolMode::Session, false, true);
    let c = [
        p("", "select 1"),
        b("", ""),
        e("", 0),
        p("", "insert into t values (1)"),
        b("", ""),
        e("", 0),
        s(),
    ];
    h.run(&c, &[0]);
    assert_eq!(h.client_frames(), direct(&c));
    // The read went to the replica, the write to the primary; the replica's part
    // was ended by the proxy's own Sync.
    assert_eq!(h.models[1].received, 4);
    assert_eq!(h.models[0].received, 4);
}

#[test]
fn transaction_pooling_releases_only_when_idle() {
    let mut h = Harness::new(PoolMode::Transaction, false, false);
    h.run(&[q("begin"), q("insert into t values (1)")], &[0]);
    assert_eq!(h.releases, 0, "inside a transaction");
    h.run(&[q("commit")], &[0]);
    assert_eq!(h.releases, 1);
    h.run(&[p("", "select 1"), b("", ""), e("", 0), h_flush()], &[0]);
    assert_eq!(h.releases, 1, "a batch without Sync holds the backend");
    h.run(&[s()], &[0]);
    assert_eq!(h.releases, 2);
}

fn h_flush() -> Frame {
    h()
}

#[test]
fn a_backend_fatal_mid_statement_in_a_virtual_session_fails_the_statement_only() {
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.run(&[q("select 1")], &[0]);
    h.client_got.clear();
    h.offer(&q("select 2"));
    let fatal = wire::error_response(
        "FATAL",
        "57P01",
        "terminating connection due to administrator command",
    );
    h.engine.on_backend_ended(Which::Primary, Some(&fatal));
    h.pump_out();
    let got = h.client_frames();
    assert_eq!(tags(&got), "EZ");
    let info = be_msg::error_info(&got[0]);
    assert_eq!(info.severity, ErrorSeverity::Error);
    assert_eq!(info.code, "57P01");
    assert!(!h.closed);
    assert!(!h.held[0], "discarded");
    // The session goes on.
    h.models[0] = Model::new();
    h.client_got.clear();
    h.run(&[q("select 3")], &[0]);
    assert_eq!(tags(&h.client_frames()), "TDDDCZ");
}

#[test]
fn a_backend_fatal_while_idle_in_a_transaction_ends_the_session_as_directly() {
    let mut h = Harness::new(PoolMode::Transaction, false, false);
    h.run(&[q("begin"), q("insert into t values (1)")], &[0]);
    h.client_got.clear();
    let fatal = wire::error_response(
        "FATAL",
        "25P03",
        "terminating connection due to idle-in-transaction timeout",
    );
    h.engine
        .on_backend(Which::Primary, &fatal, &mut h.states[0]);
    h.pump_out();
    let got = h.client_frames();
    assert_eq!(got, vec![fatal]);
    assert!(h.closed);
}

#[test]
fn a_backend_fatal_while_idle_in_a_virtual_session_is_dropped_quietly() {
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.run(&[q("select 1")], &[0]);
    h.client_got.clear();
    let fatal = wire::error_response(
        "FATAL",
        "57P05",
        "terminating connection due to idle-session timeout",
    );
    h.engine
        .on_backend(Which::Primary, &fatal, &mut h.states[0]);
    h.pump_out();
    assert!(h.client_frames().is_empty());
    assert!(!h.closed);
    assert!(!h.held[0]);
}

#[test]
fn a_bound_session_ends_with_its_backend() {
    let mut h = Harness::new(PoolMode::Session, true, false);
    h.run(&[q("select 1")], &[0]);
    h.engine.on_backend_ended(Which::Primary, None);
    h.pump_out();
    assert!(h.closed);
    let got = h.client_frames();
    let last = be_msg::error_info(got.last().unwrap());
    assert_eq!(last.severity, ErrorSeverity::Fatal);
    assert_eq!(last.code, "08006");
}

#[test]
fn copy_in_with_a_sync_pipelined_behind_it_and_copy_fail() {
    // Extended COPY FROM STDIN: the Sync sent behind the Execute is ignored by the
    // server during COPY; the client sends another after CopyDone.
    let mut h = Harness::new(PoolMode::Session, false, false);
    let copy_in = Frame::new(b'G', &[0, 0, 0]);
    h.offer(&p("", "copy t from stdin"));
    h.offer(&b("", ""));
    h.offer(&e("", 0));
    h.offer(&s());
    // The model does not speak COPY: answer by hand.
    h.models[0].out.clear();
    h.primary_answers(&[
        Frame::new(b'1', &[]),
        Frame::new(b'2', &[]),
        copy_in.clone(),
    ]);
    h.pump_out();
    let before = h.models[0].received;
    h.engine.out.backend(Which::Primary).clear();
    for f in [Frame::new(b'd', b"1\n"), Frame::new(b'c', &[]), s()] {
        let msg = FrontendMsg::decode(&f);
        let env = Env {
            classifier: &h.classifier,
            catalog: &h.catalog,
            replica_available: false,
            held: (true, false),
            unlogged: &|_| false,
        };
        match h.engine.on_client(&f, &msg, &env) {
            Step::Route(r) => {
                let env = Env {
                    classifier: &h.classifier,
                    catalog: &h.catalog,
                    replica_available: false,
                    held: (true, false),
                    unlogged: &|_| false,
                };
                h.engine
                    .dispatch(&f, &msg, &r, &mut h.states[0], None, &env);
            }
            Step::Done => {}
            other => panic!("{other:?}"),
        }
    }
    let sent = frames(&std::mem::take(h.engine.out.backend(Which::Primary)));
    assert_eq!(
        tags(&sent),
        "dcS",
        "copy data, done, and the new Sync reach the server"
    );
    assert_eq!(h.models[0].received, before);
    h.primary_answers(&[
        wire::command_complete("COPY 1"),
        wire::ready_for_query(b'I'),
    ]);
    h.pump_out();
    assert_eq!(tags(&h.client_frames()), "12GCZ");
    assert!(h.engine.is_idle());

    // CopyFail: the server errors, then the client's Sync gets ReadyForQuery.
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.offer(&q("copy t from stdin"));
    h.models[0].out.clear();
    h.engine
        .on_backend(Which::Primary, &copy_in, &mut h.states[0]);
    h.pump_out();
    let f = Frame::new(b'f', b"no\0");
    let msg = FrontendMsg::decode(&f);
    let env = Env {
        classifier: &h.classifier,
        catalog: &h.catalog,
        replica_available: false,
        held: (true, false),
        unlogged: &|_| false,
    };
    assert!(matches!(h.engine.on_client(&f, &msg, &env), Step::Done));
    assert_eq!(tags(&frames(h.engine.out.backend(Which::Primary))), "f");
    h.primary_answers(&[
        wire::error_response("ERROR", "57014", "COPY from stdin failed: no"),
        wire::ready_for_query(b'I'),
    ]);
    h.pump_out();
    assert_eq!(tags(&h.client_frames()), "GEZ");
}

#[test]
fn copy_out_passes_through() {
    let mut h = Harness::new(PoolMode::Session, false, true);
    h.offer(&q("copy (select 1) to stdout"));
    h.models[1].out.clear();
    h.models[0].out.clear();
    let w = if h.held[1] {
        Which::Replica
    } else {
        Which::Primary
    };
    for f in [
        Frame::new(b'H', &[0, 0, 0]),
        Frame::new(b'd', b"1\n"),
        Frame::new(b'c', &[]),
        wire::command_complete("COPY 1"),
        wire::ready_for_query(b'I'),
    ] {
        h.engine.on_backend(w, &f, &mut h.states[idx(w)]);
    }
    h.pump_out();
    assert_eq!(tags(&h.client_frames()), "HdcCZ");
}

#[test]
fn copy_out_ended_by_an_error_and_copy_in_refused_mid_copy() {
    // COPY OUT cut short by the server (a query error after some rows).
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.offer(&q(
        "copy (select 1/(2-g) from generate_series(1,3) g) to stdout",
    ));
    h.models[0].out.clear();
    h.primary_answers(&[
        Frame::new(b'H', &[0, 0, 0]),
        Frame::new(b'd', b"1\n"),
        wire::error_response("ERROR", "22012", "division by zero"),
        wire::ready_for_query(b'I'),
    ]);
    h.pump_out();
    assert_eq!(tags(&h.client_frames()), "HdEZ");
    assert!(h.engine.is_idle());

    // COPY IN refused by the server mid-copy (bad data): it sends its error and, for a
    // simple Query, ReadyForQuery at once, and drops whatever copy messages the client
    // still sends. So does the engine: they reach no backend (in transaction pooling
    // the backend may already serve another client).
    let mut h = Harness::new(PoolMode::Transaction, false, false);
    h.offer(&q("copy t from stdin"));
    h.models[0].out.clear();
    h.primary_answers(&[
        Frame::new(b'G', &[0, 0, 0]),
        wire::error_response("ERROR", "22P02", "invalid input syntax for type integer"),
        wire::ready_for_query(b'I'),
    ]);
    h.pump_out();
    assert_eq!(tags(&h.client_frames()), "GEZ");
    assert!(h.engine.is_idle());
    h.engine.out.backend(Which::Primary).clear();
    for f in [Frame::new(b'd', b"x\n"), Frame::new(b'c', &[])] {
        let msg = FrontendMsg::decode(&f);
        let env = Env {
            classifier: &h.classifier,
            catalog: &h.catalog,
            replica_available: false,
            held: (true, false),
            unlogged: &|_| false,
        };
        assert!(matches!(h.engine.on_client(&f, &msg, &env), Step::Done));
    }
    assert!(h.engine.out.backend(Which::Primary).is_empty());
    assert!(h.engine.is_idle());
}

#[test]
fn notifications_from_the_own_backend_carry_the_clients_pid() {
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.run(&[q("select 1")], &[0]);
    h.client_got.clear();
    let mut body = 100i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"ch\0\0");
    h.engine
        .on_backend(Which::Primary, &Frame::new(b'A', &body), &mut h.states[0]);
    let mut other = 555i32.to_be_bytes().to_vec();
    other.extend_from_slice(b"ch\0\0");
    h.engine
        .on_backend(Which::Primary, &Frame::new(b'A', &other), &mut h.states[0]);
    h.pump_out();
    let got = h.client_frames();
    assert_eq!(be_msg::notification_pid(&got[0]), Some(7));
    assert_eq!(be_msg::notification_pid(&got[1]), Some(555));
}

#[test]
fn login_reports_the_servers_parameters_and_refusals_end_it() {
    let mut h = Harness::new(PoolMode::Session, true, false);
    h.states[0]
        .server_params
        .push(("in_hot_standby".into(), "on".into()));
    h.engine.start_login(
        Which::Primary,
        &mut h.states[0],
        &[("client_encoding".into(), "utf-8".into())],
    );
    let sent = frames(h.engine.out.backend(Which::Primary));
    assert_eq!(sent.len(), 1);
    h.engine.out.backend(Which::Primary).clear();
    h.primary_answers(&[
        wire::parameter_status("client_encoding", "UTF8"),
        wire::command_complete("SET"),
        wire::ready_for_query(b'I'),
    ]);
    h.pump_out();
    let got = h.client_frames();
    assert_eq!(tags(&got), "SSKZ");
    assert_eq!(
        be_msg::parameter_status(&got[0]),
        Some((&b"in_hot_standby"[..], &b"off"[..]))
    );
    assert_eq!(
        be_msg::parameter_status(&got[1]),
        Some((&b"client_encoding"[..], &b"UTF8"[..]))
    );

    let mut h = Harness::new(PoolMode::Session, true, false);
    h.engine.start_login(
        Which::Primary,
        &mut h.states[0],
        &[("nonsense".into(), "1".into())],
    );
    h.primary_answers(&[
        wire::error_response(
            "ERROR",
            "42704",
            "unrecognized configuration parameter \"nonsense\"",
        ),
        wire::ready_for_query(b'I'),
    ]);
    h.pump_out();
    let got = h.client_frames();
    assert_eq!(tags(&got), "E");
    let info = be_msg::error_info(&got[0]);
    assert_eq!(
        (info.severity, info.code.as_str()),
        (ErrorSeverity::Fatal, "42704")
    );
    assert!(h.closed);
}

#[test]
fn meridian_settings_answered_locally_and_a_bad_value_fails_the_transaction() {
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.run(
        &[
            q("SET meridian.max_staleness = '2s'"),
            q("SHOW meridian.max_staleness"),
        ],
        &[0],
    );
    assert_eq!(tags(&h.client_frames()), "CZTDCZ");
    assert_eq!(h.models[0].received, 0);
    h.client_got.clear();
    // Inside a transaction, a bad value fails the transaction as the server would.
    h.run(
        &[
            q("begin"),
            q("insert into t values (1)"),
            q("SET meridian.max_staleness = 'soon'"),
        ],
        &[0],
    );
    let got = h.client_frames();
    let last_error = got.iter().rev().find(|f| f.tag == b'E').unwrap();
    assert_eq!(be_msg::error_info(last_error).code, "22023");
    assert_eq!(got.last().unwrap().body(), b"E");
    assert_eq!(h.models[0].tx, b'E', "the backend's transaction failed too");
}

#[test]
fn a_read_a_replica_refuses_for_an_unlogged_relation_runs_again_on_the_primary() {
    let mut h = Harness::new(PoolMode::Session, false, true);
    assert!(h.offer(&q("select count(*) from unl")));
    assert!(h.held[1], "the read went to the replica");
    h.models[1].out.clear();
    for f in [
        wire::error_response(
            "ERROR",
            "0A000",
            "cannot access temporary or unlogged relations during recovery",
        ),
        wire::ready_for_query(b'I'),
    ] {
        h.engine.on_backend(Which::Replica, &f, &mut h.states[1]);
    }
    h.pump_out();
    assert!(
        h.client_frames().is_empty(),
        "nothing of the refusal reaches the client"
    );
    assert_eq!(h.replays, 1);
    // The replayed read goes to the primary, and so does the next one.
    let replay = h.waiting.pop_front().unwrap();
    h.run(&[replay, q("select count(*) from public.unl")], &[0]);
    assert_eq!(tags(&h.client_frames()), "TDDDCZTDDDCZ");
    assert_eq!(h.models[0].received, 2);
}

#[test]
fn an_unlogged_relation_created_through_the_proxy_is_read_on_the_primary() {
    let mut h = Harness::new(PoolMode::Session, false, true);
    h.unlogged.lock().unwrap().clear();
    // The model does not know CREATE; the event is what matters.
    let f = q("create unlogged table u1 (x int)");
    let msg = FrontendMsg::decode(&f);
    let env = Env {
        classifier: &h.classifier,
        catalog: &h.catalog,
        replica_available: true,
        held: (false, false),
        unlogged: &|_| false,
    };
    let Step::Route(route) = h.engine.on_client(&f, &msg, &env) else {
        panic!("routed");
    };
    h.engine
        .dispatch(&f, &msg, &route, &mut h.states[0], None, &env);
    let mut learned = Vec::new();
    while let Some(e) = h.engine.poll_event() {
        if let Event::Unlogged(n) = e {
            learned.extend(n);
        }
    }
    assert_eq!(learned, vec!["u1".to_owned()]);
}

#[test]
fn a_fatal_protocol_violation_ends_even_a_virtual_session() {
    let mut h = Harness::new(PoolMode::Transaction, false, false);
    h.offer(&q("select 1"));
    h.models[0].out.clear();
    let fatal = wire::error_response(
        "FATAL",
        "08P01",
        "terminating connection because protocol synchronization was lost",
    );
    h.engine
        .on_backend(Which::Primary, &fatal, &mut h.states[0]);
    h.pump_out();
    assert!(
        h.closed,
        "the client did something the server ends connections for"
    );
    assert_eq!(h.client_frames(), vec![fatal]);
}

#[test]
fn what_a_terminate_still_waits_for() {
    // A simple Query in flight: its answers come without the client.
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.offer(&q("select 1"));
    assert_eq!(h.engine.owed_without_client(), Some(Which::Primary));
    while h.deliver_one(0) {}
    assert_eq!(h.engine.owed_without_client(), None, "answered");

    // Extended messages without Sync: the server waits for the client.
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.offer(&p("", "select 1"));
    h.offer(&b("", ""));
    h.offer(&e("", 0));
    assert_eq!(h.engine.owed_without_client(), None);
    h.offer(&s());
    assert_eq!(h.engine.owed_without_client(), Some(Which::Primary));

    // COPY IN: the server waits for the client's data.
    let mut h = Harness::new(PoolMode::Session, false, false);
    h.offer(&q("copy t from stdin"));
    h.models[0].out.clear();
    h.primary_answers(&[Frame::new(b'G', &[0, 0, 0])]);
    assert_eq!(h.engine.owed_without_client(), None);
}
