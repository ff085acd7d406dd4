//! What goes in and out of the engine: its configuration, what it reads from the proxy
//! for a call ([`Env`]), what a client message needs ([`Step`], [`Route`]), the events
//! the shell acts on ([`Event`]), the bytes it produced ([`Outbox`]), and why no backend
//! could be had ([`Refusal`]). Plain types, no logic beyond accessors.

use bytes::{Bytes, BytesMut};
use meridian_shared::config::PoolMode;
use meridian_sqlroute::{Analysis, Classifier, FunctionCatalog};
use std::sync::Arc;

use crate::cache::rules::Bracket;
use crate::cache::Plan;
use crate::error::ProxyError;
use crate::route::Which;
use crate::wire::Frame;

/// What the engine is told once, at login.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub mode: PoolMode,
    /// One backend for life, transparent (see the module doc).
    pub bound: bool,
    /// The process id and secret the client was given (`BackendKeyData`).
    pub client_key: (i32, i32),
    /// Learn commit LSNs for read-your-writes.
    pub learns_commits: bool,
    /// Largest result the cache stores.
    pub cache_max_entry: usize,
}

/// What the engine reads from the proxy for one call.
pub struct Env<'a> {
    pub classifier: &'a Classifier,
    pub catalog: &'a FunctionCatalog,
    /// Replica reads are possible now.
    pub replica_available: bool,
    /// The backends the session holds.
    pub held: (bool, bool),
    /// Whether a relation (by name, last part) is known unlogged: a replica cannot read it.
    pub unlogged: &'a (dyn Fn(&str) -> bool + Sync),
}

impl Env<'_> {
    pub(super) fn held(&self) -> Option<Which> {
        match self.held {
            (true, _) => Some(Which::Primary),
            (false, true) => Some(Which::Replica),
            _ => None,
        }
    }
}

/// What a client message needs.
#[derive(Debug)]
pub enum Step {
    /// Handled (answered or forwarded); read the next message.
    Done,
    /// The backend now answering must finish first: offer the same message again once
    /// [`Engine::is_waiting_on`] no longer names a backend.
    Wait,
    /// Make sure a backend of this kind is held, then call [`Engine::dispatch`].
    Route(Route),
    /// The client said goodbye.
    Terminate,
}

/// Where a message goes and what the engine learned about it.
#[derive(Debug, Clone)]
pub struct Route {
    pub target: Which,
    pub analysis: Option<Arc<Analysis>>,
}

/// Something the shell must do.
#[derive(Debug)]
pub enum Event {
    /// The session holds nothing on its backends: give them back (transaction pooling).
    Release,
    /// Drop this backend: its server ended it, or it cannot be trusted.
    Discard(Which),
    /// End the client connection once the output is written.
    Close,
    /// A client request was answered completely.
    Answered,
    /// A read being cached completed: store it.
    Store {
        plan: Plan,
        bracket: Bracket,
        messages: Bytes,
    },
    /// A capture grew past the cache's entry limit.
    TooLargeToCache,
    /// An error went to the client (its SQLSTATE).
    Error(String),
    /// These relations are unlogged (created so, or a replica refused to read them): the
    /// proxy's reads of them go to the primary from now on.
    Unlogged(Vec<String>),
    /// Handle this client message again, first: a read a replica refused (it touched an
    /// unlogged relation) before anything of its answer reached the client.
    Replay(Frame),
}

/// Bytes for the client and for each backend, written out by the shell.
#[derive(Debug, Default)]
pub struct Outbox {
    pub client: BytesMut,
    primary: BytesMut,
    replica: BytesMut,
}

impl Outbox {
    pub fn backend(&mut self, w: Which) -> &mut BytesMut {
        match w {
            Which::Primary => &mut self.primary,
            Which::Replica => &mut self.replica,
        }
    }
}

/// Why no backend could be had.
#[derive(Debug)]
pub enum Refusal {
    Proxy(ProxyError),
    /// The server's own `ErrorResponse` (a missing database, a refused login).
    Server(Frame),
}
