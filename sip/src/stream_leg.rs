//! Calls whose leg is a media stream (a CPaaS WebSocket, a browser's
//! WebRTC connection) instead of a SIP dialog: the stream's life told as
//! the same [`CallEvent`]s, so whoever holds the [`Call`] does not care
//! which carrier it is.

use std::time::Instant;

use tokio::sync::mpsc;
use voxgate_media::session::{MediaControl, MediaHandle};
use voxgate_media::streams::{StreamEnd, StreamEvent};

use crate::agent::{Call, CallEvent};
use crate::status::{CallStatus, EndReason, Outcome};

/// A call carried by `media`, whose life `life` reports: answered when the
/// stream starts, over when it ends (then `on_end` runs, before the
/// holder hears of it). Hang-up closes the stream.
pub fn stream_call(
    call_id: String,
    media: MediaHandle,
    life: mpsc::Receiver<StreamEvent>,
    on_end: impl FnOnce() + Send + 'static,
) -> Call {
    let (events_tx, events_rx) = mpsc::channel(8);
    let (hangup_tx, hangup_rx) = mpsc::channel(1);
    let control = media.control.clone();
    tokio::spawn(async move {
        let outcome = follow(life, &events_tx, hangup_rx, &control).await;
        on_end();
        let _ = events_tx.send(CallEvent::Ended(outcome)).await;
    });
    Call::new(call_id, events_rx, media, hangup_tx)
}

/// Reports the stream's start as the answer, and its end as the outcome.
async fn follow(
    mut life: mpsc::Receiver<StreamEvent>,
    events: &mpsc::Sender<CallEvent>,
    mut hangup: mpsc::Receiver<()>,
    control: &MediaControl,
) -> Outcome {
    let mut answered = false;
    let mut hung_up = false;
    loop {
        tokio::select! {
            ev = life.recv() => match ev {
                Some(StreamEvent::Started) => {
                    answered = true;
                    let _ = events.send(CallEvent::Answered { at: Instant::now() }).await;
                }
                Some(StreamEvent::Ended(end)) => return stream_outcome(&end, answered, hung_up),
                None => return stream_outcome(&StreamEnd::Closed, answered, true),
            },
            Some(()) = hangup.recv(), if !hung_up => {
                hung_up = true;
                control.close().await;
            }
        }
    }
}

/// How a call whose stream ended this way ends.
pub fn stream_outcome(end: &StreamEnd, answered: bool, hung_up: bool) -> Outcome {
    let (status, reason) = match end {
        _ if hung_up && answered => (CallStatus::Completed, EndReason::LocalHangup),
        _ if hung_up => (CallStatus::Canceled, EndReason::Canceled),
        StreamEnd::Stopped | StreamEnd::Closed if answered => (CallStatus::Completed, EndReason::RemoteHangup),
        StreamEnd::Stopped | StreamEnd::Closed => (CallStatus::Failed, EndReason::NotConnected),
        StreamEnd::Timeout => (CallStatus::Completed, EndReason::MediaTimeout),
        StreamEnd::NotConnected => (CallStatus::Failed, EndReason::NotConnected),
        StreamEnd::Error(_) | StreamEnd::Failed(_) if answered => (CallStatus::Completed, EndReason::StreamError),
        StreamEnd::Error(_) | StreamEnd::Failed(_) => (CallStatus::Failed, EndReason::StreamError),
    };
    let detail = match end {
        StreamEnd::Error(e) => Some(e.reason.clone()),
        StreamEnd::Failed(reason) => Some(reason.clone()),
        _ => None,
    };
    Outcome { status, reason, sip_code: None, sip_reason: detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_who_ended_the_stream() {
        let o = stream_outcome(&StreamEnd::Stopped, true, false);
        assert_eq!((o.status, o.reason), (CallStatus::Completed, EndReason::RemoteHangup));
        let o = stream_outcome(&StreamEnd::Closed, true, true);
        assert_eq!((o.status, o.reason), (CallStatus::Completed, EndReason::LocalHangup));
        let o = stream_outcome(&StreamEnd::NotConnected, false, false);
        assert_eq!((o.status, o.reason), (CallStatus::Failed, EndReason::NotConnected));
        let e = voxgate_media::streams::protocol::ProtocolError::new(1007, "bad");
        let o = stream_outcome(&StreamEnd::Error(e), true, false);
        assert_eq!((o.status, o.reason, o.sip_reason.as_deref()), (CallStatus::Completed, EndReason::StreamError, Some("bad")));
    }
}
