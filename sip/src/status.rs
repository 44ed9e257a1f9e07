//! Call outcomes: the status a call ends in, and why, from SIP responses
//! and dialog events.

use std::fmt;

/// Where a call is in its life. Final states: completed, busy, no-answer,
/// canceled, failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallStatus {
    Queued,
    Ringing,
    InProgress,
    Completed,
    Busy,
    NoAnswer,
    Canceled,
    Failed,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Queued => "queued",
            CallStatus::Ringing => "ringing",
            CallStatus::InProgress => "in-progress",
            CallStatus::Completed => "completed",
            CallStatus::Busy => "busy",
            CallStatus::NoAnswer => "no-answer",
            CallStatus::Canceled => "canceled",
            CallStatus::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, CallStatus::Queued | CallStatus::Ringing | CallStatus::InProgress)
    }

    /// The status a final non-2xx response to our INVITE means.
    pub fn from_final_response(code: u16) -> CallStatus {
        match code {
            486 | 600 => CallStatus::Busy,
            408 | 480 => CallStatus::NoAnswer,
            487 => CallStatus::Canceled,
            _ => CallStatus::Failed,
        }
    }
}

impl fmt::Display for CallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The far end sent BYE.
    RemoteHangup,
    /// We sent BYE (the API's hang-up, or the agent ended the call).
    LocalHangup,
    /// No RTP for the media timeout.
    MediaTimeout,
    /// The far end did not refresh the session in time (RFC 4028).
    SessionExpired,
    /// We CANCELled before answer.
    Canceled,
    /// Nobody answered within the ring timeout.
    RingTimeout,
    /// The far end refused the call (see the SIP code).
    Rejected,
    /// No response, or the transport failed.
    TransportError,
    /// A WebSocket media stream broke its protocol and was closed.
    StreamError,
    /// The provider never connected the call's media stream.
    NotConnected,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::RemoteHangup => "remote-hangup",
            EndReason::LocalHangup => "local-hangup",
            EndReason::MediaTimeout => "media-timeout",
            EndReason::SessionExpired => "session-expired",
            EndReason::Canceled => "canceled",
            EndReason::RingTimeout => "ring-timeout",
            EndReason::Rejected => "rejected",
            EndReason::TransportError => "transport-error",
            EndReason::StreamError => "stream-error",
            EndReason::NotConnected => "not-connected",
        }
    }
}

/// How a call ended: status, reason, and the raw SIP code and phrase of the
/// final response when there was one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: CallStatus,
    pub reason: EndReason,
    pub sip_code: Option<u16>,
    pub sip_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_responses_map_to_statuses() {
        for (code, status) in [
            (486, CallStatus::Busy),
            (600, CallStatus::Busy),
            (480, CallStatus::NoAnswer),
            (408, CallStatus::NoAnswer),
            (487, CallStatus::Canceled),
            (404, CallStatus::Failed),
            (484, CallStatus::Failed),
            (403, CallStatus::Failed),
            (488, CallStatus::Failed),
            (503, CallStatus::Failed),
            (401, CallStatus::Failed),
        ] {
            assert_eq!(CallStatus::from_final_response(code), status, "{code}");
            assert!(status.is_final());
        }
        assert!(!CallStatus::Ringing.is_final());
        assert_eq!(CallStatus::InProgress.to_string(), "in-progress");
    }
}
