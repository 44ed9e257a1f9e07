//! The stream transports: this tool plays the CPaaS. Each call is asked of
//! voxgate's API (`POST /api/voice-agent/calls/stream`), then this tool
//! opens the call's `/media/{provider}/{token}` WebSocket and plays the
//! provider's side of the protocol (`voxgate_media::streams::caller`).
//! The leg is handed to the same script as a SIP call: it is "answered"
//! when the stream is open, and what voxgate plays is timed as it arrives
//! at the socket.

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use voxgate_media::streams::protocol::{Frame, Provider};
use voxgate_media::streams::{caller, Socket, StreamEnd, StreamEvent};
use voxgate_sip::{Call, CallEvent, CallStatus, EndReason, Outcome};

/// Opens `url` as `provider` and returns the call as the script plays it.
pub async fn connect(url: &str, provider: Provider, call_id: &str) -> anyhow::Result<Call> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    let (mut sink, mut source) = ws.split();
    let (to_caller, incoming) = mpsc::channel(100);
    let (outgoing, mut from_caller) = mpsc::channel::<Frame>(100);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                m = source.next() => {
                    let frame = match m {
                        Some(Ok(Message::Text(t))) => Frame::Text(t.to_string()),
                        Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
                        Some(Ok(Message::Close(c))) => {
                            let (code, reason) = c.map(|c| (u16::from(c.code), c.reason.to_string())).unwrap_or((1005, String::new()));
                            let _ = to_caller.send(Frame::Close { code, reason }).await;
                            break;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => break,
                    };
                    if to_caller.send(frame).await.is_err() {
                        break;
                    }
                }
                f = from_caller.recv() => {
                    let message = match f {
                        Some(Frame::Text(t)) => Message::text(t),
                        Some(Frame::Binary(b)) => Message::binary(b),
                        Some(Frame::Close { code, reason }) => {
                            let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }))).await;
                            break;
                        }
                        None => break,
                    };
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let (media, life) = caller::start(provider, Socket { incoming, outgoing }, format!("lt-{call_id}"));
    let (events_tx, events_rx) = mpsc::channel(8);
    let (hangup_tx, hangup_rx) = mpsc::channel(1);
    // The provider answers when its stream starts: now.
    let _ = events_tx.send(CallEvent::Answered { at: Instant::now() }).await;
    tokio::spawn(follow(life, events_tx, hangup_rx, media.control.clone()));
    Ok(Call::new(call_id.to_owned(), events_rx, media, hangup_tx))
}

async fn follow(
    mut life: mpsc::Receiver<StreamEvent>,
    events: mpsc::Sender<CallEvent>,
    mut hangup: mpsc::Receiver<()>,
    control: voxgate_media::session::MediaControl,
) {
    let reason = loop {
        tokio::select! {
            ev = life.recv() => match ev {
                Some(StreamEvent::Ended(StreamEnd::Closed)) => break EndReason::LocalHangup,
                Some(StreamEvent::Ended(StreamEnd::Stopped)) => break EndReason::RemoteHangup,
                Some(StreamEvent::Ended(_)) | None => break EndReason::StreamError,
                Some(StreamEvent::Started) => {}
            },
            Some(()) = hangup.recv() => control.close().await,
        }
    };
    let outcome = Outcome { status: CallStatus::Completed, reason, sip_code: None, sip_reason: None };
    let _ = events.send(CallEvent::Ended(outcome)).await;
}
