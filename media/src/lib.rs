//! voxgate-media: moving audio.
//!
//! Owns RTP sessions (symmetric RTP, SSRC latching, RTCP), the jitter buffer,
//! G.711 and Opus codecs, resampling, RFC 4733 DTMF, WebSocket media streams
//! and the WebRTC peer. Knows nothing of HTTP or SIP signalling. Empty until
//! the issue "SIP user agent and RTP media engine" lands.
