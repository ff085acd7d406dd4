//! The backend side of the engine: each backend message matched against what was
//! expected of that backend — forwarded, swallowed (the proxy's own queries), read (the
//! commit LSN, a cache fill's positions), or acted on (an error that skips to `Sync`, a
//! `ReadyForQuery` that ends a request and settles the transaction) — and the rules for
//! a backend the server ended.

use meridian_sqlroute::{Analysis, Deallocate};
use tracing::{debug, warn};

use super::backend_state::{BackendState, PARAMS_UNKNOWN};
use super::client_visible_parameter;
use super::io::Event;
use super::pipeline::{Expect, Internal};
use super::Engine;
use crate::error::SqlState;
use crate::error::{ProxyError, Severity};
use crate::protocol::backend::{self as be_msg, BackendKind, ErrorSeverity, TxStatus};
use crate::route::Which;
use crate::wire::{self, Frame};
use meridian_shared::config::PoolMode;
use meridian_shared::lsn::Lsn;

impl Engine {
    // ----- backend messages -----

    /// One message from backend `w`.
    pub fn on_backend(&mut self, w: Which, frame: &Frame, b: &mut BackendState) {
        let kind = BackendKind::of(frame);
        match kind {
            BackendKind::Notice => {
                if !matches!(self.pipe.head(), Some(Expect::Internal(_))) {
                    self.client(frame);
                }
                return;
            }
            BackendKind::ParameterStatus => {
                if let Some((name, value)) = be_msg::parameter_status(frame) {
                    b.observe_parameter(name, value);
                    if !self.logging_in {
                        let name = String::from_utf8_lossy(name);
                        let value = String::from_utf8_lossy(value);
                        let shown = client_visible_parameter(&name, &value);
                        self.client(&wire::parameter_status(&name, shown));
                    }
                }
                return;
            }
            BackendKind::Notification => {
                // A notification from this session's own backend names the process the
                // client knows as its own.
                match be_msg::notification_pid(frame) {
                    Some(pid) if pid == b.pid && pid != self.cfg.client_key.0 => {
                        let f = be_msg::with_notification_pid(frame, self.cfg.client_key.0);
                        self.client(&f);
                    }
                    _ => self.client(frame),
                }
                return;
            }
            _ => {}
        }
        if self.pipe.active() != Some(w) {
            return self.idle_backend_message(w, frame, kind);
        }
        self.drain_synthetic();
        let Some(head) = self.pipe.head() else {
            return;
        };
        let internal = matches!(head, Expect::Internal(_));
        let describe = matches!(head, Expect::Describe);
        let execute = matches!(head, Expect::Execute { .. });
        if kind != BackendKind::Error && kind != BackendKind::ReadyForQuery {
            if let Some(Expect::Query { answered, .. }) = self.pipe.head_mut() {
                *answered = true;
            }
        }
        if !internal && self.fill.is_some() {
            self.capture(frame);
        }
        match kind {
            BackendKind::Error => self.on_error(w, frame, b),
            BackendKind::ReadyForQuery => self.on_ready(w, frame, b),
            BackendKind::ParseComplete => {
                if let Some(Expect::Parse {
                    swallow,
                    client,
                    server,
                }) = self.pipe.pop()
                {
                    self.stmts.parse_done(client.as_deref(), server.as_deref());
                    if !swallow {
                        self.client(frame);
                    }
                }
            }
            BackendKind::CloseComplete => {
                if let Some(Expect::Close { swallow }) = self.pipe.pop() {
                    if !swallow {
                        self.client(frame);
                    }
                }
            }
            BackendKind::BindComplete => {
                self.pipe.pop();
                self.client(frame);
            }
            BackendKind::RowDescription | BackendKind::NoData if describe => {
                self.pipe.pop();
                self.client(frame);
            }
            BackendKind::CommandComplete
            | BackendKind::EmptyQuery
            | BackendKind::PortalSuspended
                if execute =>
            {
                if let Some(Expect::Execute {
                    analysis: Some(a), ..
                }) = self.pipe.pop()
                {
                    if kind == BackendKind::CommandComplete {
                        self.params.stage(a.clone());
                        self.settle_unpin(&a);
                    }
                }
                self.client(frame);
            }
            BackendKind::DataRow if internal => self.internal_row(frame),
            BackendKind::CopyInResponse => {
                self.copy_in = Some(w);
                if execute {
                    // The server ignores the Sync sent behind the COPY: the client sends
                    // another after CopyDone, and it must reach the server.
                    self.pipe.drop_syncs_behind_head();
                    self.pipe.batch = Some(w);
                }
                self.client(frame);
            }
            BackendKind::Other(tag) => {
                warn!(backend = ?w, tag = %(tag as char), "unexpected message from backend; dropping it");
                self.on_backend_ended(w, None);
            }
            _ if internal => {}
            _ => self.client(frame),
        }
        self.drain_synthetic();
    }

    /// A message from a backend that owes no answer.
    pub(super) fn idle_backend_message(&mut self, w: Which, frame: &Frame, kind: BackendKind) {
        if kind == BackendKind::Error && be_msg::error_info(frame).severity == ErrorSeverity::Fatal
        {
            // The server is ending the session (a timeout, an administrator, a shutdown).
            return self.on_backend_ended(w, Some(frame));
        }
        warn!(backend = ?w, tag = %(frame.tag as char), "unexpected message from an idle backend; dropping it");
        self.events.push_back(Event::Discard(w));
    }

    pub(super) fn internal_row(&mut self, frame: &Frame) {
        let lsn = crate::backend::decode_text_row(frame)
            .ok()
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|t| t.parse::<Lsn>().ok());
        match self.pipe.head() {
            Some(Expect::Internal(Internal::CommitLsn)) => {
                self.ryw.last_commit_lsn = self.ryw.last_commit_lsn.max(lsn);
            }
            Some(Expect::Internal(Internal::ReplayLsn { after })) => {
                let after = *after;
                if let Some(fill) = self.fill.as_mut() {
                    fill.position(after, lsn);
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_error(&mut self, w: Which, frame: &Frame, b: &mut BackendState) {
        let info = be_msg::error_info(frame);
        if info.severity == ErrorSeverity::Fatal {
            return self.on_backend_ended(w, Some(frame));
        }
        self.copy_in = None;
        let Some(head) = self.pipe.head_mut() else {
            return;
        };
        match head {
            Expect::Query {
                failed,
                replay,
                answered,
                analysis,
            } => {
                if w == Which::Replica && is_unlogged_refusal(&info) {
                    if let Some(a) = analysis {
                        let tables = a.tables().iter().map(|t| last_part(t)).collect();
                        self.events.push_back(Event::Unlogged(tables));
                    }
                    if replay.is_some() && !*answered {
                        // Nothing reached the client: run it again on the primary.
                        *failed = true;
                        return;
                    }
                }
                *failed = true;
                *answered = true;
                self.unit_failed = true;
            }
            Expect::Sync => self.unit_failed = true,
            Expect::Internal(Internal::Prelude { login: true }) => {
                self.login_error = Some(frame.clone());
                return;
            }
            Expect::Internal(Internal::Prelude { login: false }) => {
                warn!(code = %info.code, message = %info.message, "replaying session parameters failed");
                b.params_hash = PARAMS_UNKNOWN;
                return;
            }
            Expect::Internal(Internal::ReplayLsn { .. }) => {
                if let Some(fill) = self.fill.as_mut() {
                    fill.spoil();
                }
                return;
            }
            Expect::Internal(Internal::Begin) => {
                // The deferred BEGIN failed: the client's statement behind it tells the rest.
                self.unit_failed = true;
            }
            Expect::Internal(_) => {
                debug!(code = %info.code, message = %info.message, "internal query failed");
                return;
            }
            Expect::Poison { error, simple } => {
                let (error, simple) = (error.clone(), *simple);
                self.client(&error);
                self.unit_failed = true;
                if !simple {
                    self.prune(b);
                }
                return;
            }
            Expect::Execute {
                analysis: Some(a), ..
            } if w == Which::Replica && is_unlogged_refusal(&info) => {
                let tables = a.tables().iter().map(|t| last_part(t)).collect();
                self.events.push_back(Event::Unlogged(tables));
                self.unit_failed = true;
                self.prune(b);
            }
            Expect::Bind { server } | Expect::Execute { server, .. } => {
                if info.code == SqlState::FeatureNotSupported.as_str()
                    && info.message.contains("cached plan must not change")
                {
                    if let Some(s) = server.clone() {
                        b.stale.insert(s);
                    }
                }
                self.unit_failed = true;
                self.prune(b);
            }
            Expect::Synthetic(_) | Expect::SyntheticReady | Expect::SyntheticParse { .. } => {}
            Expect::Parse { .. } | Expect::Describe | Expect::Close { .. } => {
                self.unit_failed = true;
                self.prune(b);
            }
        }
        self.events.push_back(Event::Error(info.code));
        self.client(frame);
    }

    /// The server skips everything up to the next Sync after an extended-protocol error.
    pub(super) fn prune(&mut self, b: &mut BackendState) {
        let pruned = self.pipe.prune_to_sync();
        for (client, server) in &pruned.parses {
            self.stmts
                .parse_failed(client.as_deref(), server.as_deref(), b);
        }
        if self.fill.is_some() {
            if let Some(f) = self.fill.as_mut() {
                f.spoil();
            }
        }
    }

    pub(super) fn on_ready(&mut self, w: Which, frame: &Frame, b: &mut BackendState) {
        let status = be_msg::ready_status(frame);
        b.tx_status = status;
        let item = loop {
            match self.pipe.pop() {
                Some(e) if e.is_terminal() => break e,
                Some(other) => debug!(?other, "ReadyForQuery answered an unanswered message"),
                None => return,
            }
        };
        match item {
            Expect::Internal(Internal::Prelude { login: true }) => match self.login_error.take() {
                Some(e) => self.fatal_frame(&e),
                None => self.login_reply(b),
            },
            Expect::Internal(Internal::ReplayLsn { after: true }) => self.finish_fill(),
            Expect::Internal(Internal::ReplayLsn { after: false }) => {
                if let Some(fill) = self.fill.as_mut() {
                    fill.opened();
                }
            }
            Expect::Internal(Internal::Begin) => self.tx.on_ready(w, status),
            Expect::Internal(_) => {
                // The backend's status is the transaction's, whoever asked.
                if self.tx.backend() == Some(w) || status != TxStatus::Idle {
                    self.tx.on_ready(w, status);
                }
            }
            Expect::Query {
                replay: Some(frame),
                answered: false,
                failed: true,
                ..
            } => {
                // The replica refused the read before answering: the client gets the
                // primary's answer instead (the Query is planned again).
                self.events.push_back(Event::Replay(frame));
            }
            Expect::Query {
                analysis, failed, ..
            } => {
                if let (Some(a), false) = (&analysis, failed) {
                    self.params.stage(a.clone());
                    self.settle_unpin(a);
                }
                self.client_ready(w, status, frame, b);
            }
            _ => self.client_ready(w, status, frame, b),
        }
        self.release_if_idle();
    }

    /// The ReadyForQuery ending a client's request.
    pub(super) fn client_ready(
        &mut self,
        w: Which,
        status: TxStatus,
        frame: &Frame,
        b: &mut BackendState,
    ) {
        let was_failed = self.tx.status() == TxStatus::Failed;
        self.tx.on_ready(w, status);
        if status == TxStatus::Idle {
            let committed = !std::mem::take(&mut self.unit_failed) && !was_failed;
            if self.params.settle(committed, Some(b)).reset_all {
                self.ryw.reset_all();
            }
            self.stmts.end_of_transaction();
            if std::mem::take(&mut self.commit_pending) && w == Which::Primary {
                self.queue_commit_lsn(w);
            }
        }
        self.client(frame);
        self.events.push_back(Event::Answered);
    }

    /// `DISCARD ALL` completed: nothing of the session is left on the server to pin.
    pub(super) fn settle_unpin(&mut self, a: &Analysis) {
        let discard_all = a
            .statements
            .iter()
            .any(|s| s.session.reset_all && matches!(s.session.deallocate, Some(Deallocate::All)));
        if discard_all && a.pins().is_none() {
            self.pin = None;
        }
    }

    pub(super) fn release_if_idle(&mut self) {
        if self.cfg.mode == PoolMode::Transaction
            && !self.cfg.bound
            && self.pin.is_none()
            && self.is_idle()
            && self.pipe.batch.is_none()
            && !self.pipe.skipping
        {
            self.events.push_back(Event::Release);
        }
    }

    /// Backend `w` ended (`fatal`: the server's last word). Where the session had state
    /// there that cannot move (bound session, open transaction, pinned state, COPY, the
    /// login), the client's connection ends with the server's error, as directly;
    /// otherwise what was waiting on it fails and the session goes on elsewhere.
    pub fn on_backend_ended(&mut self, w: Which, fatal: Option<&Frame>) {
        self.events.push_back(Event::Discard(w));
        // The server ends the connection over a protocol violation (the client's own
        // doing, e.g. a Query during COPY): the client's connection ends with it.
        let protocol_violation = fatal
            .is_some_and(|f| be_msg::error_info(f).code == SqlState::ProtocolViolation.as_str());
        let unmovable = self.cfg.bound
            || protocol_violation
            || self.logging_in
            || self.tx.backend() == Some(w)
            || (w == Which::Primary && self.pin.is_some())
            || self.copy_in == Some(w);
        if unmovable {
            let in_tx = self.tx.in_block();
            match fatal {
                Some(f) => self.fatal_frame(f),
                None => self.fatal(&ProxyError::BackendLost { in_tx }),
            }
            return;
        }
        self.fill = None;
        if self.pipe.active() != Some(w) {
            return;
        }
        let pending = self.pipe.take_all();
        if !pending.iter().any(Expect::is_client) {
            debug!(backend = ?w, "idle backend ended; dropped");
            return;
        }
        let mut first = Some(match fatal {
            Some(f) => be_msg::downgrade_to_error(f),
            None => ProxyError::BackendLost { in_tx: false }.to_frame(Severity::Error),
        });
        let mut trailing = false;
        for e in pending {
            match e {
                Expect::Query { .. } | Expect::Sync | Expect::Poison { simple: true, .. } => {
                    let error = first.take().unwrap_or_else(|| {
                        ProxyError::BackendLost { in_tx: false }.to_frame(Severity::Error)
                    });
                    self.client(&error);
                    self.client(&wire::ready_for_query(self.tx.status().byte()));
                    trailing = false;
                }
                e if e.is_client() && !e.is_synthetic() => trailing = true,
                _ => {}
            }
        }
        if let Some(error) = first {
            self.client(&error);
            trailing = true;
        }
        if trailing {
            self.pipe.skipping = true;
        }
        self.unit_failed = false;
        self.events.push_back(Event::Answered);
    }
}

/// The error a hot standby raises for a read of an unlogged (or another session's
/// temporary) relation.
fn is_unlogged_refusal(info: &be_msg::ErrorInfo) -> bool {
    info.code == SqlState::FeatureNotSupported.as_str()
        && info.message.contains("unlogged relations during recovery")
}

fn last_part(name: &str) -> String {
    name.rsplit('.').next().unwrap_or(name).to_owned()
}
