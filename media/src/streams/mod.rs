//! WebSocket media streams: a call leg whose audio comes over a WebSocket a
//! CPaaS (Twilio, Telnyx, Plivo, Vonage) opened to us, instead of RTP.
//!
//! [`start`] returns the same [`MediaHandle`] an RTP session gives (20 ms
//! frames of 16 kHz PCM in, `play`/`flush` out), so the call manager and the
//! agent do not know which carrier a call uses. The session exists before
//! the provider connects (an outbound call is placed first); the WebSocket
//! is handed to it later as a [`Socket`] of two channels of [`Frame`]s, so
//! this crate needs no HTTP server. The session reports the stream's life
//! ([`StreamEvent`]) to whoever runs the call leg.
//!
//! Audio to the caller is paced: one 20 ms message per tick from a
//! drift-free clock, so the provider never holds more than a frame or two
//! and barge-in is immediate: a flush empties our queue and sends the
//! provider's `clear` for what it holds. A mark follows each agent spurt;
//! its echo tells us the caller heard the spurt to its end.
//!
//! Protocol violations (bad JSON, bad base64, media before `start`, a
//! second `start`, oversize messages) close the socket with a code and a
//! reason, which is also logged; nothing the far end sends can panic.

pub mod caller;
pub mod protocol;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;

use crate::dtmf::{self, Digit};
use crate::g711::Law;
use crate::resample::{frame_len, FrameResampler};
use crate::session::{AudioFrame, Control, MediaControl, MediaEvent, MediaHandle, SessionStats, PIPELINE_RATE};
use protocol::{close, Encoding, Frame, Inbound, ProtocolError, Provider, StreamStart};

const TICK: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The provider must connect within this long.
    pub connect_timeout: Duration,
    /// No message for this long after `start` ends the stream (`Timeout`).
    pub media_timeout: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { connect_timeout: Duration::from_secs(60), media_timeout: Duration::from_secs(30) }
    }
}

/// The WebSocket, as two channels: messages from the provider, and
/// messages to it (a `Frame::Close` is the last one).
pub struct Socket {
    pub incoming: mpsc::Receiver<Frame>,
    pub outgoing: mpsc::Sender<Frame>,
}

/// Hands the WebSocket to its session when the provider connects.
pub struct Attach(oneshot::Sender<Socket>);

impl Attach {
    /// False when the session is gone (ended, or already has a socket).
    pub fn attach(self, socket: Socket) -> Result<(), Socket> {
        self.0.send(socket)
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The life of a stream, for the call leg.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The provider's `start` (or, for WebRTC, ICE and DTLS up): audio
    /// flows both ways from now.
    Started,
    Ended(StreamEnd),
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamEnd {
    /// The provider sent `stop` or closed the socket.
    Stopped,
    /// We closed it ([`MediaControl::close`]).
    Closed,
    /// Nothing arrived for the media timeout.
    Timeout,
    /// The provider never connected, or never sent `start`.
    NotConnected,
    /// The provider broke the protocol; the socket was closed with this.
    Error(ProtocolError),
    /// The leg could not be set up (a WebRTC offer that was refused).
    Failed(String),
}

/// Starts the session of a stream for `provider`; the socket comes later
/// through the returned [`Attach`].
pub fn start(provider: Provider, config: StreamConfig) -> (MediaHandle, Attach, mpsc::Receiver<StreamEvent>) {
    let (control_tx, control_rx) = mpsc::channel(256);
    let (incoming_tx, incoming_rx) = mpsc::channel(50);
    let (events_tx, events_rx) = mpsc::channel(64);
    let (stats_tx, stats_rx) = watch::channel(SessionStats::default());
    let (attach_tx, attach_rx) = oneshot::channel();
    let (life_tx, life_rx) = mpsc::channel(4);
    let leg = StreamLeg {
        provider,
        config,
        start: None,
        codec: None,
        pcm_in: VecDeque::new(),
        outgoing: VecDeque::new(),
        was_playing: false,
        sent_since_clear: false,
        spurts: 0,
        stats: SessionStats::default(),
        incoming: incoming_tx,
        events: events_tx,
        life: life_tx,
        stats_tx,
    };
    let task = tokio::spawn(leg.run(control_rx, attach_rx));
    let handle = MediaHandle::new(MediaControl::new(control_tx, stats_rx, None), incoming_rx, events_rx, task);
    (handle, Attach(attach_tx), life_rx)
}

/// The stream's coding: G.711 or L16 at 8 kHz, or L16 at 16 kHz.
struct StreamCodec {
    encoding: Encoding,
    decode_rs: FrameResampler,
    encode_rs: FrameResampler,
}

impl StreamCodec {
    fn new(encoding: Encoding) -> Result<Self, ProtocolError> {
        let rate = encoding.rate();
        let rs = |from, to| FrameResampler::new(from, to).map_err(|e| ProtocolError::new(close::UNSUPPORTED_DATA, e.to_string()));
        Ok(StreamCodec { encoding, decode_rs: rs(rate, PIPELINE_RATE)?, encode_rs: rs(PIPELINE_RATE, rate)? })
    }

}

/// Appends the PCM (at the encoding's rate) of `coded` to `out`.
pub(crate) fn decode(encoding: Encoding, coded: &[u8], out: &mut VecDeque<i16>) {
    match encoding {
        Encoding::Ulaw | Encoding::Alaw => {
            let mut pcm = Vec::with_capacity(coded.len());
            law(encoding).decode(coded, &mut pcm);
            out.extend(pcm);
        }
        Encoding::L16 { big_endian, .. } => out.extend(coded.chunks_exact(2).map(|b| {
            let b = [b[0], b[1]];
            if big_endian { i16::from_be_bytes(b) } else { i16::from_le_bytes(b) }
        })),
    }
}

/// `pcm` (at the encoding's rate) coded.
pub(crate) fn encode(encoding: Encoding, pcm: &[i16]) -> Vec<u8> {
    match encoding {
        Encoding::Ulaw | Encoding::Alaw => {
            let mut out = Vec::with_capacity(pcm.len());
            law(encoding).encode(pcm, &mut out);
            out
        }
        Encoding::L16 { big_endian, .. } => pcm.iter().flat_map(|s| if big_endian { s.to_be_bytes() } else { s.to_le_bytes() }).collect(),
    }
}

fn law(encoding: Encoding) -> Law {
    if encoding == Encoding::Alaw { Law::Alaw } else { Law::Ulaw }
}

struct StreamLeg {
    provider: Provider,
    config: StreamConfig,
    start: Option<StreamStart>,
    codec: Option<StreamCodec>,
    /// Caller audio at the stream's rate, cut into 20 ms frames (providers
    /// send 20 ms, but nothing forces them to).
    pcm_in: VecDeque<i16>,
    /// Agent audio at 16 kHz waiting for its tick.
    outgoing: VecDeque<i16>,
    was_playing: bool,
    /// Media went out since the last clear: the provider may still hold some.
    sent_since_clear: bool,
    spurts: u64,
    stats: SessionStats,
    incoming: mpsc::Sender<AudioFrame>,
    events: mpsc::Sender<MediaEvent>,
    life: mpsc::Sender<StreamEvent>,
    stats_tx: watch::Sender<SessionStats>,
}

/// How the loop over a connected socket ended.
enum Exit {
    End(StreamEnd),
    /// The holder dropped the control channel: the call is over.
    Dropped,
}

impl StreamLeg {
    async fn run(mut self, mut control: mpsc::Receiver<Control>, attach: oneshot::Receiver<Socket>) {
        self.serve(&mut control, attach).await;
        // Like an RTP session, the leg lives as long as its handle: its
        // holder sees the call end through the stream's events, never
        // through a closed audio channel.
        while control.recv().await.is_some() {}
    }

    async fn serve(&mut self, control: &mut mpsc::Receiver<Control>, attach: oneshot::Receiver<Socket>) {
        let connect_by = tokio::time::sleep(self.config.connect_timeout);
        tokio::pin!(connect_by);
        let mut attach = attach;
        let socket = loop {
            tokio::select! {
                s = &mut attach => match s {
                    Ok(s) => break s,
                    Err(_) => return self.finish(StreamEnd::NotConnected).await,
                },
                msg = control.recv() => match msg {
                    Some(Control::Close) => return self.finish(StreamEnd::Closed).await,
                    Some(msg) => self.on_control(msg, None),
                    None => return,
                },
                _ = &mut connect_by => {
                    tracing::warn!(provider = %self.provider, "the media stream did not connect in time");
                    return self.finish(StreamEnd::NotConnected).await;
                }
            }
        };
        let Socket { incoming, outgoing } = socket;
        let exit = self.connected(control, incoming, &outgoing).await;
        let end = match exit {
            Exit::End(end) => end,
            Exit::Dropped => {
                let _ = outgoing.try_send(Frame::Close { code: close::NORMAL, reason: "call ended".into() });
                return;
            }
        };
        let (code, reason) = match &end {
            StreamEnd::Error(e) => {
                tracing::warn!(provider = %self.provider, reason = %e.reason, code = e.code, "media stream closed: protocol error");
                (e.code, e.reason.clone())
            }
            StreamEnd::Timeout => (close::POLICY, format!("no media for {} s", self.config.media_timeout.as_secs())),
            StreamEnd::NotConnected => (close::POLICY, "no start message".into()),
            StreamEnd::Failed(reason) => (close::POLICY, reason.clone()),
            StreamEnd::Stopped | StreamEnd::Closed => (close::NORMAL, "call ended".into()),
        };
        let _ = outgoing.try_send(Frame::Close { code, reason });
        self.finish(end).await;
    }

    async fn finish(&mut self, end: StreamEnd) {
        self.stats_tx.send_replace(self.stats.clone());
        let _ = self.life.send(StreamEvent::Ended(end)).await;
    }

    async fn connected(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        mut incoming: mpsc::Receiver<Frame>,
        outgoing: &mpsc::Sender<Frame>,
    ) -> Exit {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        // `start` must follow the connection promptly; media must keep coming.
        let mut deadline = Instant::now() + self.config.media_timeout.min(Duration::from_secs(10));
        loop {
            tokio::select! {
                biased;
                msg = control.recv() => match msg {
                    Some(Control::Close) => return Exit::End(StreamEnd::Closed),
                    Some(msg) => self.on_control(msg, Some(outgoing)),
                    None => return Exit::Dropped,
                },
                frame = incoming.recv() => {
                    let Some(frame) = frame else { return Exit::End(StreamEnd::Stopped) };
                    match self.on_frame(&frame) {
                        Ok(None) => {
                            if self.start.is_some() {
                                deadline = Instant::now() + self.config.media_timeout;
                            }
                        }
                        Ok(Some(end)) => return Exit::End(end),
                        Err(e) => return Exit::End(StreamEnd::Error(e)),
                    }
                }
                _ = tick.tick() => {
                    if Instant::now() >= deadline {
                        if self.start.is_none() {
                            return Exit::End(StreamEnd::NotConnected);
                        }
                        self.stats.timed_out = true;
                        let _ = self.events.try_send(MediaEvent::Timeout);
                        return Exit::End(StreamEnd::Timeout);
                    }
                    self.send_out(outgoing);
                    if self.stats.packets_received.is_multiple_of(5) {
                        self.stats_tx.send_replace(self.stats.clone());
                    }
                }
            }
        }
    }

    fn on_control(&mut self, msg: Control, outgoing: Option<&mpsc::Sender<Frame>>) {
        match msg {
            Control::Play(pcm) => self.outgoing.extend(pcm),
            Control::Flush => {
                self.outgoing.clear();
                self.was_playing = false;
                if let (true, Some(out), Some(start)) = (self.sent_since_clear, outgoing, &self.start) {
                    // The provider may hold a frame or two of ours (or, between
                    // two sentences, the end of one): drop them too.
                    if out.try_send(self.provider.clear(&start.stream_id)).is_ok() {
                        self.sent_since_clear = false;
                    }
                }
            }
            Control::Dtmf(digit) => {
                let message = self.start.as_ref().and_then(|s| self.provider.dtmf(&s.stream_id, digit));
                match (message, outgoing) {
                    (Some(m), Some(out)) => {
                        let _ = out.try_send(m);
                    }
                    _ => self.outgoing.extend(dtmf::key_tone(digit, 100, PIPELINE_RATE).unwrap_or_default()),
                }
            }
            // SDP and hold belong to RTP legs.
            Control::Remote(_) | Control::Direction(_) | Control::Close => {}
        }
    }

    /// Handles one message; `Some` ends the stream.
    fn on_frame(&mut self, frame: &Frame) -> Result<Option<StreamEnd>, ProtocolError> {
        let inbound = self.provider.parse(frame)?;
        let started = self.start.is_some();
        match inbound {
            Inbound::Connected if !started => {}
            Inbound::Connected => return Err(ProtocolError::new(close::POLICY, "connected after start")),
            Inbound::Start(_) if started => return Err(ProtocolError::new(close::POLICY, "a second start")),
            Inbound::Start(start) => {
                self.codec = Some(StreamCodec::new(start.encoding)?);
                tracing::info!(provider = %self.provider, stream_id = %start.stream_id, encoding = ?start.encoding, "media stream started");
                let _ = self.life.try_send(StreamEvent::Started);
                self.start = Some(start);
            }
            Inbound::Stop => return Ok(Some(StreamEnd::Stopped)),
            _ if !started => return Err(ProtocolError::new(close::POLICY, "a message before start")),
            Inbound::Media(coded) => self.on_media(&coded),
            Inbound::OtherTrack | Inbound::Cleared => {}
            Inbound::Dtmf(digit) => {
                let _ = self.events.try_send(MediaEvent::Dtmf(Digit { digit, duration_ms: 0 }));
            }
            Inbound::Mark(name) => tracing::debug!(mark = %name, "the caller heard the agent up to a mark"),
            Inbound::Other(event) => tracing::debug!(event = %event, "media stream event ignored"),
        }
        Ok(None)
    }

    fn on_media(&mut self, coded: &[u8]) {
        let Some(codec) = self.codec.as_mut() else { return };
        let now = Instant::now();
        self.stats.packets_received += 1;
        decode(codec.encoding, coded, &mut self.pcm_in);
        let n = frame_len(codec.encoding.rate());
        while self.pcm_in.len() >= n {
            let frame: Vec<i16> = self.pcm_in.drain(..n).collect();
            let mut pcm = Vec::with_capacity(frame_len(PIPELINE_RATE));
            if codec.decode_rs.process(&frame, &mut pcm).is_err() {
                continue;
            }
            if self.incoming.try_send(AudioFrame { pcm, received_at: Some(now), arrived_at: Some(now) }).is_err() {
                self.stats.dropped_frames += 1;
            }
        }
    }

    /// One tick: the next 20 ms of agent audio, if there is any.
    fn send_out(&mut self, outgoing: &mpsc::Sender<Frame>) {
        let (Some(start), Some(codec)) = (self.start.as_ref(), self.codec.as_mut()) else { return };
        if self.outgoing.is_empty() {
            return;
        }
        let n = frame_len(PIPELINE_RATE);
        let mut pcm: Vec<i16> = self.outgoing.drain(..self.outgoing.len().min(n)).collect();
        pcm.resize(n, 0);
        let mut coded_pcm = Vec::with_capacity(frame_len(codec.encoding.rate()));
        if codec.encode_rs.process(&pcm, &mut coded_pcm).is_err() {
            return;
        }
        let message = self.provider.media(&start.stream_id, codec.encoding, encode(codec.encoding, &coded_pcm));
        if outgoing.try_send(message).is_err() {
            // The socket writer is behind (a slow provider): skipping keeps time.
            self.stats.dropped_frames += 1;
            return;
        }
        self.stats.packets_sent += 1;
        self.sent_since_clear = true;
        let now = Instant::now();
        if !self.was_playing {
            self.was_playing = true;
            let _ = self.events.try_send(MediaEvent::PlayoutStarted { at: now });
        }
        if self.outgoing.is_empty() {
            self.was_playing = false;
            self.spurts += 1;
            let _ = outgoing.try_send(self.provider.mark(&start.stream_id, &format!("spurt-{}", self.spurts)));
            let _ = self.events.try_send(MediaEvent::PlayoutEnded { at: now });
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use serde_json::{json, Value};

    use super::*;

    fn twilio_start() -> Frame {
        Frame::Text(
            json!({"event": "start", "streamSid": "MZ1", "start": {"callSid": "CA1",
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
            .to_string(),
        )
    }

    fn media(bytes: &[u8]) -> Frame {
        let payload = base64::engine::general_purpose::STANDARD.encode(bytes);
        Frame::Text(json!({"event": "media", "media": {"track": "inbound", "payload": payload}}).to_string())
    }

    struct Far {
        to_us: mpsc::Sender<Frame>,
        from_us: mpsc::Receiver<Frame>,
    }

    fn connect(attach: Attach) -> Far {
        let (to_us, incoming) = mpsc::channel(64);
        let (outgoing, from_us) = mpsc::channel(256);
        assert!(attach.attach(Socket { incoming, outgoing }).is_ok());
        Far { to_us, from_us }
    }

    async fn next_json(far: &mut Far) -> Value {
        match far.from_us.recv().await.expect("a message") {
            Frame::Text(t) => serde_json::from_str(&t).expect("json"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn twilio_audio_flows_both_ways_with_marks_and_clear() {
        let (mut handle, attach, mut life) = start(Provider::Twilio, StreamConfig::default());
        let mut far = connect(attach);
        far.to_us.send(Frame::Text(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.into())).await.unwrap();
        far.to_us.send(twilio_start()).await.unwrap();
        assert_eq!(life.recv().await, Some(StreamEvent::Started));
        // 30 ms in: one 20 ms frame out, 10 ms kept for the next.
        far.to_us.send(media(&[0xff; 240])).await.unwrap();
        let frame = handle.incoming.recv().await.expect("a frame");
        assert_eq!(frame.pcm.len(), 320);
        // 50 ms of agent audio: three paced media messages, then a mark.
        handle.control.play(vec![1000; 800]).await;
        for _ in 0..3 {
            let m = next_json(&mut far).await;
            assert_eq!((m["event"].as_str(), m["streamSid"].as_str()), (Some("media"), Some("MZ1")));
            let payload = base64::engine::general_purpose::STANDARD.decode(m["media"]["payload"].as_str().unwrap()).unwrap();
            assert_eq!(payload.len(), 160);
        }
        assert_eq!(next_json(&mut far).await["event"], "mark");
        assert!(matches!(handle.events.recv().await, Some(MediaEvent::PlayoutStarted { .. })));
        // Barge-in: a flush mid-spurt sends clear, and the queue is gone.
        handle.control.play(vec![1000; 16_000]).await;
        assert_eq!(next_json(&mut far).await["event"], "media");
        handle.control.flush().await;
        let mut saw_clear = false;
        for _ in 0..3 {
            if next_json(&mut far).await["event"] == "clear" {
                saw_clear = true;
                break;
            }
        }
        assert!(saw_clear);
        far.to_us.send(Frame::Text(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"spurt-1"}}"#.into())).await.unwrap();
        far.to_us.send(Frame::Text(r#"{"event":"stop","streamSid":"MZ1"}"#.into())).await.unwrap();
        assert_eq!(life.recv().await, Some(StreamEvent::Ended(StreamEnd::Stopped)));
    }

    async fn closes_with(first: Vec<Frame>) -> (u16, String) {
        let (_handle, attach, mut life) = start(Provider::Twilio, StreamConfig::default());
        let mut far = connect(attach);
        for f in first {
            let _ = far.to_us.send(f).await;
        }
        loop {
            if let Some(Frame::Close { code, reason }) = far.from_us.recv().await {
                let end = loop {
                    if let Some(StreamEvent::Ended(e)) = life.recv().await {
                        break e;
                    }
                };
                assert!(matches!(end, StreamEnd::Error(_)), "{end:?}");
                return (code, reason);
            }
        }
    }

    #[tokio::test]
    async fn protocol_violations_close_the_stream_with_a_reason() {
        let (code, reason) = closes_with(vec![Frame::Text("{oops".into())]).await;
        assert_eq!(code, close::INVALID_PAYLOAD, "{reason}");
        let (code, reason) = closes_with(vec![media(&[0; 160])]).await;
        assert_eq!((code, reason.as_str()), (close::POLICY, "a message before start"));
        let (_, reason) = closes_with(vec![twilio_start(), twilio_start()]).await;
        assert_eq!(reason, "a second start");
        let bad = Frame::Text(r#"{"event":"media","media":{"payload":"%%%"}}"#.into());
        let (_, reason) = closes_with(vec![twilio_start(), bad]).await;
        assert!(reason.contains("base64"), "{reason}");
        let (code, _) = closes_with(vec![twilio_start(), media(&vec![0; 40_000])]).await;
        assert_eq!(code, close::TOO_BIG);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_never_connects_ends_as_not_connected() {
        let config = StreamConfig { connect_timeout: Duration::from_secs(5), ..Default::default() };
        let (_handle, _attach, mut life) = start(Provider::Telnyx, config);
        assert_eq!(life.recv().await, Some(StreamEvent::Ended(StreamEnd::NotConnected)));
    }

    #[tokio::test]
    async fn vonage_l16_frames_pass_without_resampling_and_dtmf_becomes_tones() {
        let (mut handle, attach, mut life) = start(Provider::Vonage, StreamConfig::default());
        let mut far = connect(attach);
        far.to_us.send(Frame::Text(r#"{"event":"websocket:connected","content-type":"audio/l16;rate=16000"}"#.into())).await.unwrap();
        assert_eq!(life.recv().await, Some(StreamEvent::Started));
        let pcm: Vec<u8> = (0..320i16).flat_map(|i| (i * 10).to_le_bytes()).collect();
        far.to_us.send(Frame::Binary(pcm)).await.unwrap();
        let frame = handle.incoming.recv().await.unwrap();
        assert_eq!(frame.pcm[..4], [0, 10, 20, 30]);
        handle.control.send_dtmf('5').await.unwrap();
        let Some(Frame::Binary(out)) = far.from_us.recv().await else { panic!("binary audio") };
        assert_eq!(out.len(), 640);
        assert!(out.iter().any(|b| *b != 0), "the tone is in the audio");
    }
}
