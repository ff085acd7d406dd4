//! Statements the proxy answers itself, in order behind what backends still owe: its own
//! `meridian.*` settings and `DEALLOCATE` of protocol-level statements (in both
//! protocols), the aborted-transaction answers of a transaction the proxy lost, and a
//! read answered from the regional cache.

use bytes::Bytes;
use meridian_sqlroute::TxEffect;

use super::io::{Env, Event};
use super::local::{self, LocalCmd};
use super::pipeline::Expect;
use super::tx::Tx;
use super::{analyze, Engine};
use crate::error::{ProxyError, Severity};
use crate::protocol::frontend::{FrontendMsg, Target};
use crate::wire::{self, Frame};

impl Engine {
    // ----- statements the proxy answers -----

    /// Runs a local command: the simple protocol's answer ends with ReadyForQuery.
    pub(super) fn run_local(&mut self, cmd: &LocalCmd, _portal: Option<&[u8]>, simple: bool) {
        if simple {
            if let Some(rd) = local::row_description(cmd) {
                self.client(&rd);
            }
        }
        let result = match cmd {
            LocalCmd::Meridian(c) => self.ryw.execute(c),
            LocalCmd::Deallocate(name) => {
                self.stmts.deallocate(name);
                Ok(vec![wire::command_complete("DEALLOCATE")])
            }
            LocalCmd::EndLostTransaction => {
                self.tx = Tx::Idle;
                Ok(vec![wire::command_complete("ROLLBACK")])
            }
        };
        match result {
            Ok(frames) => {
                for f in frames {
                    self.answer(f);
                }
                if simple {
                    self.pipe.synthetic(Expect::SyntheticReady);
                }
            }
            Err(e) => match self.tx.backend() {
                Some(w) => self.poison(w, &e, simple),
                None => {
                    self.events
                        .push_back(Event::Error(e.sqlstate().as_str().into()));
                    self.answer(e.to_frame(Severity::Error));
                    if self.tx.in_block() {
                        self.tx = Tx::Lost;
                    }
                    if simple {
                        self.pipe.synthetic(Expect::SyntheticReady);
                    } else {
                        self.pipe.skipping = true;
                    }
                }
            },
        }
        self.drain_synthetic();
    }

    /// The extended protocol on the proxy's own statements. True when `msg` was answered.
    pub(super) fn local_extended(&mut self, msg: &FrontendMsg) -> bool {
        match msg {
            FrontendMsg::Parse(p) => {
                let bound = self.cfg.bound;
                let stmts = &self.stmts;
                let Some(cmd) =
                    local::recognise(&p.query, |n| !bound && stmts.is_client_statement(n))
                else {
                    if !self.local.is_empty() {
                        self.local.forget_statement(&p.name);
                    }
                    return false;
                };
                self.stmts.close_statement(&p.name);
                self.local.prepare(p.name.clone(), cmd);
                self.answer(Frame::new(b'1', &[]));
            }
            _ if self.local.is_empty() => return false,
            FrontendMsg::Bind(b) => {
                if !self.local.bind(&b.portal, &b.statement) {
                    return false;
                }
                self.answer(Frame::new(b'2', &[]));
            }
            FrontendMsg::Describe(target, name) => {
                let cmd = match target {
                    Target::Statement => self.local.statement(name),
                    Target::Portal => self.local.portal(name),
                };
                let Some(cmd) = cmd.cloned() else {
                    return false;
                };
                if *target == Target::Statement {
                    self.answer(Frame::new(b't', &[0, 0]));
                }
                self.answer(local::row_description(&cmd).unwrap_or_else(|| Frame::new(b'n', &[])));
            }
            FrontendMsg::Execute { portal, .. } => {
                let Some(cmd) = self.local.portal(portal).cloned() else {
                    return false;
                };
                self.run_local(&cmd, Some(portal), false);
            }
            FrontendMsg::Close(target, name) => {
                let known = match target {
                    Target::Statement => self.local.forget_statement(name),
                    Target::Portal => self.local.forget_portal(name),
                };
                if known.is_none() {
                    return false;
                }
                self.answer(Frame::new(b'3', &[]));
            }
            _ => return false,
        }
        self.drain_synthetic();
        true
    }

    /// The transaction is lost: PostgreSQL's aborted-transaction answers, by the proxy.
    pub(super) fn answer_lost(&mut self, tx: TxEffect, extended: bool) {
        if matches!(tx, TxEffect::Commit | TxEffect::Rollback) {
            self.tx = Tx::Idle;
            self.answer(wire::command_complete("ROLLBACK"));
        } else {
            let e = ProxyError::TransactionLost;
            self.events
                .push_back(Event::Error(e.sqlstate().as_str().into()));
            self.answer(e.to_frame(Severity::Error));
            if extended {
                self.pipe.skipping = true;
            }
        }
        if !extended {
            self.pipe.synthetic(Expect::SyntheticReady);
        }
        self.drain_synthetic();
    }

    pub(super) fn lost_extended(&mut self, msg: &FrontendMsg, env: &Env) {
        match msg {
            FrontendMsg::Sync => {
                self.pipe.skipping = false;
                self.pipe.synthetic(Expect::SyntheticReady);
            }
            FrontendMsg::Flush => {}
            FrontendMsg::Parse(p)
                if matches!(
                    analyze(env, &p.query).tx_effect(),
                    TxEffect::Commit | TxEffect::Rollback
                ) =>
            {
                // As in an aborted transaction: COMMIT/ROLLBACK parse, and run as ROLLBACK.
                self.local
                    .prepare(p.name.clone(), LocalCmd::EndLostTransaction);
                self.answer(Frame::new(b'1', &[]));
            }
            _ => self.answer_lost(TxEffect::None, true),
        }
    }

    /// The cache answered a read: its messages and `ReadyForQuery`, in order.
    pub fn answer_cached(&mut self, messages: Bytes) {
        self.pipe.synthetic(Expect::Synthetic(Frame {
            tag: b'T',
            raw: messages,
        }));
        self.pipe.synthetic(Expect::SyntheticReady);
        self.drain_synthetic();
    }
}
