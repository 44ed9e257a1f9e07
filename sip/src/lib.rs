//! voxgate-sip: the SIP user agent, on `rsipstack`.
//!
//! Owns outbound calls (UAC) to configured trunks and inbound calls (UAS):
//! digest authentication (through rsipstack, MD5 and SHA-256), dialogs, CANCEL and BYE,
//! re-INVITE answers, SDP offer/answer (with `voxgate-media`), ring and
//! media timeouts, and the mapping from SIP outcomes to a [`CallStatus`].
//! Each call's media is a `voxgate_media::session` the caller of this crate
//! reads and writes; a call carried by a media stream instead of a dialog
//! gets the same [`Call`] ([`stream_leg`]). Knows nothing of HTTP, billing or the speech pipeline.

pub mod agent;
pub mod config;
mod digest;
pub mod error;
pub mod status;
pub mod stream_leg;

pub use agent::{Call, CallEvent, Dial, InboundCall, SipAgent};
pub use config::{SipConfig, Transport, Trunk};
pub use error::SipError;
pub use status::{CallStatus, EndReason, Outcome};
pub use stream_leg::{stream_call, stream_outcome};
