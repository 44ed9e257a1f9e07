//! voxgate-media: moving audio.
//!
//! Owns RTP sessions (symmetric RTP, SSRC latching, RTCP), the jitter buffer,
//! G.711 and Opus codecs, resampling, RFC 4733 DTMF, WebSocket media streams
//! and the WebRTC peer. Knows nothing of HTTP or SIP signalling.
//!
//! RTP legs are [`session`]s; WebSocket legs (Twilio, Telnyx, Plivo,
//! Vonage media streams) are [`streams`]; browser legs are [`webrtc`]. All
//! hand the rest of the system the same [`session::MediaHandle`].

pub mod dtmf;
pub mod error;
pub mod g711;
pub mod jitter;
pub mod resample;
pub mod sdp;
pub mod session;
pub mod streams;
mod udp;
pub mod webrtc;

pub use error::MediaError;
