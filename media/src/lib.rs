//! voxgate-media: moving audio.
//!
//! Owns RTP sessions (symmetric RTP, SSRC latching, RTCP), the jitter buffer,
//! G.711 and Opus codecs, resampling, RFC 4733 DTMF, WebSocket media streams
//! and the WebRTC peer. Knows nothing of HTTP or SIP signalling.
//!
//! Present so far: [`g711`], [`jitter`], [`dtmf`], [`sdp`], [`resample`] and
//! RTP [`session`]s with G.711. Opus comes with the rest of the issue "SIP
//! user agent and RTP media engine".

pub mod dtmf;
pub mod error;
pub mod g711;
pub mod jitter;
pub mod resample;
pub mod sdp;
pub mod session;

pub use error::MediaError;
