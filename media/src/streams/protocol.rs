//! The wire protocols of CPaaS media streams: what Twilio, Telnyx, Plivo and
//! Vonage send over the WebSocket they open to us, and what we send back.
//!
//! Parsing turns a text or binary message into an [`Inbound`] event or a
//! [`ProtocolError`] that says how to close the socket and why; building
//! turns our media, marks and clears into the provider's messages. Nothing
//! here does I/O or keeps state beyond one message.
//!
//! - Twilio Media Streams: JSON `connected`, `start` (`mediaFormat`
//!   audio/x-mulaw 8000), `media` (base64 µ-law), `dtmf`, `mark`, `stop`;
//!   we send `media`, `mark` and `clear`, each with the `streamSid`.
//! - Telnyx: the same shape in snake case (`stream_id`, `sequence_number`,
//!   `media_format` PCMU/PCMA/L16); we send `media`, `mark`, `clear`.
//! - Plivo: `start` first (no `connected`), `media`, `dtmf`, and the
//!   acknowledgements `playedStream` / `clearedAudio`; we send `playAudio`,
//!   `checkpoint`, `clearAudio` and `sendDTMF`.
//! - Vonage: one text `websocket:connected` (its `content-type` gives the
//!   L16 rate), then binary frames of signed 16-bit little-endian PCM both
//!   ways; control as JSON text (`clear`, `notify` ↔ `websocket:cleared`,
//!   `websocket:notify`, `websocket:dtmf`).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// Largest text message accepted (a 20 ms media message is ~250 bytes; a
/// start with custom parameters a few kB).
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Largest audio in one message: one second at 16 kHz L16.
pub const MAX_AUDIO_BYTES: usize = 32_000;

/// WebSocket close codes (RFC 6455 §7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    Twilio,
    Telnyx,
    Plivo,
    Vonage,
}

impl Provider {
    pub const ALL: [Provider; 4] = [Provider::Twilio, Provider::Telnyx, Provider::Plivo, Provider::Vonage];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Twilio => "twilio",
            Provider::Telnyx => "telnyx",
            Provider::Plivo => "plivo",
            Provider::Vonage => "vonage",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown media stream provider '{s}' (twilio, telnyx, plivo, vonage)"))
    }
}

/// How the stream's audio is coded (the same both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Ulaw,
    Alaw,
    /// Signed 16-bit linear PCM at this rate (8 or 16 kHz).
    L16 { rate: u32, big_endian: bool },
}

impl Encoding {
    pub fn rate(self) -> u32 {
        match self {
            Encoding::Ulaw | Encoding::Alaw => 8000,
            Encoding::L16 { rate, .. } => rate,
        }
    }
}

/// What a stream's `start` told us.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStart {
    /// The provider's stream id (`streamSid`, `stream_id`, `streamId`); empty for Vonage.
    pub stream_id: String,
    /// The provider's call id (`callSid`, `call_control_id`, `callId`).
    pub call_id: Option<String>,
    pub encoding: Encoding,
    /// `customParameters`, `client_state`, `extra_headers` or Vonage's headers.
    pub parameters: Map<String, Value>,
}

/// One message from the provider.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Connected,
    Start(StreamStart),
    /// Coded audio of the caller's track.
    Media(Vec<u8>),
    /// Audio of another track (a `both_tracks` stream): not the caller's.
    OtherTrack,
    Dtmf(char),
    /// Playback reached a mark we sent.
    Mark(String),
    /// The provider confirmed a clear.
    Cleared,
    Stop,
    /// An event this version does not use (providers add events).
    Other(String),
}

/// A message that ends the stream: the close code and the reason logged
/// and sent in the close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: u16,
    pub reason: String,
}

impl ProtocolError {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        ProtocolError { code, reason: reason.into() }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (close {})", self.reason, self.code)
    }
}

/// A WebSocket message, either way.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    Close { code: u16, reason: String },
}

impl Provider {
    /// Parses one message.
    pub fn parse(self, frame: &Frame) -> Result<Inbound, ProtocolError> {
        match frame {
            Frame::Text(text) => {
                if text.len() > MAX_TEXT_BYTES {
                    return Err(ProtocolError::new(close::TOO_BIG, format!("text message of {} bytes (limit {MAX_TEXT_BYTES})", text.len())));
                }
                let v: Value = serde_json::from_str(text)
                    .map_err(|e| ProtocolError::new(close::INVALID_PAYLOAD, format!("message is not JSON: {e}")))?;
                if !v.is_object() {
                    return Err(ProtocolError::new(close::INVALID_PAYLOAD, "message is not a JSON object"));
                }
                match self {
                    Provider::Twilio | Provider::Telnyx | Provider::Plivo => self.parse_json(&v),
                    Provider::Vonage => parse_vonage(&v),
                }
            }
            Frame::Binary(bytes) if self == Provider::Vonage => {
                if bytes.len() > MAX_AUDIO_BYTES {
                    return Err(ProtocolError::new(close::TOO_BIG, format!("audio frame of {} bytes (limit {MAX_AUDIO_BYTES})", bytes.len())));
                }
                if bytes.len() % 2 != 0 {
                    return Err(ProtocolError::new(close::INVALID_PAYLOAD, "L16 frame with an odd number of bytes"));
                }
                Ok(Inbound::Media(bytes.clone()))
            }
            Frame::Binary(_) => Err(ProtocolError::new(close::UNSUPPORTED_DATA, format!("{self} streams send JSON text, not binary"))),
            Frame::Close { .. } => Ok(Inbound::Stop),
        }
    }

    fn parse_json(self, v: &Value) -> Result<Inbound, ProtocolError> {
        let event = str_field(v, "event").ok_or_else(|| ProtocolError::new(close::INVALID_PAYLOAD, "message has no \"event\""))?;
        Ok(match event {
            "connected" if self != Provider::Plivo => Inbound::Connected,
            "start" => Inbound::Start(self.parse_start(v)?),
            "media" => {
                let media = v.get("media").ok_or_else(|| missing("media"))?;
                match str_field(media, "track") {
                    Some("outbound") | Some("outbound_track") => return Ok(Inbound::OtherTrack),
                    _ => {}
                }
                let payload = str_field(media, "payload").ok_or_else(|| missing("media.payload"))?;
                if payload.len() > MAX_AUDIO_BYTES * 4 / 3 + 4 {
                    return Err(ProtocolError::new(close::TOO_BIG, format!("media payload of {} base64 characters", payload.len())));
                }
                let bytes = B64
                    .decode(payload)
                    .map_err(|e| ProtocolError::new(close::INVALID_PAYLOAD, format!("media payload is not base64: {e}")))?;
                Inbound::Media(bytes)
            }
            "dtmf" => {
                let digit = v.get("dtmf").and_then(|d| str_field(d, "digit")).ok_or_else(|| missing("dtmf.digit"))?;
                Inbound::Dtmf(dtmf_digit(digit)?)
            }
            "mark" if self != Provider::Plivo => {
                Inbound::Mark(v.get("mark").and_then(|m| str_field(m, "name")).unwrap_or_default().to_owned())
            }
            "playedStream" | "played" if self == Provider::Plivo => Inbound::Mark(str_field(v, "name").unwrap_or_default().to_owned()),
            "clearedAudio" if self == Provider::Plivo => Inbound::Cleared,
            "stop" => Inbound::Stop,
            other => Inbound::Other(other.to_owned()),
        })
    }

    fn parse_start(self, v: &Value) -> Result<StreamStart, ProtocolError> {
        let start = v.get("start").ok_or_else(|| missing("start"))?;
        let (stream_id, call_id, format, parameters) = match self {
            Provider::Twilio => (
                str_field(v, "streamSid").or_else(|| str_field(start, "streamSid")),
                str_field(start, "callSid"),
                start.get("mediaFormat"),
                start.get("customParameters").and_then(Value::as_object).cloned().unwrap_or_default(),
            ),
            Provider::Telnyx => (
                str_field(v, "stream_id"),
                str_field(start, "call_control_id"),
                start.get("media_format"),
                client_state(start),
            ),
            Provider::Plivo => (
                str_field(start, "streamId").or_else(|| str_field(v, "streamId")),
                str_field(start, "callId"),
                start.get("mediaFormat"),
                plivo_headers(v),
            ),
            Provider::Vonage => unreachable!("Vonage starts with websocket:connected"),
        };
        let stream_id = stream_id.ok_or_else(|| missing("the stream id"))?.to_owned();
        let format = format.ok_or_else(|| missing("the media format"))?;
        let encoding = str_field(format, "encoding").ok_or_else(|| missing("mediaFormat.encoding"))?;
        let rate = format.get("sampleRate").or_else(|| format.get("sample_rate")).and_then(number_or_string).unwrap_or(8000);
        let channels = format.get("channels").and_then(number_or_string).unwrap_or(1);
        if channels != 1 {
            return Err(ProtocolError::new(close::UNSUPPORTED_DATA, format!("{channels} audio channels (only mono)")));
        }
        let encoding = match (encoding.to_ascii_lowercase().as_str(), rate) {
            ("audio/x-mulaw" | "pcmu", 8000) => Encoding::Ulaw,
            ("audio/x-alaw" | "pcma", 8000) => Encoding::Alaw,
            ("audio/x-l16" | "l16", 8000 | 16000) => Encoding::L16 { rate: rate as u32, big_endian: self == Provider::Telnyx },
            (e, r) => return Err(ProtocolError::new(close::UNSUPPORTED_DATA, format!("unsupported media format {e} at {r} Hz"))),
        };
        Ok(StreamStart { stream_id, call_id: call_id.map(str::to_owned), encoding, parameters })
    }

    /// Caller-bound audio (already coded in the stream's encoding).
    pub fn media(self, stream_id: &str, encoding: Encoding, coded: Vec<u8>) -> Frame {
        let payload = || B64.encode(&coded);
        match self {
            Provider::Twilio => text(json!({"event": "media", "streamSid": stream_id, "media": {"payload": payload()}})),
            Provider::Telnyx => text(json!({"event": "media", "media": {"payload": payload()}})),
            Provider::Plivo => {
                let content_type = match encoding {
                    Encoding::Ulaw => "audio/x-mulaw",
                    Encoding::Alaw => "audio/x-alaw",
                    Encoding::L16 { .. } => "audio/x-l16",
                };
                text(json!({"event": "playAudio", "media": {"contentType": content_type, "sampleRate": encoding.rate(), "payload": payload()}}))
            }
            Provider::Vonage => Frame::Binary(coded),
        }
    }

    /// Drop the audio the provider has queued (barge-in).
    pub fn clear(self, stream_id: &str) -> Frame {
        match self {
            Provider::Twilio => text(json!({"event": "clear", "streamSid": stream_id})),
            Provider::Telnyx => text(json!({"event": "clear"})),
            Provider::Plivo => text(json!({"event": "clearAudio", "streamId": stream_id})),
            Provider::Vonage => text(json!({"action": "clear"})),
        }
    }

    /// Ask to be told when playback reaches this point.
    pub fn mark(self, stream_id: &str, name: &str) -> Frame {
        match self {
            Provider::Twilio => text(json!({"event": "mark", "streamSid": stream_id, "mark": {"name": name}})),
            Provider::Telnyx => text(json!({"event": "mark", "mark": {"name": name}})),
            Provider::Plivo => text(json!({"event": "checkpoint", "streamId": stream_id, "name": name})),
            Provider::Vonage => text(json!({"action": "notify", "payload": {"name": name}})),
        }
    }

    /// A key press sent as a message, where the provider has one (Plivo);
    /// the others get the tones in the audio.
    pub fn dtmf(self, stream_id: &str, digit: char) -> Option<Frame> {
        (self == Provider::Plivo).then(|| text(json!({"event": "sendDTMF", "streamId": stream_id, "dtmf": digit.to_string()})))
    }
}

fn parse_vonage(v: &Value) -> Result<Inbound, ProtocolError> {
    // Vonage's control messages carry "event"; the first one also the headers.
    let event = str_field(v, "event").ok_or_else(|| ProtocolError::new(close::INVALID_PAYLOAD, "message has no \"event\""))?;
    Ok(match event {
        "websocket:connected" => {
            let content_type = str_field(v, "content-type").ok_or_else(|| missing("content-type"))?;
            let rate = match content_type.replace(' ', "").to_ascii_lowercase().as_str() {
                "audio/l16;rate=16000" => 16000,
                "audio/l16;rate=8000" => 8000,
                other => return Err(ProtocolError::new(close::UNSUPPORTED_DATA, format!("unsupported content-type {other}"))),
            };
            let mut parameters = v.as_object().cloned().unwrap_or_default();
            parameters.remove("event");
            parameters.remove("content-type");
            let call_id = ["uuid", "call_uuid", "conversation_uuid"]
                .iter()
                .find_map(|k| str_field(v, k))
                .map(str::to_owned);
            Inbound::Start(StreamStart {
                stream_id: String::new(),
                call_id,
                encoding: Encoding::L16 { rate, big_endian: false },
                parameters,
            })
        }
        "websocket:dtmf" => Inbound::Dtmf(dtmf_digit(str_field(v, "digit").ok_or_else(|| missing("digit"))?)?),
        "websocket:notify" => {
            Inbound::Mark(v.get("payload").and_then(|p| str_field(p, "name")).unwrap_or_default().to_owned())
        }
        "websocket:cleared" => Inbound::Cleared,
        other => Inbound::Other(other.to_owned()),
    })
}

fn text(v: Value) -> Frame {
    Frame::Text(v.to_string())
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Providers write numbers as numbers or as strings ("8000").
fn number_or_string(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

fn missing(what: &str) -> ProtocolError {
    ProtocolError::new(close::INVALID_PAYLOAD, format!("message lacks {what}"))
}

fn dtmf_digit(s: &str) -> Result<char, ProtocolError> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if crate::dtmf::event_of(c.to_ascii_uppercase()).is_some() => Ok(c.to_ascii_uppercase()),
        _ => Err(ProtocolError::new(close::INVALID_PAYLOAD, format!("'{s}' is not a DTMF key"))),
    }
}

/// Telnyx passes `client_state` (base64 of whatever the dialer set).
fn client_state(start: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(state) = str_field(start, "client_state") {
        m.insert("client_state".into(), Value::String(state.to_owned()));
    }
    m
}

/// Plivo's `extra_headers` is "k1=v1;k2=v2".
fn plivo_headers(v: &Value) -> Map<String, Value> {
    str_field(v, "extra_headers")
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), Value::String(v.trim().to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Value) -> Frame {
        Frame::Text(v.to_string())
    }

    #[test]
    fn twilio_messages_as_documented_parse() {
        let p = Provider::Twilio;
        assert_eq!(p.parse(&t(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}))), Ok(Inbound::Connected));
        let start = json!({
            "event": "start", "sequenceNumber": "1", "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
            "start": {"accountSid": "AC123", "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0", "callSid": "CA123",
                      "tracks": ["inbound"], "customParameters": {"FirstName": "Jane"},
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
        });
        let Ok(Inbound::Start(s)) = p.parse(&t(start)) else { panic!("start") };
        assert_eq!(s.stream_id, "MZ18ad3ab5a668481ce02b83e7395059f0");
        assert_eq!(s.call_id.as_deref(), Some("CA123"));
        assert_eq!(s.encoding, Encoding::Ulaw);
        assert_eq!(s.parameters["FirstName"], "Jane");
        let media = json!({"event": "media", "sequenceNumber": "3", "streamSid": "MZ1",
            "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": B64.encode([0xffu8; 160])}});
        assert_eq!(p.parse(&t(media)), Ok(Inbound::Media(vec![0xff; 160])));
        let dtmf = json!({"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "5", "dtmf": {"track": "inbound_track", "digit": "1"}});
        assert_eq!(p.parse(&t(dtmf)), Ok(Inbound::Dtmf('1')));
        let mark = json!({"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "spurt-1"}});
        assert_eq!(p.parse(&t(mark)), Ok(Inbound::Mark("spurt-1".into())));
        assert_eq!(p.parse(&t(json!({"event": "stop", "sequenceNumber": "5", "stop": {"callSid": "CA1"}}))), Ok(Inbound::Stop));
    }

    #[test]
    fn bad_messages_close_with_a_reason() {
        let p = Provider::Twilio;
        let e = p.parse(&Frame::Text("{not json".into())).unwrap_err();
        assert_eq!(e.code, close::INVALID_PAYLOAD);
        assert!(e.reason.contains("not JSON"), "{e}");
        let bad_b64 = json!({"event": "media", "media": {"payload": "!!!not base64!!!"}});
        assert!(p.parse(&t(bad_b64)).unwrap_err().reason.contains("base64"));
        let big = json!({"event": "media", "media": {"payload": B64.encode(vec![0u8; 40_000])}});
        assert_eq!(p.parse(&t(big)).unwrap_err().code, close::TOO_BIG);
        assert_eq!(p.parse(&Frame::Text("x".repeat(MAX_TEXT_BYTES + 1))).unwrap_err().code, close::TOO_BIG);
        assert_eq!(p.parse(&Frame::Binary(vec![0; 10])).unwrap_err().code, close::UNSUPPORTED_DATA);
        let stereo = json!({"event": "start", "streamSid": "MZ1",
            "start": {"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2}}});
        assert_eq!(p.parse(&t(stereo)).unwrap_err().code, close::UNSUPPORTED_DATA);
        let opus = json!({"event": "start", "streamSid": "MZ1", "start": {"mediaFormat": {"encoding": "audio/opus", "sampleRate": 48000}}});
        assert!(p.parse(&t(opus)).unwrap_err().reason.contains("unsupported media format"));
        assert!(p.parse(&t(json!({"event": "dtmf", "dtmf": {"digit": "X"}}))).is_err());
        assert!(p.parse(&t(json!([1, 2]))).is_err());
        assert_eq!(p.parse(&t(json!({"event": "future"}))), Ok(Inbound::Other("future".into())));
    }

    #[test]
    fn telnyx_and_plivo_variants_parse() {
        let start = json!({"event": "start", "sequence_number": "1", "stream_id": "32DE0DEA",
            "start": {"user_id": "u", "call_control_id": "v3:abc", "client_state": "aGk=",
                      "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}});
        let Ok(Inbound::Start(s)) = Provider::Telnyx.parse(&t(start)) else { panic!("telnyx start") };
        assert_eq!((s.stream_id.as_str(), s.call_id.as_deref(), s.encoding), ("32DE0DEA", Some("v3:abc"), Encoding::Alaw));
        assert_eq!(s.parameters["client_state"], "aGk=");
        let start = json!({"event": "start", "sequenceNumber": 1,
            "start": {"callId": "c-1", "streamId": "s-1", "accountId": "MA1", "tracks": ["inbound"],
                      "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000}},
            "extra_headers": "userId=12345;sessionId=abc"});
        let Ok(Inbound::Start(s)) = Provider::Plivo.parse(&t(start)) else { panic!("plivo start") };
        assert_eq!(s.encoding, Encoding::L16 { rate: 16000, big_endian: false });
        assert_eq!(s.parameters["sessionId"], "abc");
        let played = json!({"event": "playedStream", "streamId": "s-1", "name": "spurt-2"});
        assert_eq!(Provider::Plivo.parse(&t(played)), Ok(Inbound::Mark("spurt-2".into())));
        let m = Provider::Plivo.media("s-1", Encoding::Ulaw, vec![1, 2]);
        let Frame::Text(m) = m else { panic!() };
        let m: Value = serde_json::from_str(&m).unwrap();
        assert_eq!((m["event"].as_str(), m["media"]["contentType"].as_str()), (Some("playAudio"), Some("audio/x-mulaw")));
    }

    #[test]
    fn vonage_is_binary_l16_after_a_text_header() {
        let p = Provider::Vonage;
        let hello = json!({"event": "websocket:connected", "content-type": "audio/l16;rate=16000", "agent": "a1"});
        let Ok(Inbound::Start(s)) = p.parse(&t(hello)) else { panic!("start") };
        assert_eq!(s.encoding, Encoding::L16 { rate: 16000, big_endian: false });
        assert_eq!(s.parameters["agent"], "a1");
        assert_eq!(p.parse(&Frame::Binary(vec![0; 640])), Ok(Inbound::Media(vec![0; 640])));
        assert!(p.parse(&Frame::Binary(vec![0; 641])).is_err());
        assert_eq!(p.parse(&Frame::Binary(vec![0; MAX_AUDIO_BYTES + 2])).unwrap_err().code, close::TOO_BIG);
        assert_eq!(p.parse(&t(json!({"event": "websocket:dtmf", "digit": "5", "duration": 260}))), Ok(Inbound::Dtmf('5')));
        assert_eq!(p.media("", Encoding::L16 { rate: 16000, big_endian: false }, vec![1, 2]), Frame::Binary(vec![1, 2]));
        assert_eq!(p.clear(""), Frame::Text(r#"{"action":"clear"}"#.into()));
    }

    #[test]
    fn providers_round_trip_their_names() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>(), Ok(p));
        }
        assert!("skype".parse::<Provider>().is_err());
    }
}
