//! The provider's side of a media stream: what Twilio (or Telnyx, Plivo,
//! Vonage) does when it bridges a phone call to voxgate. For load
//! generators and tests that play the phone network against a server.
//!
//! [`start`] returns a [`MediaHandle`] for the caller: `play` queues what the
//! caller says (sent as the provider's 20 ms media messages, silence in
//! between, as a phone line is never quiet), `incoming` yields what the
//! server played, stamped with its arrival at the socket. Marks are echoed
//! as the provider echoes them when playback reaches them; a `clear` drops
//! nothing here because audio is heard as it arrives.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

use super::protocol::{Encoding, Frame, Provider};
use super::{decode, encode, Socket, StreamEnd, StreamEvent};
use crate::resample::{frame_len, FrameResampler};
use crate::session::{AudioFrame, Control, MediaControl, MediaEvent, MediaHandle, SessionStats, PIPELINE_RATE};

const TICK: Duration = Duration::from_millis(20);

impl Provider {
    /// The messages that open a stream, as the provider sends them.
    pub fn opening(self, stream_id: &str, call_id: &str) -> Vec<Frame> {
        let t = |v: Value| Frame::Text(v.to_string());
        match self {
            Provider::Twilio => vec![
                t(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})),
                t(json!({"event": "start", "sequenceNumber": "1", "streamSid": stream_id,
                    "start": {"streamSid": stream_id, "callSid": call_id, "tracks": ["inbound"], "customParameters": {},
                              "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})),
            ],
            Provider::Telnyx => vec![
                t(json!({"event": "connected", "version": "1.0.0"})),
                t(json!({"event": "start", "sequence_number": "1", "stream_id": stream_id,
                    "start": {"call_control_id": call_id, "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}})),
            ],
            Provider::Plivo => vec![t(json!({"event": "start", "sequenceNumber": 1,
                "start": {"callId": call_id, "streamId": stream_id, "tracks": ["inbound"],
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}}))],
            Provider::Vonage => vec![t(json!({"event": "websocket:connected", "content-type": "audio/l16;rate=16000", "uuid": call_id}))],
        }
    }

    /// The encoding [`opening`](Self::opening) announces.
    pub fn opening_encoding(self) -> Encoding {
        match self {
            Provider::Vonage => Encoding::L16 { rate: 16000, big_endian: false },
            _ => Encoding::Ulaw,
        }
    }

    /// 20 ms of the caller's coded audio, as the provider sends it.
    pub fn caller_media(self, stream_id: &str, chunk: u64, coded: Vec<u8>) -> Frame {
        let payload = B64.encode(&coded);
        let (seq, ts) = ((chunk + 1).to_string(), (chunk * 20).to_string());
        match self {
            Provider::Twilio => Frame::Text(
                json!({"event": "media", "sequenceNumber": seq, "streamSid": stream_id,
                    "media": {"track": "inbound", "chunk": chunk.to_string(), "timestamp": ts, "payload": payload}})
                .to_string(),
            ),
            Provider::Telnyx => Frame::Text(
                json!({"event": "media", "sequence_number": seq, "stream_id": stream_id,
                    "media": {"track": "inbound", "chunk": chunk.to_string(), "timestamp": ts, "payload": payload}})
                .to_string(),
            ),
            Provider::Plivo => Frame::Text(
                json!({"event": "media", "sequenceNumber": chunk + 1, "streamId": stream_id,
                    "media": {"track": "inbound", "chunk": chunk, "timestamp": ts, "payload": payload}})
                .to_string(),
            ),
            Provider::Vonage => Frame::Binary(coded),
        }
    }

    /// The provider's answer to a mark of ours: playback reached it.
    pub fn mark_reached(self, stream_id: &str, name: &str) -> Frame {
        let v = match self {
            Provider::Twilio => json!({"event": "mark", "streamSid": stream_id, "mark": {"name": name}}),
            Provider::Telnyx => json!({"event": "mark", "stream_id": stream_id, "mark": {"name": name}}),
            Provider::Plivo => json!({"event": "playedStream", "streamId": stream_id, "name": name}),
            Provider::Vonage => json!({"event": "websocket:notify", "payload": {"name": name}}),
        };
        Frame::Text(v.to_string())
    }

    /// The end of the call, as the provider signals it.
    pub fn stop(self, stream_id: &str) -> Frame {
        match self {
            Provider::Twilio => Frame::Text(json!({"event": "stop", "streamSid": stream_id, "stop": {}}).to_string()),
            Provider::Telnyx => Frame::Text(json!({"event": "stop", "stream_id": stream_id, "stop": {}}).to_string()),
            Provider::Plivo | Provider::Vonage => Frame::Close { code: super::protocol::close::NORMAL, reason: "hangup".into() },
        }
    }
}

/// What a server sent the provider.
enum Played {
    Audio(Vec<u8>),
    Mark(String),
    Other,
}

fn played(provider: Provider, frame: &Frame) -> Played {
    match frame {
        Frame::Binary(b) if provider == Provider::Vonage => Played::Audio(b.clone()),
        Frame::Text(t) => {
            let Ok(v) = serde_json::from_str::<Value>(t) else { return Played::Other };
            let kind = v.get("event").or_else(|| v.get("action")).and_then(Value::as_str).unwrap_or_default();
            match kind {
                "media" | "playAudio" => v["media"]["payload"]
                    .as_str()
                    .and_then(|p| B64.decode(p).ok())
                    .map_or(Played::Other, Played::Audio),
                "mark" | "checkpoint" | "notify" => Played::Mark(
                    v["mark"]["name"].as_str().or(v["name"].as_str()).or(v["payload"]["name"].as_str()).unwrap_or_default().to_owned(),
                ),
                _ => Played::Other,
            }
        }
        _ => Played::Other,
    }
}

/// Plays `provider`'s side of a stream over `socket` (already connected to
/// the server's stream URL).
pub fn start(provider: Provider, socket: Socket, stream_id: String) -> (MediaHandle, mpsc::Receiver<StreamEvent>) {
    let (control_tx, control_rx) = mpsc::channel(256);
    let (incoming_tx, incoming_rx) = mpsc::channel(100);
    let (events_tx, events_rx) = mpsc::channel(64);
    let (stats_tx, stats_rx) = watch::channel(SessionStats::default());
    let (life_tx, life_rx) = mpsc::channel(4);
    let mut ends = TaskEnds { control: control_rx, incoming: incoming_tx, events: events_tx, stats: stats_tx, life: life_tx };
    let task = tokio::spawn(async move {
        let end = play(provider, socket, &stream_id, &mut ends).await;
        let _ = ends.life.send(StreamEvent::Ended(end)).await;
    });
    (MediaHandle::new(MediaControl::new(control_tx, stats_rx, None), incoming_rx, events_rx, task), life_rx)
}

/// The stream task's ends of the channels its [`MediaHandle`] holds.
struct TaskEnds {
    control: mpsc::Receiver<Control>,
    incoming: mpsc::Sender<AudioFrame>,
    events: mpsc::Sender<MediaEvent>,
    stats: watch::Sender<SessionStats>,
    life: mpsc::Sender<StreamEvent>,
}

async fn play(provider: Provider, socket: Socket, stream_id: &str, ends: &mut TaskEnds) -> StreamEnd {
    let TaskEnds { control, incoming, events, stats: stats_tx, life } = ends;
    let Socket { incoming: mut from_server, outgoing: to_server } = socket;
    let encoding = provider.opening_encoding();
    let rate = encoding.rate();
    let (Ok(mut up), Ok(mut down)) = (FrameResampler::new(PIPELINE_RATE, rate), FrameResampler::new(rate, PIPELINE_RATE)) else {
        return StreamEnd::Failed("resampler".into());
    };
    for f in provider.opening(stream_id, stream_id) {
        if to_server.send(f).await.is_err() {
            return StreamEnd::Stopped;
        }
    }
    let _ = life.send(StreamEvent::Started).await;
    let mut stats = SessionStats::default();
    let mut speech: VecDeque<i16> = VecDeque::new();
    let mut heard: VecDeque<i16> = VecDeque::new();
    let n16 = frame_len(PIPELINE_RATE);
    let n = frame_len(rate);
    let mut chunk = 0u64;
    let mut was_speaking = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            biased;
            msg = control.recv() => match msg {
                Some(Control::Play(pcm)) => speech.extend(pcm),
                Some(Control::Flush) => speech.clear(),
                Some(Control::Close) | None => {
                    let _ = to_server.send(provider.stop(stream_id)).await;
                    return StreamEnd::Closed;
                }
                Some(_) => {}
            },
            frame = from_server.recv() => {
                let at = Instant::now();
                match frame {
                    None | Some(Frame::Close { .. }) => return StreamEnd::Stopped,
                    Some(f) => match played(provider, &f) {
                        Played::Audio(coded) => {
                            stats.packets_received += 1;
                            decode(encoding, &coded, &mut heard);
                            while heard.len() >= n {
                                let part: Vec<i16> = heard.drain(..n).collect();
                                let mut pcm = Vec::with_capacity(n16);
                                if down.process(&part, &mut pcm).is_ok() && incoming.try_send(AudioFrame { pcm, received_at: Some(at), arrived_at: Some(at) }).is_err() {
                                    stats.dropped_frames += 1;
                                }
                            }
                        }
                        Played::Mark(name) => {
                            let _ = to_server.try_send(provider.mark_reached(stream_id, &name));
                        }
                        Played::Other => {}
                    },
                }
            }
            _ = tick.tick() => {
                let have = speech.len().min(n16);
                let speaking = have > 0;
                let mut pcm: Vec<i16> = speech.drain(..have).collect();
                pcm.resize(n16, 0);
                let mut coded_pcm = Vec::with_capacity(n);
                if up.process(&pcm, &mut coded_pcm).is_err() {
                    continue;
                }
                if to_server.try_send(provider.caller_media(stream_id, chunk, encode(encoding, &coded_pcm))).is_ok() {
                    stats.packets_sent += 1;
                }
                // The caller's spurts, timed as their messages leave.
                let now = Instant::now();
                if speaking && !was_speaking {
                    let _ = events.try_send(MediaEvent::PlayoutStarted { at: now });
                }
                if speaking && speech.is_empty() {
                    let _ = events.try_send(MediaEvent::PlayoutEnded { at: now });
                }
                was_speaking = speaking && !speech.is_empty();
                chunk += 1;
                if chunk.is_multiple_of(5) {
                    stats_tx.send_replace(stats.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::{self, Attach, StreamConfig};

    /// A provider side and a server side joined by channels, as a WebSocket would.
    fn pair(provider: Provider) -> ((MediaHandle, mpsc::Receiver<StreamEvent>), (MediaHandle, mpsc::Receiver<StreamEvent>)) {
        let (server, attach, server_life): (MediaHandle, Attach, _) = streams::start(provider, StreamConfig::default());
        let (to_server, server_in) = mpsc::channel(100);
        let (to_caller, caller_in) = mpsc::channel(100);
        assert!(attach.attach(Socket { incoming: server_in, outgoing: to_caller }).is_ok());
        let caller = start(provider, Socket { incoming: caller_in, outgoing: to_server }, "s-1".into());
        (caller, (server, server_life))
    }

    #[tokio::test]
    async fn every_provider_side_talks_to_the_server_side_both_ways() {
        for provider in Provider::ALL {
            let ((mut caller, mut caller_life), (mut server, mut server_life)) = pair(provider);
            assert_eq!(server_life.recv().await, Some(StreamEvent::Started), "{provider}");
            // Loud audio from each side arrives at the other.
            caller.control.play(vec![8000; 3200]).await;
            assert!(matches!(caller.events.recv().await, Some(MediaEvent::PlayoutStarted { .. })), "{provider}");
            assert!(matches!(caller.events.recv().await, Some(MediaEvent::PlayoutEnded { .. })), "{provider}");
            server.control.play(vec![8000; 3200]).await;
            let loud = |f: &AudioFrame| f.pcm.iter().map(|s| i64::from(s.unsigned_abs())).sum::<i64>() / f.pcm.len() as i64 > 2000;
            let mut heard_by_server = false;
            while !heard_by_server {
                heard_by_server = loud(&server.incoming.recv().await.expect("caller audio"));
            }
            let mut heard_by_caller = false;
            while !heard_by_caller {
                heard_by_caller = loud(&caller.incoming.recv().await.expect("agent audio"));
            }
            // The caller hangs up the provider's way; both sides see the end.
            caller.control.close().await;
            assert_eq!(caller_life.recv().await, Some(StreamEvent::Started), "{provider}");
            assert_eq!(caller_life.recv().await, Some(StreamEvent::Ended(StreamEnd::Closed)), "{provider}");
            assert_eq!(server_life.recv().await, Some(StreamEvent::Ended(StreamEnd::Stopped)), "{provider}");
        }
    }
}
