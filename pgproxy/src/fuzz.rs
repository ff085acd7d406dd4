//! A fuzz target over the frontend decoder and the session engine: a deterministic
//! generator ([`Gen`], seeded) turns an input into a stream of events — client messages
//! (well-formed, malformed, mutated, invalid UTF-8, huge counts), backend answers
//! (plausible or random, errors of every severity, out-of-order messages), backend ends
//! and refusals — and [`run_one`] feeds them to a [`crate::engine::Engine`] the way the
//! session shell would. It asserts what must hold for any input: no panic, bounded output
//! (the engine writes at most a fixed amount per message it is given), a bounded queue of
//! expected answers, and every call returning.
//!
//! Stable Rust, no external fuzzer: `cargo test` runs a short pass (`fuzz` tests); the
//! `fuzz_session` example runs millions of inputs (`integration/bench/fuzz-session.sh`).

use bytes::BytesMut;
use meridian_shared::config::PoolMode;
use meridian_sqlroute::{Classifier, FunctionCatalog};

use crate::engine::backend_state::BackendState;
use crate::engine::{Engine, EngineConfig, Env, Event, Refusal, Step};
use crate::error::ProxyError;
use crate::protocol::frontend::{self, FrontendMsg, Target};
use crate::route::Which;
use crate::wire::{self, Frame};

/// The engine may write at most this much per message it is given, beyond the bytes of
/// the messages themselves (synthesized answers, injected Parse/Close/Sync, preludes).
const OUTPUT_PER_EVENT: usize = 4096;

/// A small, fast, seeded PRNG (xorshift64*).
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max as u64 + 1) as usize;
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

const TEXTS: &[&[u8]] = &[
    b"select 1",
    b"SELECT * FROM t WHERE id = $1",
    b"insert into t values (1)",
    b"BEGIN",
    b"begin read only",
    b"COMMIT",
    b"ROLLBACK",
    b"SET search_path = app",
    b"SET meridian.min_lsn = '0/10'",
    b"SET meridian.max_staleness = 'soon'",
    b"SHOW meridian.last_commit_lsn",
    b"DEALLOCATE s1",
    b"DEALLOCATE ALL",
    b"DISCARD ALL",
    b"COPY t FROM STDIN",
    b"COPY t TO STDOUT",
    b"create temp table x (a int)",
    b"create unlogged table u (a int)",
    b"SELECT * FROM pg_prepared_xacts",
    b"LISTEN c",
    b"select '\xa4' -- latin9",
    b"\xff\xfe not utf-8",
    b"",
    b"SELECT 1; SELECT 2",
    b"PREPARE TRANSACTION 'x'",
];

const NAMES: &[&[u8]] = &[b"", b"s1", b"s2", b"_pg3_0", b"p1", b"\xff"];

fn text(g: &mut Gen) -> &'static [u8] {
    TEXTS[g.below(TEXTS.len() as u64) as usize]
}

fn name(g: &mut Gen) -> &'static [u8] {
    NAMES[g.below(NAMES.len() as u64) as usize]
}

/// A client message: mostly well-formed, sometimes mutated or random.
fn client_frame(g: &mut Gen) -> Frame {
    let f = match g.below(16) {
        0 => frontend::query(text(g)),
        1 | 2 => {
            let n = g.below(4) as u16;
            let mut types = n.to_be_bytes().to_vec();
            for _ in 0..n {
                types.extend_from_slice(&23i32.to_be_bytes());
            }
            frontend::parse(name(g), text(g), &types)
        }
        3 | 4 => frontend::bind_renamed(
            &frontend::Bind {
                portal: bytes::Bytes::copy_from_slice(name(g)),
                statement: bytes::Bytes::new(),
                rest: bytes::Bytes::from_static(&[0, 0, 0, 0, 0, 0]),
            },
            name(g),
        ),
        5 => frontend::target_msg(b'D', g.pick(&[Target::Statement, Target::Portal]), name(g)),
        6 | 7 => frontend::execute(name(g), g.pick(&[0, 0, 1, 2, -1])),
        8 => frontend::target_msg(b'C', g.pick(&[Target::Statement, Target::Portal]), name(g)),
        9 | 10 => frontend::sync(),
        11 => Frame::new(b'H', &[]),
        12 => Frame::new(g.pick(b"dcfF"), &g.bytes(8)),
        13 => Frame::new(g.pick(b"QPBDECSHXdcfFzp\x00"), &g.bytes(24)),
        _ => {
            // A well-formed message with some bytes of its body changed.
            let base = frontend::parse(name(g), text(g), &[0, 1, 0, 0, 0, 23]);
            let mut body = base.body().to_vec();
            for _ in 0..=g.below(3) {
                if !body.is_empty() {
                    let i = g.below(body.len() as u64) as usize;
                    body[i] = g.next_u64() as u8;
                }
            }
            Frame::new(g.pick(b"PBDEC"), &body)
        }
    };
    // Never a Terminate: it would end the input early.
    if f.tag == b'X' {
        return frontend::sync();
    }
    f
}

/// A backend message: plausible answers, errors of any severity, random ones.
fn backend_frame(g: &mut Gen) -> Frame {
    match g.below(18) {
        0 => Frame::new(b'1', &[]),
        1 => Frame::new(b'2', &[]),
        2 => Frame::new(b'3', &[]),
        3 => wire::row_description_text("c"),
        4 | 5 => wire::data_row_text("1"),
        6 => wire::command_complete(g.pick(&["SELECT 1", "INSERT 0 1", "BEGIN"])),
        7 | 8 => wire::ready_for_query(g.pick(b"ITEx")),
        9 => wire::error_response(
            g.pick(&["ERROR", "FATAL", "PANIC", "WARNING"]),
            g.pick(&["22012", "0A000", "57P01", "26000", "25P02"]),
            g.pick(&[
                "division by zero",
                "cached plan must not change result type",
                "cannot access temporary or unlogged relations during recovery",
                "terminating connection",
            ]),
        ),
        10 => Frame::new(b'N', &g.bytes(16)),
        11 => wire::parameter_status("client_encoding", "UTF8"),
        12 => {
            let mut body = (g.below(3) as i32 + 99).to_be_bytes().to_vec();
            body.extend_from_slice(b"chan\0payload\0");
            Frame::new(b'A', &body)
        }
        13 => Frame::new(g.pick(b"GHWdc"), &[0, 0, 0]),
        14 => Frame::new(b'n', &[]),
        15 => Frame::new(b't', &[0, 0]),
        16 => Frame::new(b's', &[]),
        _ => Frame::new(g.next_u64() as u8, &g.bytes(12)),
    }
}

/// What one input did (for the runner's statistics).
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub events: usize,
    pub closed: bool,
}

/// Runs one input: `seed` drives a stream of `steps` events through a fresh engine.
/// Panics (the fuzz failure) if an invariant breaks.
pub fn run_one(seed: u64, steps: usize) -> Outcome {
    let mut g = Gen::new(seed);
    let classifier = Classifier::new(0);
    let catalog = FunctionCatalog::with_builtin_defaults();
    let mode = g.pick(&[PoolMode::Session, PoolMode::Transaction]);
    let bound = mode == PoolMode::Session && g.below(2) == 0;
    let replica = !bound && g.below(2) == 0;
    let mut engine = Engine::new(EngineConfig {
        mode,
        bound,
        client_key: (7, 8),
        learns_commits: g.below(2) == 0,
        cache_max_entry: 1024,
    });
    let mut states = [
        BackendState::new(100, vec![]),
        BackendState::new(200, vec![]),
    ];
    let mut held = [false, false];
    let mut out = Outcome::default();
    let mut sent_messages = 0usize;
    for _ in 0..steps {
        let before = engine.out.client.len()
            + engine.out.backend(Which::Primary).len()
            + engine.out.backend(Which::Replica).len();
        let mut input = 0usize;
        match g.below(10) {
            0..=4 => {
                let f = client_frame(&mut g);
                input = f.raw.len();
                let msg = FrontendMsg::decode(&f);
                let env = Env {
                    classifier: &classifier,
                    catalog: &catalog,
                    replica_available: replica,
                    held: (held[0], held[1]),
                    unlogged: &|n| n == "u",
                };
                match engine.on_client(&f, &msg, &env) {
                    Step::Route(route) => {
                        let w = route.target;
                        let i = usize::from(w == Which::Replica);
                        if g.below(20) == 0 {
                            engine.no_backend(&msg, Refusal::Proxy(ProxyError::NoBackend));
                        } else {
                            held[i] = true;
                            engine.dispatch(&f, &msg, &route, &mut states[i], None, &env);
                            sent_messages += 1;
                        }
                    }
                    Step::Done | Step::Wait | Step::Terminate => {}
                }
            }
            5..=8 => {
                let f = backend_frame(&mut g);
                input = f.raw.len();
                let i = g.below(2) as usize;
                let w = if i == 0 {
                    Which::Primary
                } else {
                    Which::Replica
                };
                if held[i] {
                    engine.on_backend(w, &f, &mut states[i]);
                }
            }
            _ => {
                let i = g.below(2) as usize;
                let w = if i == 0 {
                    Which::Primary
                } else {
                    Which::Replica
                };
                if held[i] {
                    let fatal = wire::error_response("FATAL", "57P01", "terminating");
                    engine.on_backend_ended(w, (g.below(2) == 0).then_some(&fatal));
                }
            }
        }
        let after = engine.out.client.len()
            + engine.out.backend(Which::Primary).len()
            + engine.out.backend(Which::Replica).len();
        assert!(
            after <= before + input + OUTPUT_PER_EVENT,
            "seed {seed}: one event wrote {} bytes",
            after - before
        );
        while let Some(e) = engine.poll_event() {
            out.events += 1;
            match e {
                Event::Release => held = [false, false],
                Event::Discard(w) => held[usize::from(w == Which::Replica)] = false,
                Event::Close => out.closed = true,
                _ => {}
            }
        }
        // The shell writes the output out; the bytes must be frames.
        let mut client = std::mem::take(&mut engine.out.client);
        drain_frames(&mut client, seed);
        for w in [Which::Primary, Which::Replica] {
            let mut b = std::mem::take(engine.out.backend(w));
            drain_frames(&mut b, seed);
        }
        if out.closed {
            break;
        }
    }
    let _ = sent_messages;
    out
}

fn drain_frames(buf: &mut BytesMut, seed: u64) {
    while let Some(_f) = wire::try_frame(buf, 1 << 30).unwrap_or_else(|e| {
        panic!("seed {seed}: the engine wrote something that is not a frame: {e}")
    }) {}
    assert!(buf.is_empty(), "seed {seed}: a partial frame was written");
}

/// Decodes random bytes as a stream of client frames and startup packets: no panic, and
/// nothing announced beyond `max` is ever accepted.
pub fn decode_one(seed: u64) {
    let mut g = Gen::new(seed);
    let data = g.bytes(96);
    let mut buf = BytesMut::from(&data[..]);
    while let Ok(Some(f)) = wire::try_frame(&mut buf, 4096) {
        assert!(f.raw.len() <= 4096);
        let _ = FrontendMsg::decode(&f);
        let _ = crate::protocol::backend::error_info(&f);
        let _ = crate::protocol::backend::parameter_status(&f);
    }
    let mut buf = BytesMut::from(&data[..]);
    let _ = wire::try_startup(&mut buf, 4096);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short pass in every test run; `integration/bench/fuzz-session.sh` runs millions.
    #[test]
    fn fuzz_the_engine_and_the_decoder_briefly() {
        let n: u64 = std::env::var("MERIDIAN_FUZZ_INPUTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let mut closed = 0;
        for seed in 0..n {
            if run_one(seed, 60).closed {
                closed += 1;
            }
            decode_one(seed);
        }
        // The generator reaches the interesting paths (sessions that end, at least).
        assert!(closed > 0, "no input ended a session");
    }
}
