//! Test support shared by the engine's and the session's tests: [`Model`], a small
//! PostgreSQL protocol responder that fails loudly (panics) on anything it does not know.

use std::collections::{HashMap, VecDeque};

use crate::protocol::frontend::{FrontendMsg, Target};
use crate::wire::{self, Frame};

#[derive(Default)]
pub struct Portal {
    text: String,
    rows_left: Option<usize>,
}

/// A PostgreSQL-like responder over a tiny language: `select ...` returns three rows,
/// `insert ...` one tag, `begin`/`commit`/`rollback`, `set ...`, `deallocate all`,
/// `discard all`; any text containing `fail` fails when executed, `badparse` when parsed.
pub struct Model {
    pub statements: HashMap<Vec<u8>, (String, u16)>,
    pub portals: HashMap<Vec<u8>, Portal>,
    pub tx: u8,
    pub skipping: bool,
    /// Extended messages received since the last Sync (an open implicit transaction).
    pub in_batch: bool,
    pub out: VecDeque<Frame>,
    pub received: usize,
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    pub fn new() -> Model {
        Model {
            statements: HashMap::new(),
            portals: HashMap::new(),
            tx: b'I',
            skipping: false,
            in_batch: false,
            out: VecDeque::new(),
            received: 0,
        }
    }

    fn error(&mut self, code: &str, message: &str) {
        self.out
            .push_back(wire::error_response("ERROR", code, message));
        if self.tx == b'T' {
            self.tx = b'E';
        }
    }

    /// Runs one statement; false when it failed.
    fn run(&mut self, sql: &str, max_rows: i32, portal: Option<&[u8]>) -> bool {
        let sql = sql.trim();
        if self.tx == b'E' && !(sql.starts_with("commit") || sql.starts_with("rollback")) {
            self.error(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            );
            return false;
        }
        if sql.contains("fail") {
            self.error("22012", "division by zero");
            return false;
        }
        let tag = if sql.is_empty() {
            self.out.push_back(Frame::new(b'I', &[]));
            return true;
        } else if sql.starts_with("copy") {
            // COPY is answered by hand in the tests that use it.
            return true;
        } else if sql.starts_with("select") {
            if portal.is_none() {
                self.out.push_back(wire::row_description_text("c"));
            }
            let left = match portal {
                Some(p) => self
                    .portals
                    .get_mut(p)
                    .and_then(|p| p.rows_left.as_mut())
                    .map(|l| *l)
                    .unwrap_or(3),
                None => 3,
            };
            let n = if max_rows > 0 {
                left.min(max_rows as usize)
            } else {
                left
            };
            for i in 0..n {
                self.out
                    .push_back(wire::data_row_text(&(3 - left + i + 1).to_string()));
            }
            if let Some(p) = portal.and_then(|p| self.portals.get_mut(p)) {
                p.rows_left = Some(left - n);
            }
            if left - n > 0 {
                self.out.push_back(Frame::new(b's', &[]));
                return true;
            }
            format!("SELECT {n}")
        } else if sql.starts_with("insert") {
            "INSERT 0 1".to_owned()
        } else if sql.starts_with("begin") {
            self.tx = b'T';
            "BEGIN".to_owned()
        } else if sql.starts_with("commit") {
            let failed = self.tx == b'E';
            self.tx = b'I';
            if failed { "ROLLBACK" } else { "COMMIT" }.to_owned()
        } else if sql.starts_with("rollback") {
            self.tx = b'I';
            "ROLLBACK".to_owned()
        } else if sql.starts_with("set") || sql.starts_with("reset") {
            "SET".to_owned()
        } else if sql.starts_with("deallocate all") {
            self.statements.clear();
            "DEALLOCATE ALL".to_owned()
        } else if sql.starts_with("discard all") {
            self.statements.clear();
            self.portals.clear();
            "DISCARD ALL".to_owned()
        } else {
            panic!("model server: unknown statement {sql:?}");
        };
        self.out.push_back(wire::command_complete(&tag));
        true
    }

    pub fn handle(&mut self, f: &Frame) {
        self.received += 1;
        let msg = FrontendMsg::decode(f);
        if self.skipping && !matches!(msg, FrontendMsg::Sync) {
            return;
        }
        match msg {
            FrontendMsg::Query(text) if text_of(&text).starts_with("copy") => {}
            FrontendMsg::CopyData | FrontendMsg::CopyDone | FrontendMsg::CopyFail => {}
            FrontendMsg::Query(text) => {
                let text = text_of(&text);
                let implicit = self.tx == b'I';
                for stmt in text.split(';').filter(|s| !s.trim().is_empty()) {
                    if !self.run(stmt, 0, None) {
                        break;
                    }
                }
                if text.trim().is_empty() {
                    self.run("", 0, None);
                }
                if implicit && self.tx == b'E' {
                    self.tx = b'I';
                }
                self.out.push_back(wire::ready_for_query(self.tx));
            }
            FrontendMsg::Parse(p) => {
                self.in_batch = true;
                let nparams = u16::from_be_bytes([p.param_types[0], p.param_types[1]]);
                if !p.name.is_empty() && self.statements.contains_key(&p.name[..]) {
                    let name = String::from_utf8_lossy(&p.name).into_owned();
                    self.extended_error(
                        "42P05",
                        &format!("prepared statement \"{name}\" already exists"),
                    );
                } else if text_of(&p.query).contains("badparse") {
                    self.extended_error("42601", "syntax error");
                } else {
                    self.statements
                        .insert(p.name.to_vec(), (text_of(&p.query), nparams));
                    self.out.push_back(Frame::new(b'1', &[]));
                }
            }
            FrontendMsg::Bind(b) => {
                self.in_batch = true;
                match self.statements.get(&b.statement[..]) {
                    Some((text, _)) => {
                        let text = text.clone();
                        self.portals.insert(
                            b.portal.to_vec(),
                            Portal {
                                text,
                                rows_left: None,
                            },
                        );
                        self.out.push_back(Frame::new(b'2', &[]));
                    }
                    None => {
                        let name = String::from_utf8_lossy(&b.statement).into_owned();
                        self.extended_error(
                            "26000",
                            &format!("prepared statement \"{name}\" does not exist"),
                        );
                    }
                }
            }
            FrontendMsg::Describe(t, name) => {
                self.in_batch = true;
                let text = match t {
                    Target::Statement => self.statements.get(&name[..]).map(|(s, n)| {
                        let mut body = n.to_be_bytes().to_vec();
                        for _ in 0..*n {
                            body.extend_from_slice(&23i32.to_be_bytes());
                        }
                        self.out.push_back(Frame::new(b't', &body));
                        s.clone()
                    }),
                    Target::Portal => self.portals.get(&name[..]).map(|p| p.text.clone()),
                };
                match text {
                    Some(s) if s.trim().starts_with("select") => {
                        self.out.push_back(wire::row_description_text("c"))
                    }
                    Some(_) => self.out.push_back(Frame::new(b'n', &[])),
                    None => self.extended_error("26000", "does not exist"),
                }
            }
            FrontendMsg::Execute { portal, max_rows } => {
                self.in_batch = true;
                let Some(text) = self.portals.get(&portal[..]).map(|p| p.text.clone()) else {
                    let name = String::from_utf8_lossy(&portal).into_owned();
                    return self
                        .extended_error("34000", &format!("portal \"{name}\" does not exist"));
                };
                if !self.run(&text, max_rows, Some(&portal)) {
                    self.skipping = true;
                }
            }
            FrontendMsg::Close(t, name) => {
                self.in_batch = true;
                match t {
                    Target::Statement => self.statements.remove(&name[..]),
                    Target::Portal => self.portals.remove(&name[..]).map(|_| (String::new(), 0)),
                };
                self.out.push_back(Frame::new(b'3', &[]));
            }
            FrontendMsg::Sync => {
                self.skipping = false;
                self.in_batch = false;
                if self.tx == b'E' && self.portals.is_empty() {
                    // An implicit transaction that failed is over.
                }
                if self.tx != b'T' && self.tx != b'E' {
                    self.tx = b'I';
                }
                self.portals.retain(|_, _| self.tx != b'I');
                self.out.push_back(wire::ready_for_query(self.tx));
            }
            FrontendMsg::Flush => {}
            other => panic!("model server: unexpected {other:?}"),
        }
    }

    fn extended_error(&mut self, code: &str, message: &str) {
        self.error(code, message);
        self.skipping = true;
    }

    /// No answer owed, no batch open, no transaction: a pool may hand it to another client.
    pub fn idle(&self) -> bool {
        self.out.is_empty() && !self.in_batch && self.tx == b'I'
    }
}
