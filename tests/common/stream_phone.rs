//! The provider's side of a WebSocket media stream in tests: connects to a
//! voxgate stream URL as Twilio, Telnyx, Plivo or Vonage would, sends the
//! caller's audio every 20 ms (silence when the caller is quiet), records
//! what voxgate plays (8 kHz, silence filled in where nothing came, so the
//! recording runs in time like a phone line), echoes marks the way the
//! provider does when playback reaches them, and counts clears.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use voxgate_media::g711::{linear_to_ulaw, ulaw_to_linear};

use super::far_end::{speech_end, to_16k};

/// 20 ms at 8 kHz.
const FRAME: usize = 160;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Twilio,
    Telnyx,
    Plivo,
    Vonage,
}

#[derive(Default)]
struct State {
    /// What voxgate played, 8 kHz, one 20 ms frame (or silence) per tick.
    received: Vec<i16>,
    /// Played audio not yet put on the recording's time line.
    pending: VecDeque<i16>,
    /// Playout runs (a 40 ms buffer absorbs the socket's jitter, as a
    /// provider's would).
    playing: bool,
    to_send: VecDeque<i16>,
    clears: usize,
    marks: Vec<String>,
    media_messages: usize,
    closed: Option<(u16, String)>,
}

pub struct StreamPhone {
    kind: Kind,
    state: Arc<Mutex<State>>,
    commands: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamPhone {
    /// Connects and sends the provider's opening messages; the HTTP status
    /// of a refused handshake is the error.
    pub async fn connect(url: &str, kind: Kind) -> Result<StreamPhone, u16> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => r.status().as_u16(),
            other => panic!("websocket connect failed: {other}"),
        })?;
        let (mut sink, mut source) = ws.split();
        for m in opening(kind) {
            sink.send(m).await.expect("send opening");
        }
        let state = Arc::new(Mutex::new(State::default()));
        let (commands, mut commands_rx) = mpsc::channel::<Message>(16);
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut chunk = 0u64;
            loop {
                tokio::select! {
                    m = source.next() => {
                        let Some(Ok(m)) = m else { break };
                        let replies = on_message(kind, &st, m);
                        for r in replies {
                            if sink.send(r).await.is_err() {
                                break;
                            }
                        }
                        if st.lock().unwrap().closed.is_some() {
                            break;
                        }
                    }
                    c = commands_rx.recv() => {
                        let Some(c) = c else { break };
                        let _ = sink.send(c).await;
                    }
                    _ = tick.tick() => {
                        let frame = {
                            let mut s = st.lock().unwrap();
                            // One frame of the recording per tick, once 40 ms are buffered.
                            if !s.playing && s.pending.len() >= 2 * FRAME {
                                s.playing = true;
                            }
                            if s.pending.is_empty() {
                                s.playing = false;
                            }
                            let n = if s.playing { s.pending.len().min(FRAME) } else { 0 };
                            let mut played: Vec<i16> = s.pending.drain(..n).collect();
                            played.resize(FRAME, 0);
                            s.received.extend(played);
                            let n = s.to_send.len().min(FRAME);
                            let mut f: Vec<i16> = s.to_send.drain(..n).collect();
                            f.resize(FRAME, 0);
                            f
                        };
                        chunk += 1;
                        if sink.send(media(kind, &frame, chunk)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(StreamPhone { kind, state, commands, task })
    }

    /// Queues 16 kHz speech for the caller to say.
    pub fn say(&self, pcm16k: &[i16]) {
        let mut s = self.state.lock().unwrap();
        s.to_send.extend(pcm16k.chunks(2).map(|c| ((c[0] as i32 + *c.get(1).unwrap_or(&c[0]) as i32) / 2) as i16));
    }

    pub fn speaking(&self) -> bool {
        !self.state.lock().unwrap().to_send.is_empty()
    }

    pub fn received_len(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    pub fn received_16k(&self, from: usize, to: usize) -> Vec<f32> {
        let s = self.state.lock().unwrap();
        to_16k(&s.received[from.min(s.received.len())..to.min(s.received.len())])
    }

    pub fn clears(&self) -> usize {
        self.state.lock().unwrap().clears
    }

    /// Marks voxgate sent (each echoed back).
    pub fn marks(&self) -> Vec<String> {
        self.state.lock().unwrap().marks.clone()
    }

    pub fn media_messages(&self) -> usize {
        self.state.lock().unwrap().media_messages
    }

    /// The close frame voxgate sent, once it did.
    pub fn closed(&self) -> Option<(u16, String)> {
        self.state.lock().unwrap().closed.clone()
    }

    /// Sends a raw message (for malformed-input tests).
    pub async fn send_raw(&self, m: Message) {
        let _ = self.commands.send(m).await;
    }

    /// Ends the call the provider's way (`stop`, or a close for Plivo and Vonage).
    pub async fn hang_up(&self) {
        let m = match self.kind {
            Kind::Twilio => Message::text(json!({"event": "stop", "sequenceNumber": "999", "streamSid": "MZ00test", "stop": {"callSid": "CA00test"}}).to_string()),
            Kind::Telnyx => Message::text(json!({"event": "stop", "sequence_number": "999", "stream_id": "st-test", "stop": {"call_control_id": "v3:test"}}).to_string()),
            Kind::Plivo | Kind::Vonage => Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "hangup".into() })),
        };
        let _ = self.commands.send(m).await;
    }

    pub async fn wait_closed(&self, within: Duration) -> Option<(u16, String)> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(c) = self.closed() {
                return Some(c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub async fn wait_for_speech_then_silence(&self, from: usize, quiet: Duration, within: Duration) -> Option<usize> {
        super::voice::poll(within, || speech_end(&self.state.lock().unwrap().received, from, quiet)).await
    }

    /// Waits until voxgate plays audio (from sample `from` on).
    pub async fn wait_for_speech(&self, from: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            {
                let s = self.state.lock().unwrap();
                if s.received[from.min(s.received.len())..].chunks(FRAME).any(super::far_end::loud) {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Drop for StreamPhone {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn opening(kind: Kind) -> Vec<Message> {
    let t = |v: Value| Message::text(v.to_string());
    match kind {
        Kind::Twilio => vec![
            t(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})),
            t(json!({"event": "start", "sequenceNumber": "1", "streamSid": "MZ00test",
                "start": {"accountSid": "AC00test", "streamSid": "MZ00test", "callSid": "CA00test", "tracks": ["inbound"],
                          "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})),
        ],
        Kind::Telnyx => vec![
            t(json!({"event": "connected", "version": "1.0.0"})),
            t(json!({"event": "start", "sequence_number": "1", "stream_id": "st-test",
                "start": {"user_id": "u-test", "call_control_id": "v3:test", "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}})),
        ],
        Kind::Plivo => vec![t(json!({"event": "start", "sequenceNumber": 1,
            "start": {"callId": "c-test", "streamId": "s-test", "accountId": "MA00", "tracks": ["inbound"],
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}}))],
        Kind::Vonage => vec![t(json!({"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}))],
    }
}

/// 20 ms of the caller's 8 kHz audio as the provider sends it.
fn media(kind: Kind, frame: &[i16], chunk: u64) -> Message {
    let ulaw = || B64.encode(frame.iter().map(|&x| linear_to_ulaw(x)).collect::<Vec<u8>>());
    let ts = (chunk * 20).to_string();
    match kind {
        Kind::Twilio => Message::text(json!({"event": "media", "sequenceNumber": (chunk + 1).to_string(), "streamSid": "MZ00test",
            "media": {"track": "inbound", "chunk": chunk.to_string(), "timestamp": ts, "payload": ulaw()}}).to_string()),
        Kind::Telnyx => Message::text(json!({"event": "media", "sequence_number": (chunk + 1).to_string(), "stream_id": "st-test",
            "media": {"track": "inbound", "chunk": chunk.to_string(), "timestamp": ts, "payload": ulaw()}}).to_string()),
        Kind::Plivo => Message::text(json!({"event": "media", "sequenceNumber": chunk + 1, "streamId": "s-test",
            "media": {"track": "inbound", "timestamp": ts, "chunk": chunk, "payload": ulaw()}}).to_string()),
        Kind::Vonage => {
            // 16 kHz L16 little-endian: each 8 kHz sample twice.
            let bytes: Vec<u8> = frame.iter().flat_map(|&x| [x, x]).flat_map(i16::to_le_bytes).collect();
            Message::binary(bytes)
        }
    }
}

/// Records what voxgate sent; returns the provider's replies.
fn on_message(kind: Kind, state: &Arc<Mutex<State>>, m: Message) -> Vec<Message> {
    let mut s = state.lock().unwrap();
    match m {
        Message::Binary(b) if kind == Kind::Vonage => {
            let pcm: Vec<i16> = b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
            s.pending.extend(pcm.chunks(2).map(|c| c[0]));
            s.media_messages += 1;
            vec![]
        }
        Message::Text(t) => {
            let v: Value = serde_json::from_str(&t).expect("voxgate sends JSON");
            let event = v["event"].as_str().or(v["action"].as_str()).unwrap_or_default().to_owned();
            match event.as_str() {
                "media" | "playAudio" => {
                    let payload = B64.decode(v["media"]["payload"].as_str().expect("payload")).expect("base64");
                    s.pending.extend(payload.iter().map(|&c| ulaw_to_linear(c)));
                    s.media_messages += 1;
                    vec![]
                }
                "clear" | "clearAudio" => {
                    s.clears += 1;
                    s.pending.clear();
                    match kind {
                        Kind::Plivo => vec![Message::text(json!({"event": "clearedAudio", "streamId": "s-test"}).to_string())],
                        Kind::Vonage => vec![Message::text(json!({"event": "websocket:cleared"}).to_string())],
                        _ => vec![],
                    }
                }
                "mark" | "checkpoint" | "notify" => {
                    let name = v["mark"]["name"].as_str().or(v["name"].as_str()).or(v["payload"]["name"].as_str()).unwrap_or_default().to_owned();
                    s.marks.push(name.clone());
                    let echo = match kind {
                        Kind::Twilio => json!({"event": "mark", "sequenceNumber": "1", "streamSid": "MZ00test", "mark": {"name": name}}),
                        Kind::Telnyx => json!({"event": "mark", "sequence_number": "1", "stream_id": "st-test", "mark": {"name": name}}),
                        Kind::Plivo => json!({"event": "playedStream", "streamId": "s-test", "name": name}),
                        Kind::Vonage => json!({"event": "websocket:notify", "payload": {"name": name}}),
                    };
                    vec![Message::text(echo.to_string())]
                }
                other => panic!("voxgate sent an unknown {kind:?} message '{other}': {t}"),
            }
        }
        Message::Close(c) => {
            s.closed = Some(c.map(|c| (u16::from(c.code), c.reason.to_string())).unwrap_or((1005, String::new())));
            vec![]
        }
        _ => vec![],
    }
}
