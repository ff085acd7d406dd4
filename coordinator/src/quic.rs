//! The QUIC server agents connect to (docs/control-path.md, "QUIC link").
//!
//! One task per connection: while this coordinator is a standby the connection is
//! closed at once with application code 1 and reason `standby`; otherwise the
//! agent's single bidirectional stream is read as `AgentMsg` frames (the first
//! must be `Hello`, naming the node) and `CoordMsg` frames are written back. The
//! decision loop learns about sessions and messages through [`Inbound`] and sends
//! through the session's channel; it decides nothing here. When the coordinator
//! steps down every open connection is closed the same way as a standby's.

use std::time::{Duration, Instant};

use meridian_shared::envelope::{self, AgentMsg, CoordMsg, FrameDecoder};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

/// Application close code of a standby (or stepped-down) coordinator.
pub const CLOSE_STANDBY: u32 = 1;
/// Application close code for a protocol violation by the agent.
pub const CLOSE_PROTOCOL: u32 = 2;

/// How long an agent has to open its stream and say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the connection tasks tell the decision loop.
#[derive(Debug)]
pub enum Inbound {
    /// An agent said `Hello`; send its commands through `tx`.
    Connected {
        node: String,
        region: String,
        session: u64,
        tx: mpsc::UnboundedSender<CoordMsg>,
    },
    /// A message after `Hello`, with its arrival time.
    Message {
        node: String,
        session: u64,
        msg: AgentMsg,
        at: Instant,
    },
    Disconnected {
        node: String,
        session: u64,
    },
}

/// Accepts connections on `endpoint` until it is closed. `active` says whether
/// this coordinator is the active one.
pub async fn serve(
    endpoint: quinn::Endpoint,
    active: watch::Receiver<bool>,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut next_session = 1u64;
    while let Some(incoming) = endpoint.accept().await {
        let session = next_session;
        next_session += 1;
        let active = active.clone();
        let inbound = inbound.clone();
        let remote = incoming.remote_address();
        tokio::spawn(
            async move {
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        debug!(error = %e, "QUIC handshake failed");
                        return;
                    }
                };
                if !*active.borrow() {
                    conn.close(CLOSE_STANDBY.into(), b"standby");
                    return;
                }
                handle(conn, session, active, inbound).await;
            }
            .instrument(tracing::info_span!("agent_conn", %remote, session)),
        );
    }
}

async fn handle(
    conn: quinn::Connection,
    session: u64,
    mut active: watch::Receiver<bool>,
    inbound: mpsc::Sender<Inbound>,
) {
    let stream = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await;
    let (mut send, mut recv) = match stream {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            debug!(error = %e, "agent connection ended before its stream");
            return;
        }
        Err(_) => {
            conn.close(CLOSE_PROTOCOL.into(), b"no stream");
            return;
        }
    };
    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];

    // Hello first.
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            match decoder.next_message::<AgentMsg>() {
                Ok(Some(msg)) => return Some(msg),
                Ok(None) => {}
                Err(e) if e.is_fatal() => return None,
                Err(e) => {
                    debug!(error = %e, "undecodable frame before hello");
                    continue;
                }
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.feed(&buf[..n]),
                _ => return None,
            }
        }
    })
    .await;
    let (node, region) = match hello {
        Ok(Some(AgentMsg::Hello { node, region, .. })) => (node, region),
        _ => {
            conn.close(CLOSE_PROTOCOL.into(), b"expected hello");
            return;
        }
    };
    info!(node = %node, region = %region, "agent connected");

    let (tx, mut rx) = mpsc::unbounded_channel::<CoordMsg>();
    if inbound
        .send(Inbound::Connected {
            node: node.clone(),
            region,
            session,
            tx,
        })
        .await
        .is_err()
    {
        return;
    }

    let writer = async {
        while let Some(msg) = rx.recv().await {
            let frame = match envelope::encode(&msg) {
                Ok(frame) => frame,
                Err(e) => {
                    warn!(error = %e, "cannot encode a command");
                    continue;
                }
            };
            if let Err(e) = send.write_all(&frame).await {
                debug!(error = %e, "agent stream closed for writing");
                return;
            }
        }
    };
    let reader = async {
        loop {
            loop {
                match decoder.next_message::<AgentMsg>() {
                    Ok(Some(msg)) => {
                        let event = Inbound::Message {
                            node: node.clone(),
                            session,
                            msg,
                            at: Instant::now(),
                        };
                        if inbound.send(event).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => {
                        warn!(error = %e, "agent stream out of sync; closing");
                        return;
                    }
                    Err(e) => debug!(error = %e, "skipping an undecodable message"),
                }
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.feed(&buf[..n]),
                Ok(None) => return,
                Err(e) => {
                    debug!(error = %e, "agent stream closed");
                    return;
                }
            }
        }
    };
    let stepped_down = async {
        let _ = active.wait_for(|a| !*a).await;
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
        () = stepped_down => {
            conn.close(CLOSE_STANDBY.into(), b"standby");
        }
    }
    info!(node = %node, "agent disconnected");
    let _ = inbound.send(Inbound::Disconnected { node, session }).await;
}
