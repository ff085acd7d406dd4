//! Engine tests: scripted message sequences against a model server ([`Model`], a small
//! PostgreSQL protocol responder that fails loudly on what it does not know), and a
//! property: for random client pipelines, what the client receives through the engine
//! equals what it receives talking to the model directly, byte for byte, and the engine
//! releases a backend only when the model is idle.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use meridian_sqlroute::{Classifier, FunctionCatalog};

use super::*;
use crate::protocol::backend::{self as be_msg, ErrorSeverity};
use crate::protocol::frontend;
use crate::protocol::frontend::{FrontendMsg, Target};
use crate::route::Which;
use crate::testing::Model;
use crate::wire::{self, try_frame, Frame};
use meridian_shared::config::PoolMode;

// ---------------------------------------------------------------------------
// The harness: an engine, its two model backends, a scheduler
// ---------------------------------------------------------------------------

pub(super) struct Harness {
    engine: Engine,
    models: [Model; 2],
    states: [BackendState; 2],
    held: [bool; 2],
    classifier: Classifier,
    catalog: FunctionCatalog,
    replica: bool,
    client_got: BytesMut,
    waiting: VecDeque<Frame>,
    closed: bool,
    releases: usize,
    unlogged: std::sync::Mutex<std::collections::HashSet<String>>,
    replays: usize,
}

pub(super) fn idx(w: Which) -> usize {
    match w {
        Which::Primary => 0,
        Which::Replica => 1,
    }
}

pub(super) fn which(i: usize) -> Which {
    if i == 0 {
        Which::Primary
    } else {
        Which::Replica
    }
}

impl Harness {
    pub(super) fn new(mode: PoolMode, bound: bool, replica: bool) -> Harness {
        Harness {
            engine: Engine::new(EngineConfig {
                mode,
                bound,
                client_key: (7, 8),
                learns_commits: false,
                cache_max_entry: 1 << 20,
            }),
            models: [Model::new(), Model::new()],
            states: [
                BackendState::new(100, vec![]),
                BackendState::new(200, vec![]),
            ],
            held: [false, false],
            classifier: Classifier::new(64),
            catalog: FunctionCatalog::with_builtin_defaults(),
            replica,
            client_got: BytesMut::new(),
            waiting: VecDeque::new(),
            closed: false,
            releases: 0,
            unlogged: Default::default(),
            replays: 0,
        }
    }

    /// Offers a client message; returns false when it must wait.
    pub(super) fn offer(&mut self, f: &Frame) -> bool {
        let msg = FrontendMsg::decode(f);
        let env = Env {
            classifier: &self.classifier,
            catalog: &self.catalog,
            replica_available: self.replica,
            held: (self.held[0], self.held[1]),
            unlogged: &|n| self.unlogged.lock().unwrap().contains(n),
        };
        let step = self.engine.on_client(f, &msg, &env);
        match step {
            Step::Done | Step::Terminate => {}
            Step::Wait => {
                // What the engine sent to make the backend answer (a Flush, its own Sync).
                self.pump_out();
                return false;
            }
            Step::Route(route) => {
                let i = idx(route.target);
                self.held[i] = true;
                let env = Env {
                    classifier: &self.classifier,
                    catalog: &self.catalog,
                    replica_available: self.replica,
                    held: (self.held[0], self.held[1]),
                    unlogged: &|n| self.unlogged.lock().unwrap().contains(n),
                };
                self.engine
                    .dispatch(f, &msg, &route, &mut self.states[i], None, &env);
            }
        }
        self.pump_out();
        true
    }

    /// Gives the engine these messages from the primary, in order, as the server sent
    /// them (scripted answers, not the model's).
    pub(super) fn primary_answers(&mut self, answers: &[Frame]) {
        for f in answers {
            self.engine
                .on_backend(Which::Primary, f, &mut self.states[0]);
        }
    }

    /// Moves what the engine wrote to the models and the client.
    pub(super) fn pump_out(&mut self) {
        for i in 0..2 {
            let mut bytes = std::mem::take(self.engine.out.backend(which(i)));
            while let Some(f) = try_frame(&mut bytes, 1 << 30).expect("engine frames") {
                self.models[i].handle(&f);
            }
        }
        let out = std::mem::take(&mut self.engine.out.client);
        self.client_got.extend_from_slice(&out);
        while let Some(e) = self.engine.poll_event() {
            match e {
                Event::Release => {
                    for i in 0..2 {
                        if self.held[i] {
                            assert!(
                                self.models[i].idle(),
                                "released backend {i} while it was not idle"
                            );
                            self.held[i] = false;
                        }
                    }
                    self.releases += 1;
                }
                Event::Close => self.closed = true,
                Event::Discard(w) => self.held[idx(w)] = false,
                Event::Unlogged(names) => self.unlogged.lock().unwrap().extend(names),
                Event::Replay(f) => {
                    self.replays += 1;
                    self.waiting.push_front(f);
                }
                _ => {}
            }
        }
    }

    /// Delivers one pending backend message, if any; returns whether it did.
    pub(super) fn deliver_one(&mut self, prefer: usize) -> bool {
        for i in [prefer % 2, (prefer + 1) % 2] {
            if let Some(f) = self.models[i].out.pop_front() {
                self.engine.on_backend(which(i), &f, &mut self.states[i]);
                self.pump_out();
                return true;
            }
        }
        false
    }

    /// Sends every client message, delivering backend answers as needed (and
    /// `eagerness` of the time in between), then everything left.
    pub(super) fn run(&mut self, client: &[Frame], schedule: &[u8]) {
        let mut sched = schedule.iter().copied().cycle();
        for f in client {
            self.waiting.push_back(f.clone());
            while let Some(next) = self.waiting.front().cloned() {
                if self.offer(&next) {
                    self.waiting.pop_front();
                    // Sometimes let backends answer before the next message.
                    let r = sched.next().unwrap_or(0);
                    for _ in 0..(r % 3) {
                        self.deliver_one(r as usize);
                    }
                } else {
                    assert!(
                        self.deliver_one(sched.next().unwrap_or(0) as usize),
                        "the engine waits but no backend has anything to say"
                    );
                }
            }
        }
        while self.deliver_one(0) {}
    }

    pub(super) fn client_frames(&self) -> Vec<Frame> {
        frames(&self.client_got)
    }
}

pub(super) fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut b = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = try_frame(&mut b, 1 << 30).expect("frames") {
        out.push(f);
    }
    out
}

pub(super) fn tags(fs: &[Frame]) -> String {
    fs.iter().map(|f| f.tag as char).collect()
}

/// What the client gets talking to the model directly.
pub(super) fn direct(client: &[Frame]) -> Vec<Frame> {
    let mut m = Model::new();
    let mut out = Vec::new();
    for f in client {
        m.handle(f);
        out.extend(m.out.drain(..));
    }
    out
}

pub(super) fn q(sql: &str) -> Frame {
    frontend::query(sql.as_bytes())
}
pub(super) fn p(name: &str, sql: &str) -> Frame {
    frontend::parse(name.as_bytes(), sql.as_bytes(), &[0, 0])
}
pub(super) fn b(portal: &str, stmt: &str) -> Frame {
    frontend::bind_renamed(
        &crate::protocol::frontend::Bind {
            portal: Bytes::copy_from_slice(portal.as_bytes()),
            statement: Bytes::new(),
            rest: Bytes::from_static(&[0, 0, 0, 0, 0, 0]),
        },
        stmt.as_bytes(),
    )
}
pub(super) fn e(portal: &str, max: i32) -> Frame {
    frontend::execute(portal.as_bytes(), max)
}
pub(super) fn ds(name: &str) -> Frame {
    frontend::target_msg(b'D', Target::Statement, name.as_bytes())
}
pub(super) fn dp(name: &str) -> Frame {
    frontend::target_msg(b'D', Target::Portal, name.as_bytes())
}
pub(super) fn cs(name: &str) -> Frame {
    frontend::target_msg(b'C', Target::Statement, name.as_bytes())
}
pub(super) fn s() -> Frame {
    frontend::sync()
}
pub(super) fn h() -> Frame {
    Frame::new(b'H', &[])
}

/// Runs `client` through the engine in `mode` and directly; asserts the same bytes.
pub(super) fn same_as_direct(
    mode: PoolMode,
    bound: bool,
    replica: bool,
    client: &[Frame],
    schedule: &[u8],
) {
    let mut h = Harness::new(mode, bound, replica);
    h.run(client, schedule);
    let got = h.client_frames();
    let want = direct(client);
    assert_eq!(
        tags(&got),
        tags(&want),
        "through the engine vs directly ({mode:?}, bound {bound}, replica {replica}): {:?}",
        got.iter()
            .filter(|f| f.tag == b'E')
            .map(be_msg::error_info)
            .collect::<Vec<_>>()
    );
    assert_eq!(got, want);
    assert!(!h.closed);
}

mod property;
mod scripted;
