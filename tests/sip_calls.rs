//! The SIP user agent against SIPp, a real SIP peer: outbound calls with
//! media, failures, remote hang-up, re-INVITE, and inbound calls.

mod common;

use std::time::Duration;

use common::sipp::{config_for, scenario, Sipp};
use tokio_util::sync::CancellationToken;
use voxgate_sip::{CallEvent, CallStatus, Dial, EndReason, SipAgent};

const PIPELINE_RATE: usize = 16_000;

fn tone_1khz(ms: usize) -> Vec<i16> {
    (0..PIPELINE_RATE * ms / 1000)
        .map(|n| (8000.0 * (2.0 * std::f32::consts::PI * 1000.0 * n as f32 / PIPELINE_RATE as f32).sin()) as i16)
        .collect()
}

fn dial() -> Dial {
    Dial { trunk: None, number: "+14155550123".into() }
}

async fn next_event(call: &mut voxgate_sip::Call) -> CallEvent {
    tokio::time::timeout(Duration::from_secs(15), call.events.recv()).await.expect("event in time").expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_call_echoes_a_tone_without_loss_and_hangs_up_with_bye() {
    let mut sipp = Sipp::uas("uas", &["-rtp_echo"]);
    let cancel = CancellationToken::new();
    let (agent, _inbound) = SipAgent::start(config_for(&sipp), cancel.clone()).await.unwrap();
    let mut call = agent.dial(dial()).await.unwrap();
    assert!(matches!(next_event(&mut call).await, CallEvent::Ringing { code: 180, .. }));
    assert!(matches!(next_event(&mut call).await, CallEvent::Answered { .. }));

    call.media.control.play(tone_1khz(5000)).await;
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(5600);
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, call.media.incoming.recv()).await {
        received.extend(frame.pcm);
    }
    let loud: Vec<i16> = received.iter().copied().skip_while(|s| s.unsigned_abs() < 2000).take(4 * PIPELINE_RATE).collect();
    assert_eq!(loud.len(), 4 * PIPELINE_RATE, "at least 4 s of the tone came back");
    let crossings = loud.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
    let freq = crossings as f32 / 4.0;
    assert!((995.0..=1005.0).contains(&freq), "echoed tone at {freq} Hz");
    let stats = call.media.control.stats();
    assert_eq!(stats.jitter.lost, 0, "{stats:?}");
    assert_eq!(stats.jitter.loss_percent, 0.0);
    assert!(stats.packets_received >= 250, "{stats:?}");

    call.hangup().await;
    let outcome = call.ended().await.unwrap();
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Completed, EndReason::LocalHangup));
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp saw a complete call (BYE answered)");
    cancel.cancel();
}
