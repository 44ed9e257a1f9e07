//! The stream transports: this tool plays the CPaaS. Each call is asked of
//! voxgate's API (`POST /api/voice-agent/calls/stream`), then this tool
//! opens the call's `/media/{provider}/{token}` WebSocket and plays the
//! provider's side of the protocol (`voxgate_media::streams::caller`).
//! The leg is handed to the same script as a SIP call: it is "answered"
//! when the stream is open, and what voxgate plays is timed as it arrives
//! at the socket.

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use voxgate_media::streams::protocol::{Frame, Provider};
use voxgate_media::streams::{caller, Socket};
use voxgate_sip::Call;

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
    // Answered when the provider's stream starts, as voxgate sees it.
    Ok(voxgate_sip::stream_call(call_id.to_owned(), media, life, || {}))
}
