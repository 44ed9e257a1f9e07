//! Where a call's media connects: `/media/{provider}/{token}` (or
//! `/media/{provider}?token=`), the WebSocket a CPaaS opens to carry a
//! call's audio; `/webrtc/{token}`, where a browser posts its SDP offer; and
//! `/carriers/twilio/{call}/status`, Twilio's status callbacks. None takes
//! an API key: media is authorised by its signed token, the callback by
//! Twilio's signature.
//!
//! The handler only moves WebSocket messages to and from the call's stream
//! session (`voxgate_media::streams`), which owns the protocol.

use std::collections::BTreeMap;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::Instrument;
use voxgate_media::streams::protocol::{close, Frame, Provider, MAX_TEXT_BYTES};
use voxgate_media::streams::{Attach, Socket};
use voxgate_media::webrtc::MAX_OFFER_BYTES;

use crate::clock::now_ms;
use crate::domain::CallId;
use crate::state::AppState;
use crate::voice::streams::ProviderStatus;
use crate::voice::twilio;
use crate::{Error, Result};

/// Messages larger than this fail in the WebSocket layer itself; the
/// stream session refuses smaller ones that are still too big, with a reason.
const MAX_MESSAGE_BYTES: usize = 4 * MAX_TEXT_BYTES;

pub async fn stream(
    State(state): State<AppState>,
    Path((provider, token)): Path<(String, String)>,
    ws: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    upgrade(&state, &provider, &token, ws)
}

#[derive(Deserialize)]
pub struct TokenQuery {
    token: String,
}

pub async fn stream_query(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    query: std::result::Result<Query<TokenQuery>, QueryRejection>,
    ws: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let Ok(Query(q)) = query else { return Err(Error::Unauthorized("a media stream URL needs its token")) };
    upgrade(&state, &provider, &q.token, ws)
}

fn upgrade(
    state: &AppState,
    provider: &str,
    token: &str,
    ws: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let provider: Provider = provider.parse().map_err(Error::NotFound)?;
    let ws = ws.map_err(|e| Error::bad_request(format!("this endpoint takes a WebSocket upgrade: {e}")))?;
    let (call, attach) = state.calls.streams().connect(provider, token, now_ms() / 1000).inspect_err(|e| {
        tracing::warn!(%provider, reason = %e, "media stream refused");
    })?;
    let span = tracing::info_span!("media_stream", call_id = %call, %provider);
    Ok(ws
        .max_message_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| bridge(socket, attach).instrument(span)))
}

/// Moves messages between the socket and the call's stream session until
/// either side ends.
async fn bridge(socket: WebSocket, attach: Attach) {
    let (mut sink, mut source) = socket.split();
    let (to_session, incoming) = mpsc::channel(64);
    let (outgoing, mut from_session) = mpsc::channel(64);
    if attach.attach(Socket { incoming, outgoing }).is_err() {
        let frame = CloseFrame { code: close::POLICY, reason: "the call is over".into() };
        let _ = sink.send(Message::Close(Some(frame))).await;
        return;
    }
    tracing::info!("media stream connected");
    let writer = async {
        while let Some(frame) = from_session.recv().await {
            let message = match frame {
                Frame::Text(t) => Message::Text(t.into()),
                Frame::Binary(b) => Message::Binary(b.into()),
                Frame::Close { code, reason } => {
                    let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                    return;
                }
            };
            if sink.send(message).await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        while let Some(message) = source.next().await {
            let frame = match message {
                Ok(Message::Text(t)) => Frame::Text(t.to_string()),
                Ok(Message::Binary(b)) => Frame::Binary(b.to_vec()),
                Ok(Message::Close(c)) => {
                    let (code, reason) = c.map(|c| (c.code, c.reason.to_string())).unwrap_or((close::NORMAL, String::new()));
                    tracing::info!(code, reason = %reason, "the provider closed the media stream");
                    Frame::Close { code, reason }
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "media stream closed: unreadable message");
                    return;
                }
            };
            if to_session.send(frame).await.is_err() {
                return;
            }
        }
    };
    // The session answers the provider's close with its own; a read error
    // drops the socket.
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
}

/// Twilio's status callback for one of our calls: 204 when taken, 403
/// for a bad signature, 404 for a call not running on this node.
pub async fn twilio_status(
    State(state): State<AppState>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<StatusCode> {
    let call: CallId = call.parse().map_err(|_| Error::not_found("call"))?;
    let params: BTreeMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let presented = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Forbidden("X-Twilio-Signature is missing".into()))?;
    let streams = state.calls.streams();
    // Twilio signs the URL it was given, which we built on the public base.
    let url = format!("{}{}", streams.public_base(), twilio::status_path(call));
    let status = params.get("CallStatus").map(String::as_str).unwrap_or_default();
    if !twilio::STATUSES.contains(&status) {
        return Err(Error::bad_request(format!("CallStatus '{status}' is not one of {}", twilio::STATUSES.join(", "))));
    }
    let status = ProviderStatus {
        status: status.to_owned(),
        sip_code: params.get("SipResponseCode").and_then(|c| c.parse().ok()),
    };
    streams.status(call, |secret| twilio::signature_valid(secret, &url, &params, presented), status)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A browser's WebRTC offer for a web call (WHIP-style): 201 with the SDP
/// answer, which carries all our ICE candidates.
pub async fn webrtc_offer(State(state): State<AppState>, Path(token): Path<String>, headers: HeaderMap, body: String) -> Result<Response> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !content_type.starts_with("application/sdp") {
        return Err(Error::bad_request("the offer must be sent as Content-Type: application/sdp"));
    }
    if body.len() > MAX_OFFER_BYTES || !body.starts_with("v=0") {
        return Err(Error::bad_request(format!("the body must be an SDP offer (starting v=0, at most {MAX_OFFER_BYTES} bytes)")));
    }
    let (call, offer) = state.calls.streams().offer(&token, now_ms() / 1000).inspect_err(|e| {
        tracing::warn!(reason = %e, "WebRTC offer refused");
    })?;
    let answer = offer.answer(body).await.map_err(|e| {
        tracing::warn!(call_id = %call, error = %e, "WebRTC offer could not be answered");
        Error::bad_request(format!("the offer could not be answered: {e}"))
    })?;
    Ok((StatusCode::CREATED, [(header::CONTENT_TYPE, "application/sdp")], answer).into_response())
}
