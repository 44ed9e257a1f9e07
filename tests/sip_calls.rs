//! The SIP user agent against SIPp, a real SIP peer: outbound calls with
//! media, failures, remote hang-up, re-INVITE, and inbound calls.

mod common;

use std::time::Duration;

use common::sipp::{config_for, inbound_config, scenario, Sipp};
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
    // The pitch from the spacing of rising zero crossings where the tone is
    // unbroken: on a busy machine an echoed packet can come after its tick,
    // which the jitter buffer conceals and then plays a frame late (no loss)
    // -- a gap in the tone, not a change of pitch, so gaps are left out.
    let rising: Vec<usize> = loud.windows(2).enumerate().filter(|(_, w)| w[0] < 0 && w[1] >= 0).map(|(i, _)| i).collect();
    let periods: Vec<usize> = rising.windows(2).map(|r| r[1] - r[0]).filter(|p| (12..=20).contains(p)).collect();
    assert!(periods.len() >= 3 * 1000, "at least 3 s of the 4 unbroken: {} periods", periods.len());
    let freq = PIPELINE_RATE as f32 * periods.len() as f32 / periods.iter().sum::<usize>() as f32;
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

/// How the call ended within `secs`, or a panic showing what happened
/// instead: the events so far and what SIPp reported.
async fn ended_within(call: &mut voxgate_sip::Call, secs: u64, sipp: &Sipp) -> voxgate_sip::Outcome {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, call.events.recv()).await {
            Ok(Some(CallEvent::Ended(o))) => return o,
            Ok(Some(ev)) => seen.push(ev),
            Ok(None) => panic!("events closed without an end after {seen:?}"),
            Err(_) => panic!("no end within {secs} s; events {seen:?}; SIPp errors: {}", sipp.errors()),
        }
    }
}

async fn call_against(sipp: &Sipp, ring_timeout_secs: u64) -> (voxgate_sip::Call, CancellationToken) {
    let cancel = CancellationToken::new();
    let config = voxgate_sip::SipConfig { ring_timeout_secs, ..config_for(sipp) };
    let (agent, _inbound) = SipAgent::start(config, cancel.clone()).await.unwrap();
    (agent.dial(dial()).await.unwrap(), cancel)
}

#[tokio::test]
async fn busy_is_busy_with_code_486() {
    let mut sipp = Sipp::uas(scenario("uas_busy.xml").to_str().unwrap(), &[]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    let outcome = call.ended().await.unwrap();
    assert_eq!((outcome.status, outcome.sip_code), (CallStatus::Busy, Some(486)));
    assert_eq!(outcome.sip_reason.as_deref(), Some("Busy Here"));
    assert!(sipp.wait(Duration::from_secs(10)), "ACK for the 486 reached SIPp");
    cancel.cancel();
}

#[tokio::test]
async fn not_found_is_failed_with_code_404() {
    let mut sipp = Sipp::uas(scenario("uas_not_found.xml").to_str().unwrap(), &[]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    let outcome = call.ended().await.unwrap();
    assert_eq!((outcome.status, outcome.sip_code, outcome.reason), (CallStatus::Failed, Some(404), EndReason::Rejected));
    assert!(sipp.wait(Duration::from_secs(10)));
    cancel.cancel();
}

#[tokio::test]
async fn unanswered_call_is_cancelled_at_the_ring_timeout_as_no_answer() {
    let mut sipp = Sipp::uas(scenario("uas_no_answer.xml").to_str().unwrap(), &[]);
    let started = std::time::Instant::now();
    let (mut call, cancel) = call_against(&sipp, 2).await;
    assert!(matches!(next_event(&mut call).await, CallEvent::Ringing { code: 180, .. }));
    let outcome = call.ended().await.unwrap();
    let took = started.elapsed();
    assert_eq!((outcome.status, outcome.reason), (CallStatus::NoAnswer, EndReason::RingTimeout));
    assert_eq!(outcome.sip_code, Some(487));
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(8), "{took:?}");
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp got the CANCEL and the ACK for 487");
    cancel.cancel();
}

#[tokio::test]
async fn hangup_before_answer_sends_cancel() {
    let mut sipp = Sipp::uas(scenario("uas_no_answer.xml").to_str().unwrap(), &[]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    assert!(matches!(next_event(&mut call).await, CallEvent::Ringing { .. }));
    call.hangup().await;
    let outcome = call.ended().await.unwrap();
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Canceled, EndReason::Canceled));
    assert!(sipp.wait(Duration::from_secs(10)));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bye_from_the_far_end_completes_the_call_as_remote_hangup() {
    let mut sipp = Sipp::uas(scenario("uas_remote_bye.xml").to_str().unwrap(), &["-rtp_echo"]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    let answered_at = loop {
        if let CallEvent::Answered { at } = next_event(&mut call).await {
            break at;
        }
    };
    call.media.control.play(tone_1khz(5000)).await;
    let outcome = call.ended().await.unwrap();
    let duration = answered_at.elapsed();
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Completed, EndReason::RemoteHangup));
    assert!(duration >= Duration::from_millis(2800) && duration < Duration::from_millis(4500), "{duration:?}");
    assert!(sipp.wait(Duration::from_secs(10)), "our 200 OK to the BYE reached SIPp");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_call_is_answered_receives_pcma_speech_and_rfc4733_dtmf() {
    let cancel = CancellationToken::new();
    let (agent, mut inbound) = SipAgent::start(inbound_config("4155550199"), cancel.clone()).await.unwrap();

    // A number nobody configured is refused.
    let mut stranger = Sipp::uac("uac", agent.local_addr(), "4155550000", &[]);
    assert!(!stranger.wait(Duration::from_secs(15)), "SIPp's call to an unknown number fails");

    let mut sipp = Sipp::uac("uac_pcap", agent.local_addr(), "4155550199", &[]);
    let mut incoming = tokio::time::timeout(Duration::from_secs(10), inbound.recv()).await.expect("INVITE arrived").unwrap();
    assert_eq!(incoming.to, "4155550199");
    assert!(incoming.from.contains("sipp"), "{}", incoming.from);
    assert!(matches!(next_event(&mut incoming.call).await, CallEvent::Answered { .. }));

    let mut frames_with_speech = 0;
    let mut digits = String::new();
    let call = &mut incoming.call;
    let outcome = loop {
        tokio::select! {
            Some(frame) = call.media.incoming.recv() => {
                let energy = frame.pcm.iter().map(|s| i64::from(*s).pow(2)).sum::<i64>() / frame.pcm.len() as i64;
                if energy > 100 * 100 {
                    frames_with_speech += 1;
                }
            }
            Some(ev) = call.media.events.recv() => {
                if let voxgate_media::session::MediaEvent::Dtmf(d) = ev {
                    digits.push(d.digit);
                }
            }
            ev = call.events.recv() => match ev {
                Some(CallEvent::Ended(outcome)) => break outcome,
                Some(_) => {}
                None => panic!("call task ended without an outcome"),
            },
        }
    };
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Completed, EndReason::RemoteHangup));
    // The pcap holds 216 loud 30 ms packets: about 324 frames of 20 ms.
    assert!(frames_with_speech >= 300, "{frames_with_speech} frames (20 ms) of PCMA audio decoded");
    assert_eq!(digits, "1", "RFC 4733 digit from dtmf_2833_1.pcap");
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp completed its call");
    cancel.cancel();
}

async fn call_with_credentials(sipp: &Sipp, password: &str) -> (voxgate_sip::Call, CancellationToken) {
    let cancel = CancellationToken::new();
    let mut config = config_for(sipp);
    config.trunks[0].username = Some("alice".into());
    config.trunks[0].password = Some(password.into());
    let (agent, _inbound) = SipAgent::start(config, cancel.clone()).await.unwrap();
    (agent.dial(dial()).await.unwrap(), cancel)
}

#[tokio::test]
async fn digest_challenge_is_answered_once_and_the_call_connects() {
    let mut sipp = Sipp::uas(scenario("uas_digest.xml").to_str().unwrap(), &[]);
    connect_with_credentials_and_hang_up(&mut sipp).await;
}

/// Calls `sipp` as alice/secret, waits for the answer, hangs up, and checks
/// the call completed and SIPp saw it all (its scenario checked the digest).
async fn connect_with_credentials_and_hang_up(sipp: &mut Sipp) {
    let (mut call, cancel) = call_with_credentials(sipp, "secret").await;
    loop {
        match next_event(&mut call).await {
            CallEvent::Answered { .. } => break,
            CallEvent::Ended(o) => panic!("call ended before answer: {o:?}"),
            _ => {}
        }
    }
    call.hangup().await;
    assert_eq!(call.ended().await.unwrap().status, CallStatus::Completed);
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp accepted the credentials and saw the BYE");
    cancel.cancel();
}

/// The `key="value"` (or bare `key=value`) parameters of a Digest header.
fn digest_params(header: &str) -> std::collections::HashMap<String, String> {
    let body = header.trim().strip_prefix("Digest").expect("a Digest header").trim();
    let mut params = std::collections::HashMap::new();
    let mut rest = body;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = &rest[eq + 1..];
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').expect("closing quote");
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_at(after.find(',').unwrap_or(after.len())),
        };
        params.insert(key, value.trim().to_string());
        rest = tail;
    }
    params
}

/// RFC 7616 §3.4.1 response with qop=auth, SHA-256, computed here
/// independently of rsipstack.
fn sha256_digest_response(p: &std::collections::HashMap<String, String>, method: &str, password: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = |s: String| hex::encode(Sha256::digest(s.as_bytes()));
    let ha1 = h(format!("{}:{}:{password}", p["username"], p["realm"]));
    let ha2 = h(format!("{method}:{}", p["uri"]));
    h(format!("{ha1}:{}:{}:{}:{}:{ha2}", p["nonce"], p["nc"], p["cnonce"], p["qop"]))
}

#[test]
fn the_tests_sha256_digest_matches_rfc_7616s_example() {
    // RFC 7616 §3.9.1, the SHA-256 response for Mufasa.
    let p = digest_params(
        r#"Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", algorithm=SHA-256,
        nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", nc=00000001, cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth"#,
    );
    assert_eq!(
        sha256_digest_response(&p, "GET", "Circle of Life"),
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    );
}

#[tokio::test]
async fn sha256_digest_challenge_is_answered_with_a_correct_sha256_response() {
    let log = std::env::temp_dir().join(format!("sipp-sha256-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log_arg = log.display().to_string();
    let mut sipp = Sipp::uas(scenario("uas_digest_sha256.xml").to_str().unwrap(), &["-trace_logs", "-log_file", &log_arg]);
    connect_with_credentials_and_hang_up(&mut sipp).await;

    let logged = std::fs::read_to_string(&log).expect("SIPp logged the Authorization header");
    let header = logged.lines().find_map(|l| l.split_once("AUTH ").map(|(_, h)| h.to_string())).expect("an AUTH line");
    let p = digest_params(&header);
    assert_eq!(p["algorithm"].to_ascii_uppercase(), "SHA-256", "{header}");
    assert_eq!((p["username"].as_str(), p["realm"].as_str(), p["qop"].as_str()), ("alice", "voxgate.test", "auth"));
    assert_eq!(p["nonce"], "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v");
    assert_eq!(p["response"].len(), 64, "a SHA-256 response is 64 hex digits: {header}");
    assert_eq!(p["response"], sha256_digest_response(&p, "INVITE", "secret"), "{header}");
    assert_ne!(p["response"], sha256_digest_response(&p, "INVITE", "wrong"));
}

#[tokio::test]
async fn wrong_digest_password_fails_the_call_with_the_servers_code() {
    let mut sipp = Sipp::uas(scenario("uas_digest.xml").to_str().unwrap(), &[]);
    let (mut call, cancel) = call_with_credentials(&sipp, "wrong").await;
    let outcome = call.ended().await.unwrap();
    assert_eq!((outcome.status, outcome.sip_code), (CallStatus::Failed, Some(403)));
    assert!(sipp.wait(Duration::from_secs(10)));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_media_after_183_is_received_before_answer() {
    let mut sipp = Sipp::uas(scenario("uas_early_media.xml").to_str().unwrap(), &[]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    assert!(matches!(next_event(&mut call).await, CallEvent::Ringing { code: 183, .. }));
    assert_eq!(next_event(&mut call).await, CallEvent::EarlyMedia);
    let mut early_frames_with_sound = 0;
    loop {
        tokio::select! {
            Some(frame) = call.media.incoming.recv() => {
                let energy = frame.pcm.iter().map(|s| i64::from(*s).pow(2)).sum::<i64>() / frame.pcm.len() as i64;
                if energy > 100 * 100 {
                    early_frames_with_sound += 1;
                }
            }
            ev = call.events.recv() => match ev {
                Some(CallEvent::Answered { .. }) => break,
                other => panic!("unexpected {other:?}"),
            },
        }
    }
    assert!(early_frames_with_sound >= 75, "{early_frames_with_sound} frames of early media before the 200");
    call.hangup().await;
    assert_eq!(call.ended().await.unwrap().status, CallStatus::Completed);
    assert!(sipp.wait(Duration::from_secs(10)));
    cancel.cancel();
}

#[tokio::test]
async fn hold_and_resume_re_invites_are_answered_and_the_call_survives() {
    let mut sipp = Sipp::uas(scenario("uas_hold_resume.xml").to_str().unwrap(), &["-rtp_echo"]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    let mut directions = Vec::new();
    while directions.len() < 2 {
        match next_event(&mut call).await {
            CallEvent::Modified { remote_direction } => directions.push(remote_direction),
            CallEvent::Ended(o) => panic!("call ended: {o:?}"),
            _ => {}
        }
    }
    use voxgate_media::sdp::Direction;
    assert_eq!(directions, vec![Direction::SendOnly, Direction::SendRecv]);
    call.hangup().await;
    assert_eq!(call.ended().await.unwrap().reason, EndReason::LocalHangup);
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp checked our recvonly and sendrecv answers");
    cancel.cancel();
}

#[tokio::test]
async fn a_far_end_that_sends_no_rtp_is_hung_up_for_media_timeout() {
    // SIPp's uas answers but sends no RTP (no -rtp_echo), then waits for BYE.
    let mut sipp = Sipp::uas("uas", &[]);
    let cancel = CancellationToken::new();
    let config = voxgate_sip::SipConfig { media_timeout_secs: 2, ..config_for(&sipp) };
    let (agent, _inbound) = SipAgent::start(config, cancel.clone()).await.unwrap();
    let mut call = agent.dial(dial()).await.unwrap();
    let outcome = ended_within(&mut call, 15, &sipp).await;
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Completed, EndReason::MediaTimeout));
    assert!(sipp.wait(Duration::from_secs(10)), "our BYE reached SIPp");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_refresh_the_session_when_the_answer_makes_us_the_refresher() {
    let mut sipp = Sipp::uas(scenario("uas_session_refresh.xml").to_str().unwrap(), &["-rtp_echo"]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    loop {
        if let CallEvent::Answered { .. } = next_event(&mut call).await {
            break;
        }
    }
    // Session-Expires is 4 s: the refresh goes out at 2 s.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    call.hangup().await;
    assert_eq!(call.ended().await.unwrap().reason, EndReason::LocalHangup);
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp received our UPDATE before the BYE");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrefreshed_session_is_ended_as_session_expired() {
    let mut sipp = Sipp::uas(scenario("uas_session_expire.xml").to_str().unwrap(), &["-rtp_echo"]);
    let (mut call, cancel) = call_against(&sipp, 30).await;
    let answered_at = loop {
        if let CallEvent::Answered { at } = next_event(&mut call).await {
            break at;
        }
    };
    call.media.control.play(tone_1khz(10_000)).await;
    let outcome = tokio::time::timeout(Duration::from_secs(15), call.ended()).await.unwrap().unwrap();
    let lasted = answered_at.elapsed();
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Completed, EndReason::SessionExpired));
    // 4 s less min(32 s, 4/3 s): about 2.7 s.
    assert!(lasted >= Duration::from_millis(2500) && lasted < Duration::from_millis(4000), "{lasted:?}");
    assert!(sipp.wait(Duration::from_secs(10)));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_trunk_carries_the_call() {
    let mut sipp = Sipp::uas("uas", &["-t", "t1", "-rtp_echo"]);
    let cancel = CancellationToken::new();
    let mut config = config_for(&sipp);
    config.trunks[0].transport = voxgate_sip::Transport::Tcp;
    let (agent, _inbound) = SipAgent::start(config, cancel.clone()).await.unwrap();
    let mut call = agent.dial(dial()).await.unwrap();
    loop {
        match next_event(&mut call).await {
            CallEvent::Answered { .. } => break,
            CallEvent::Ended(o) => panic!("call over TCP ended before answer: {o:?}"),
            _ => {}
        }
    }
    call.hangup().await;
    assert_eq!(call.ended().await.unwrap().status, CallStatus::Completed);
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp (TCP) saw the whole call");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_session_timer_is_granted_refreshes_extend_it_and_silence_ends_it() {
    let cancel = CancellationToken::new();
    let (agent, mut inbound) = SipAgent::start(inbound_config("4155550199"), cancel.clone()).await.unwrap();
    let mut sipp = Sipp::uac(scenario("uac_session_timer.xml").to_str().unwrap(), agent.local_addr(), "4155550199", &[]);
    let mut incoming = tokio::time::timeout(Duration::from_secs(10), inbound.recv()).await.expect("INVITE arrived").unwrap();
    let answered_at = loop {
        if let CallEvent::Answered { at } = next_event(&mut incoming.call).await {
            break at;
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(15), incoming.call.ended()).await.unwrap().unwrap();
    let lasted = answered_at.elapsed();
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Completed, EndReason::SessionExpired));
    // Refreshed at 1.5 s, so it ends about 1.5 + (4 - 4/3) = 4.2 s in, not at 2.7 s.
    assert!(lasted >= Duration::from_millis(3800) && lasted < Duration::from_millis(5500), "{lasted:?}");
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp saw Session-Expires granted, its UPDATE answered and our BYE");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_calls_ring_before_they_are_answered_and_a_wildcard_takes_any_number() {
    let cancel = CancellationToken::new();
    let uas_config = voxgate_sip::SipConfig { inbound_ring_ms: 400, ..inbound_config("*") };
    let (uas, mut inbound) = SipAgent::start(uas_config, cancel.clone()).await.unwrap();
    let mut uac_config = inbound_config("none");
    uac_config.trunks = vec![voxgate_sip::Trunk {
        name: "uas".into(),
        host: "127.0.0.1".into(),
        port: uas.local_addr().port(),
        transport: Default::default(),
        username: None,
        password: None,
        from_user: None,
        outbound_proxy: None,
    }];
    let (uac, _) = SipAgent::start(uac_config, cancel.clone()).await.unwrap();
    let mut call = uac.dial(Dial { trunk: None, number: "+442079460123".into() }).await.unwrap();
    let mut incoming = tokio::time::timeout(Duration::from_secs(5), inbound.recv()).await.expect("INVITE arrived").unwrap();
    assert_eq!(incoming.to, "+442079460123");

    let CallEvent::Ringing { code: 180, at: rang } = next_event(&mut call).await else { panic!("180 first") };
    let CallEvent::Answered { at: answered } = next_event(&mut call).await else { panic!("then 200") };
    let rang_for = answered - rang;
    assert!(rang_for >= Duration::from_millis(350) && rang_for < Duration::from_secs(3), "rang for {rang_for:?}");
    assert!(matches!(next_event(&mut incoming.call).await, CallEvent::Ringing { code: 180, .. }));
    assert!(matches!(next_event(&mut incoming.call).await, CallEvent::Answered { .. }));

    call.hangup().await;
    let outcome = incoming.call.ended().await.unwrap();
    assert_eq!((outcome.status, outcome.reason), (CallStatus::Completed, EndReason::RemoteHangup));
    cancel.cancel();
}
