//! Prepared statements and portals of one client, and what must be sent to a backend so
//! that a `Bind`/`Describe` finds the statement there.
//!
//! Two modes:
//! - **transparent** (a session bound to one backend for life): the client's names go to
//!   the server unchanged; the server owns them (`pg_prepared_statements` shows them,
//!   `DEALLOCATE` and duplicate names behave as directly). The proxy only remembers each
//!   statement's analysis for routing and commit points.
//! - **virtual** (a session that moves between backends): a client's statement is
//!   prepared on a backend under a server name derived from its text and parameter types
//!   (`mrd_<hash>`), shared by every client preparing the same statement on that
//!   connection. A `Parse` of a statement the backend already holds is answered by the
//!   proxy; a `Bind`/`Describe` on a backend lacking it is preceded by an injected
//!   `Parse`. A client's `Close` forgets its name (the server keeps the statement for
//!   reuse). `Parse` of a name in use is refused with 42P05 as the server would.
//!
//! Portals are remembered by name (with the statement they run) so that `Execute` knows
//! what it executes; they end with their transaction, as on the server.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use meridian_sqlroute::Analysis;

use super::backend_state::BackendState;
use crate::protocol::frontend::{self, Bind, Parse, Target};
use crate::wire::Frame;

/// A statement the client prepared (named or unnamed).
#[derive(Debug)]
pub struct Stmt {
    pub query: Bytes,
    pub param_types: Bytes,
    pub hash: u64,
    /// The statement's name on the backends (the client's own name when transparent).
    pub server_name: Bytes,
    pub analysis: Arc<Analysis>,
}

/// What to do with a client's `Parse`.
#[derive(Debug, PartialEq)]
pub enum ParsePlan {
    /// Send `frames` (the last is the Parse answering the client; any before it are
    /// swallowed); the Parse creates `client` on the server as `server`.
    Send {
        frames: Vec<Frame>,
        client: Bytes,
        server: Bytes,
    },
    /// The backend holds the statement already: answer `ParseComplete` ourselves.
    AlreadyPrepared,
    /// The name is in use: 42P05.
    Duplicate(Bytes),
}

/// What to send for a client's `Bind` or `Describe` of a statement.
#[derive(Debug, PartialEq)]
pub struct Prepared {
    /// Swallowed messages that make the backend hold the statement, first.
    pub inject: Vec<Frame>,
    /// The client's message, renamed if needed.
    pub frame: Frame,
    /// The statement's server name (`None`: unknown to the proxy; the server answers).
    pub server: Option<Bytes>,
}

#[derive(Debug, Default)]
pub struct Statements {
    transparent: bool,
    named: HashMap<Bytes, Arc<Stmt>>,
    unnamed: Option<Arc<Stmt>>,
    portals: HashMap<Bytes, Arc<Stmt>>,
    /// The unnamed portal (the common case: no hashing).
    unnamed_portal: Option<Arc<Stmt>>,
    /// Client names whose `Parse` the server has not answered yet (it may still fail),
    /// with the number of the batch (counted in Syncs) that carried it.
    in_flight: HashMap<Bytes, u64>,
    /// Server names this session's `Parse` is creating, by batch number (as `in_flight`).
    server_in_flight: HashMap<Bytes, u64>,
    /// The current batch's number.
    batch: u64,
}

/// The hash behind a statement's server-side name. Backends are shared, so two texts
/// with one hash would run each other's statement: the hash is keyed at random once
/// per process, which leaves a client no way to compute a collision for another's text.
fn stmt_hash(query: &[u8], types: &[u8]) -> u64 {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    KEY.get_or_init(RandomState::new).hash_one((query, types))
}

impl Statements {
    pub fn new(transparent: bool) -> Statements {
        Statements {
            transparent,
            ..Default::default()
        }
    }

    pub fn lookup(&self, name: &[u8]) -> Option<Arc<Stmt>> {
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.named.get(name).cloned()
        }
    }

    /// The statement a portal runs.
    pub fn portal(&self, name: &[u8]) -> Option<Arc<Stmt>> {
        if name.is_empty() {
            self.unnamed_portal.clone()
        } else {
            self.portals.get(name).cloned()
        }
    }

    fn set_portal(&mut self, name: &Bytes, stmt: Option<Arc<Stmt>>) {
        match (name.is_empty(), stmt) {
            (true, s) => self.unnamed_portal = s,
            (false, Some(s)) => {
                self.portals.insert(name.clone(), s);
            }
            (false, None) => {
                self.portals.remove(name);
            }
        }
    }

    /// True if `name` is a statement the client prepared through the protocol.
    pub fn is_client_statement(&self, name: &[u8]) -> bool {
        !name.is_empty() && self.named.contains_key(name)
    }

    /// A client's `Parse` going to backend `b`.
    pub fn parse(
        &mut self,
        p: &Parse,
        frame: &Frame,
        analysis: Arc<Analysis>,
        b: &mut BackendState,
    ) -> ParsePlan {
        if !p.name.is_empty() && self.named.contains_key(&p.name) && !self.transparent {
            return ParsePlan::Duplicate(p.name.clone());
        }
        // Transparent statements keep the client's names: no hash needed.
        let hash = if self.transparent {
            0
        } else {
            stmt_hash(&p.query, &p.param_types)
        };
        let server_name = self.server_name(p, hash);
        let stmt = Arc::new(Stmt {
            query: p.query.clone(),
            param_types: p.param_types.clone(),
            hash,
            server_name: server_name.clone(),
            analysis,
        });
        if p.name.is_empty() {
            self.unnamed = Some(stmt);
            if !self.transparent {
                b.unnamed = Some(hash);
            }
            return ParsePlan::Send {
                frames: vec![frame.clone()],
                client: Bytes::new(),
                server: Bytes::new(),
            };
        }
        self.named.insert(p.name.clone(), stmt.clone());
        self.in_flight.insert(p.name.clone(), self.batch);
        if self.transparent {
            return ParsePlan::Send {
                frames: vec![frame.clone()],
                client: p.name.clone(),
                server: server_name,
            };
        }
        let mut frames = Vec::new();
        if b.stale.remove(&server_name) {
            frames.push(frontend::target_msg(b'C', Target::Statement, &server_name));
        } else if b.prepared.contains(&server_name) {
            return ParsePlan::AlreadyPrepared;
        }
        b.prepared.insert(server_name.clone());
        self.server_in_flight
            .insert(server_name.clone(), self.batch);
        frames.push(frontend::parse(
            &server_name,
            &stmt.query,
            &stmt.param_types,
        ));
        ParsePlan::Send {
            frames,
            client: p.name.clone(),
            server: server_name,
        }
    }

    /// Messages that make backend `b` hold `stmt` (swallowed answers).
    fn ensure(&mut self, stmt: &Stmt, b: &mut BackendState) -> Vec<Frame> {
        if self.transparent {
            return Vec::new();
        }
        if stmt.server_name.is_empty() {
            if b.unnamed == Some(stmt.hash) {
                return Vec::new();
            }
            b.unnamed = Some(stmt.hash);
            return vec![frontend::parse(b"", &stmt.query, &stmt.param_types)];
        }
        let mut out = Vec::new();
        if b.stale.remove(&stmt.server_name) {
            out.push(frontend::target_msg(
                b'C',
                Target::Statement,
                &stmt.server_name,
            ));
        } else if b.prepared.contains(&stmt.server_name) {
            return out;
        }
        b.prepared.insert(stmt.server_name.clone());
        self.server_in_flight
            .insert(stmt.server_name.clone(), self.batch);
        out.push(frontend::parse(
            &stmt.server_name,
            &stmt.query,
            &stmt.param_types,
        ));
        out
    }

    /// A client's `Bind` going to backend `b`; remembers the portal.
    pub fn bind(&mut self, m: &Bind, frame: &Frame, b: &mut BackendState) -> Prepared {
        let Some(stmt) = self.lookup(&m.statement) else {
            self.set_portal(&m.portal, None);
            return Prepared {
                inject: Vec::new(),
                frame: frame.clone(),
                server: None,
            };
        };
        let inject = self.ensure(&stmt, b);
        let frame = if stmt.server_name == m.statement {
            frame.clone()
        } else {
            frontend::bind_renamed(m, &stmt.server_name)
        };
        let server = Some(stmt.server_name.clone());
        self.set_portal(&m.portal, Some(stmt));
        Prepared {
            inject,
            frame,
            server,
        }
    }

    /// A client's `Describe` of statement `name` going to backend `b`.
    pub fn describe_statement(
        &mut self,
        name: &Bytes,
        frame: &Frame,
        b: &mut BackendState,
    ) -> Prepared {
        let Some(stmt) = self.lookup(name) else {
            return Prepared {
                inject: Vec::new(),
                frame: frame.clone(),
                server: None,
            };
        };
        let inject = self.ensure(&stmt, b);
        let frame = if stmt.server_name == *name {
            frame.clone()
        } else {
            frontend::target_msg(b'D', Target::Statement, &stmt.server_name)
        };
        Prepared {
            inject,
            frame,
            server: Some(stmt.server_name.clone()),
        }
    }

    /// A client's `Close` of statement `name`: forgets it. Returns true when the server
    /// must see the Close (transparent mode, the unnamed statement, an unknown name).
    pub fn close_statement(&mut self, name: &[u8]) -> bool {
        if name.is_empty() {
            self.unnamed = None;
            return true;
        }
        self.named.remove(name).is_none() || self.transparent
    }

    /// A client's `Close` of a portal.
    pub fn close_portal(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed_portal = None;
        } else {
            self.portals.remove(name);
        }
    }

    /// SQL `DEALLOCATE name` of a protocol-level statement (virtual mode): forgotten
    /// here, answered by the proxy.
    pub fn deallocate(&mut self, name: &[u8]) -> bool {
        !self.transparent && self.named.remove(name).is_some()
    }

    /// The server is about to drop every prepared statement of backend `b` (`DEALLOCATE
    /// ALL`, `DISCARD ALL`): the client's names are gone; the server names are treated
    /// as stale (closed before reuse), which is right whether or not the command succeeds.
    pub fn forget_all(&mut self, b: Option<&mut BackendState>) {
        self.named.clear();
        self.unnamed = None;
        self.portals.clear();
        self.unnamed_portal = None;
        if let Some(b) = b {
            let prepared = std::mem::take(&mut b.prepared);
            b.stale.extend(prepared);
            b.unnamed = None;
        }
    }

    fn server_name(&self, p: &Parse, hash: u64) -> Bytes {
        if self.transparent || p.name.is_empty() {
            p.name.clone()
        } else {
            Bytes::from(format!("mrd_{hash:016x}"))
        }
    }

    /// True if `name`'s `Parse` went out in an earlier batch and is still unanswered: a
    /// message naming it must wait, since whether the name exists depends on that answer
    /// (which the earlier batch's Sync makes the server send). Within one batch the
    /// server skips everything after a failed Parse, so no waiting is needed there.
    pub fn in_flight_before(&self, name: &[u8]) -> bool {
        self.in_flight.get(name).is_some_and(|b| *b < self.batch)
    }

    fn server_in_flight_before(&self, server: &[u8]) -> bool {
        self.server_in_flight
            .get(server)
            .is_some_and(|b| *b < self.batch)
    }

    /// A client's `Parse` must wait: its name, or the server-side statement it would
    /// share, is being created by a `Parse` of an earlier batch still unanswered.
    pub fn parse_must_wait(&self, p: &Parse) -> bool {
        if self.transparent || (self.in_flight.is_empty() && self.server_in_flight.is_empty()) {
            return false;
        }
        let server = self.server_name(p, stmt_hash(&p.query, &p.param_types));
        self.in_flight_before(&p.name) || self.server_in_flight_before(&server)
    }

    /// A client's `Bind`/`Describe` of statement `name` must wait, for the same reason.
    pub fn use_must_wait(&self, name: &[u8]) -> bool {
        if self.transparent || (self.in_flight.is_empty() && self.server_in_flight.is_empty()) {
            return false;
        }
        self.in_flight_before(name)
            || self
                .lookup(name)
                .is_some_and(|s| self.server_in_flight_before(&s.server_name))
    }

    /// A Sync went out: later messages belong to the next batch.
    pub fn next_batch(&mut self) {
        self.batch += 1;
    }

    /// The server answered a `Parse` with `ParseComplete`.
    pub fn parse_done(&mut self, client: Option<&[u8]>, server: Option<&[u8]>) {
        // Unnamed statements are never tracked: nothing to look up (and hash).
        if let Some(c) = client.filter(|c| !c.is_empty()) {
            self.in_flight.remove(c);
        }
        if let Some(s) = server.filter(|s| !s.is_empty()) {
            self.server_in_flight.remove(s);
        }
    }

    /// A `Parse` failed or never ran: the statement does not exist (`server`: nor its
    /// server-side name on backend `b`).
    pub fn parse_failed(
        &mut self,
        client: Option<&[u8]>,
        server: Option<&[u8]>,
        b: &mut BackendState,
    ) {
        if let Some(client) = client {
            self.in_flight.remove(client);
            if client.is_empty() {
                self.unnamed = None;
            } else {
                self.named.remove(client);
            }
        }
        match server {
            Some(b"") => b.unnamed = None,
            Some(s) => {
                b.prepared.remove(s);
                self.server_in_flight.remove(s);
            }
            None => {}
        }
    }

    /// The transaction ended: its portals are gone.
    pub fn end_of_transaction(&mut self) {
        if !self.portals.is_empty() {
            self.portals.clear();
        }
        self.unnamed_portal = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_sqlroute::Classifier;

    fn msg(name: &'static [u8], sql: &'static [u8]) -> (Parse, Frame) {
        let frame = frontend::parse(name, sql, &[0, 0]);
        match frontend::FrontendMsg::decode(&frame) {
            frontend::FrontendMsg::Parse(p) => (p, frame),
            other => panic!("{other:?}"),
        }
    }

    fn bind(portal: &'static [u8], stmt: &'static [u8]) -> (Bind, Frame) {
        let b = Bind {
            portal: Bytes::from_static(portal),
            statement: Bytes::from_static(stmt),
            rest: Bytes::from_static(&[0, 0, 0, 0, 0, 0]),
        };
        let f = frontend::bind_renamed(&b, stmt);
        (b, f)
    }

    fn analysis(sql: &str) -> Arc<Analysis> {
        Classifier::new(0).analyze(sql)
    }

    #[test]
    fn virtual_statements_are_shared_and_reprepared_on_another_backend() {
        let mut s = Statements::new(false);
        let mut primary = BackendState::new(1, vec![]);
        let mut replica = BackendState::new(2, vec![]);
        let (p, f) = msg(b"s1", b"SELECT 1");
        let ParsePlan::Send { frames, server, .. } =
            s.parse(&p, &f, analysis("SELECT 1"), &mut primary)
        else {
            panic!("first parse is sent");
        };
        assert!(server.starts_with(b"mrd_"));
        assert_eq!(frames.len(), 1);
        // A second client name for the same text on the same backend: answered locally.
        let (p2, f2) = msg(b"s2", b"SELECT 1");
        assert_eq!(
            s.parse(&p2, &f2, analysis("SELECT 1"), &mut primary),
            ParsePlan::AlreadyPrepared
        );
        // The same name again: 42P05.
        assert!(matches!(
            s.parse(&p, &f, analysis("SELECT 1"), &mut primary),
            ParsePlan::Duplicate(_)
        ));
        // Bind on the replica injects the Parse and renames.
        let (b, bf) = bind(b"", b"s1");
        let out = s.bind(&b, &bf, &mut replica);
        assert_eq!(out.inject.len(), 1);
        assert_eq!(out.server.as_ref(), Some(&server));
        assert!(replica.prepared.contains(&server));
        // ... and not twice.
        assert!(s.bind(&b, &bf, &mut replica).inject.is_empty());
        assert!(s.portal(b"").is_some());
    }

    #[test]
    fn close_forgets_the_name_but_keeps_the_server_statement() {
        let mut s = Statements::new(false);
        let mut b = BackendState::new(1, vec![]);
        let (p, f) = msg(b"s1", b"SELECT 1");
        s.parse(&p, &f, analysis("SELECT 1"), &mut b);
        assert!(!s.close_statement(b"s1"), "answered by the proxy");
        assert!(s.lookup(b"s1").is_none());
        assert_eq!(b.prepared.len(), 1);
        // Re-preparing the name works and needs nothing sent.
        assert_eq!(
            s.parse(&p, &f, analysis("SELECT 1"), &mut b),
            ParsePlan::AlreadyPrepared
        );
    }

    #[test]
    fn deallocate_all_makes_server_statements_stale_and_a_reparse_closes_first() {
        let mut s = Statements::new(false);
        let mut b = BackendState::new(1, vec![]);
        let (p, f) = msg(b"s1", b"SELECT 1");
        s.parse(&p, &f, analysis("SELECT 1"), &mut b);
        s.forget_all(Some(&mut b));
        assert!(s.lookup(b"s1").is_none());
        let ParsePlan::Send { frames, .. } = s.parse(&p, &f, analysis("SELECT 1"), &mut b) else {
            panic!("sent again");
        };
        assert_eq!(frames.len(), 2, "Close then Parse");
        assert_eq!(frames[0].tag, b'C');
        assert_eq!(frames[1].tag, b'P');
    }

    #[test]
    fn a_stale_plan_is_closed_and_prepared_again_before_the_next_bind() {
        let mut s = Statements::new(false);
        let mut b = BackendState::new(1, vec![]);
        let (p, f) = msg(b"s1", b"SELECT * FROM t");
        let ParsePlan::Send { server, .. } = s.parse(&p, &f, analysis("SELECT * FROM t"), &mut b)
        else {
            panic!()
        };
        b.stale.insert(server);
        let (bm, bf) = bind(b"", b"s1");
        let out = s.bind(&bm, &bf, &mut b);
        assert_eq!(
            out.inject.iter().map(|f| f.tag).collect::<Vec<_>>(),
            vec![b'C', b'P']
        );
    }

    #[test]
    fn transparent_statements_keep_their_names() {
        let mut s = Statements::new(true);
        let mut b = BackendState::new(1, vec![]);
        let (p, f) = msg(b"_pg3_0", b"SELECT 1");
        let ParsePlan::Send { frames, server, .. } = s.parse(&p, &f, analysis("SELECT 1"), &mut b)
        else {
            panic!()
        };
        assert_eq!(frames, vec![f.clone()]);
        assert_eq!(&server[..], b"_pg3_0");
        // The server decides about duplicates.
        assert!(matches!(
            s.parse(&p, &f, analysis("SELECT 1"), &mut b),
            ParsePlan::Send { .. }
        ));
        let (bm, bf) = bind(b"", b"_pg3_0");
        let out = s.bind(&bm, &bf, &mut b);
        assert!(out.inject.is_empty());
        assert_eq!(out.frame, bf);
        assert!(s.close_statement(b"_pg3_0"), "the server sees the Close");
        assert!(!s.deallocate(b"_pg3_0"), "the server runs DEALLOCATE");
    }

    #[test]
    fn a_failed_parse_is_forgotten_on_both_sides() {
        let mut s = Statements::new(false);
        let mut b = BackendState::new(1, vec![]);
        let (p, f) = msg(b"s1", b"SELEC 1");
        let ParsePlan::Send { client, server, .. } = s.parse(&p, &f, analysis("SELEC 1"), &mut b)
        else {
            panic!()
        };
        s.parse_failed(Some(&client), Some(&server), &mut b);
        assert!(s.lookup(b"s1").is_none());
        assert!(b.prepared.is_empty());
    }
}
