//! voxgate-sip: the SIP user agent (on `rsipstack`).
//!
//! Owns outbound calls (UAC) to configured trunks and inbound calls (UAS):
//! digest authentication, dialogs, CANCEL/BYE/re-INVITE, session timers,
//! SDP offer/answer, and the mapping from SIP codes to call statuses.
//! Knows nothing of HTTP, billing or the speech pipeline. Empty until the
//! issue "SIP user agent and RTP media engine" lands.
