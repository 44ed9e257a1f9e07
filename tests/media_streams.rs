//! Calls over CPaaS WebSocket media streams, end to end: the real server,
//! a client that plays the provider's side of the protocol (Twilio,
//! Telnyx, Vonage) with espeak-ng speech, Whisper on what comes back, and
//! outbound calls through a local stand-in for Twilio's REST API.

mod common;

use std::time::Duration;

use common::fake_twilio::{FakeTwilio, INVALID_TO};
use common::stream_phone::{Kind, StreamPhone};
use common::voice::{balance, create_agent, ended, get_data, recall, transcribe, wait_call};
use common::{expect_error, json, TestServer};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const GREETING: &str = "Hello, this is Bright Dental. How can I help you today?";




/// Prepares a stream call; returns (call id, stream URL).
async fn stream_call(server: &TestServer, key: &str, agent: &str, provider: &str) -> (String, String) {
    let body = json!({"agentId": agent, "provider": provider, "to": "+14155550100", "from": "+14155550123"});
    let (status, body) = json(server.post("/api/voice-agent/calls/stream", key, body).await).await;
    assert_eq!(status, 201, "{body}");
    let data = &body["data"];
    assert!(data["expiresAt"].is_string());
    (data["callId"].as_str().unwrap().to_owned(), data["url"].as_str().unwrap().to_owned())
}

/// Waits for the whole greeting, and checks Whisper hears its words.
async fn hears_the_greeting(phone: &StreamPhone) -> usize {
    let end = phone
        .wait_for_speech_then_silence(0, Duration::from_millis(800), Duration::from_secs(40))
        .await
        .expect("the greeting came back as media messages");
    let heard = transcribe(phone.received_16k(0, end)).await;
    assert!(recall(GREETING, &heard) >= 0.7, "greeting heard as '{heard}'");
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_stream_call_greets_answers_clears_on_barge_in_and_is_billed() {
    let server = TestServer::start().await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    let (id, url) = stream_call(&server, &key, &agent, "twilio").await;
    assert!(url.starts_with("ws://127.0.0.1:") && url.contains("/media/twilio/"), "{url}");

    let phone = StreamPhone::connect(&url, Kind::Twilio).await.expect("the signed URL opens the stream");
    let greeting_end = hears_the_greeting(&phone).await;
    assert!(!phone.marks().is_empty(), "a mark follows the greeting");

    // A question; the agent answers; the caller talks over the answer.
    let question = voxgate_agents::tts::espeak("What are your opening hours?", "en-us", 1.0).await.expect("espeak-ng");
    phone.say(&question);
    while phone.speaking() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = phone.received_len().max(greeting_end);
    assert!(phone.wait_for_speech(asked, Duration::from_secs(60)).await, "the agent answered");
    let clears_before = phone.clears();
    let interruption =
        voxgate_agents::tts::espeak("Sorry, actually I would like to book an appointment for tomorrow morning.", "en-us", 1.0)
            .await
            .expect("espeak-ng");
    phone.say(&interruption);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while phone.clears() == clears_before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if phone.clears() == clears_before {
        let call = common::voice::get_call(&server, &key, &id).await;
        panic!("barge-in sent no clear; call so far: {:#}", call["transcript"]);
    }
    while phone.speaking() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The agent does not fall silent after a barge-in.
    assert!(phone.wait_for_speech(phone.received_len(), Duration::from_secs(60)).await, "the agent replied after the barge-in");

    phone.hang_up().await;
    let call = wait_call(&server, &key, &id, Duration::from_secs(15), ended).await;
    assert_eq!((call["status"].as_str(), call["endReason"].as_str()), (Some("completed"), Some("remote-hangup")), "{call:#}");
    assert_eq!((call["direction"].as_str(), call["carrier"].as_str()), (Some("inbound"), Some("twilio")));
    assert_eq!(call["to"], "+14155550100");
    let transcript = call["transcript"].as_array().unwrap();
    let caller: Vec<&str> = transcript.iter().filter(|l| l["role"] == "caller").filter_map(|l| l["text"].as_str()).collect();
    assert!(caller.iter().any(|t| recall("opening hours", t) >= 0.5), "{transcript:#?}");
    assert!(transcript.iter().any(|l| l["role"] == "agent" && l["interrupted"] == true), "the interrupted reply is marked: {transcript:#?}");
    assert!(call["latency"]["answerToGreetingMs"].as_u64().is_some(), "{call:#}");
    assert!(!call["latency"]["turns"].as_array().unwrap().is_empty());
    let minutes = (call["durationSeconds"].as_f64().unwrap() / 60.0).ceil() as u64;
    assert_eq!(call["billedMinutes"], minutes);
    assert_eq!(balance(&server, &key).await, 1000 - minutes * 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telnyx_and_vonage_binary_streams_carry_the_greeting_and_end_with_the_stream() {
    let server = TestServer::start().await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    for (provider, kind) in [("telnyx", Kind::Telnyx), ("vonage", Kind::Vonage)] {
        let (id, url) = stream_call(&server, &key, &agent, provider).await;
        let phone = StreamPhone::connect(&url, kind).await.expect("stream opens");
        hears_the_greeting(&phone).await;
        assert!(!phone.marks().is_empty(), "{provider}: a mark/notify follows the greeting");
        phone.hang_up().await;
        let call = wait_call(&server, &key, &id, Duration::from_secs(15), ended).await;
        assert_eq!(call["status"], "completed", "{provider}: {call:#}");
        assert_eq!(call["carrier"], provider);
        assert_eq!(call["billedMinutes"], 1);
    }
}

type Source = futures_util::stream::SplitStream<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>;

/// The close frame the server sends (within 10 s), skipping other messages.
async fn close_frame(source: &mut Source) -> Option<tokio_tungstenite::tungstenite::protocol::CloseFrame> {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = source.next().await {
            if let Message::Close(c) = m {
                return c;
            }
        }
        None
    })
    .await
    .expect("closed in time")
}

/// The server for protocol tests: echo calls (no models), a short connect window.
async fn echo_server(extra_toml: &str) -> TestServer {
    TestServer::start_configured(&format!("[calls]\necho = true\nstream_connect_secs = 20\n{extra_toml}"), &[]).await
}

#[tokio::test]
async fn malformed_streams_close_with_a_reason_and_cost_nothing_and_bad_urls_are_refused() {
    let server = echo_server("").await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    let raw = |s: &str| Message::text(s.to_owned());
    let start = r#"{"event":"start","streamSid":"MZ1","start":{"callSid":"CA1","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#;
    let media_before_start = r#"{"event":"media","media":{"payload":"//8="}}"#;
    let cases: Vec<(&str, Vec<Message>, u16, &str)> = vec![
        ("malformed JSON", vec![raw("{\"event\": \"media\", oops")], 1007, "not JSON"),
        ("wrong order", vec![raw(media_before_start)], 1008, "before start"),
        ("bad base64", vec![raw(start), raw(r#"{"event":"media","media":{"payload":"***"}}"#)], 1007, "base64"),
        ("oversize frame", vec![raw(start), raw(&format!(r#"{{"event":"media","media":{{"payload":"{}"}}}}"#, "A".repeat(100_000)))], 1009, "bytes"),
        ("binary on twilio", vec![raw(start), Message::binary(vec![0u8; 320])], 1003, "binary"),
    ];
    for (what, messages, code, reason) in cases {
        let (id, url) = stream_call(&server, &key, &agent, "twilio").await;
        // A bare connection: the opening is part of what is tested.
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
        use futures_util::{SinkExt, StreamExt};
        let (mut sink, mut source) = ws.split();
        for m in messages {
            let _ = sink.send(m).await;
        }
        let close = close_frame(&mut source).await.unwrap_or_else(|| panic!("{what}: a close frame"));
        assert_eq!(u16::from(close.code), code, "{what}: {close:?}");
        assert!(close.reason.contains(reason), "{what}: {close:?}");
        let call = wait_call(&server, &key, &id, Duration::from_secs(10), ended).await;
        assert_eq!(call["endReason"], "stream-error", "{what}: {call:#}");
        assert_eq!(call["billedMinutes"], if what == "wrong order" || what == "malformed JSON" { 0 } else { 1 }, "{what}");
    }

    // The handshake itself is refused for a bad token, another provider's
    // path, a reused URL, and a plain GET.
    let (_, url) = stream_call(&server, &key, &agent, "twilio").await;
    let mut tampered = url.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(StreamPhone::connect(&tampered, Kind::Twilio).await.err(), Some(401));
    assert_eq!(StreamPhone::connect(&url.replace("/media/twilio/", "/media/plivo/"), Kind::Plivo).await.err(), Some(401));
    assert_eq!(StreamPhone::connect(&url.replace("/media/twilio/", "/media/skype/"), Kind::Twilio).await.err(), Some(404));
    let token = url.rsplit('/').next().unwrap();
    let query_form = url.replace(&format!("/media/twilio/{token}"), &format!("/media/twilio?token={token}"));
    let phone = StreamPhone::connect(&query_form, Kind::Twilio).await.expect("?token= works too");
    assert_eq!(StreamPhone::connect(&url, Kind::Twilio).await.err(), Some(409), "a stream connects once");
    drop(phone);
    let http_url = url.replace("ws://", "http://");
    expect_error(server.http.get(&http_url).send().await.unwrap(), 400, "BAD_REQUEST").await;
    let (status, _) = json(server.get("/health", &key).await).await;
    assert_eq!(status, 200, "the server is still serving");

    // Bad requests for a stream call.
    for (body, field) in [
        (json!({"agentId": agent, "provider": "skype"}), "provider"),
        (json!({"agentId": agent, "provider": "twilio", "to": "12"}), "to"),
        (json!({"agentId": "nope", "provider": "twilio"}), "agentId"),
        (json!({"agentId": agent, "provider": "twilio", "metadata": [1]}), "metadata"),
    ] {
        let msg = expect_error(server.post("/api/voice-agent/calls/stream", &key, body).await, 400, "BAD_REQUEST").await;
        assert!(msg.contains(field), "{msg}");
    }
    // Four streams started (three broke after their start, one was dropped):
    // each billed its first minute, the others nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while balance(&server, &key).await != 960 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(balance(&server, &key).await, 960);
}

#[tokio::test]
async fn a_call_admitted_after_its_request_timed_out_is_hung_up_not_left_queued() {
    let server = TestServer::start_configured("request_timeout_secs = 1\n\n[calls]\necho = true\nstream_connect_secs = 20\n", &[]).await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    // Another writer holds the accounts' rows: the admission waits for
    // them past the request's timeout, and gets them after the client was
    // told the request failed.
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let mut holder = sqlx::AnyConnection::connect(&server.db.url).await.expect("database");
    holder.execute("BEGIN").await.unwrap();
    holder.execute("UPDATE accounts SET calls_lock = calls_lock").await.unwrap();
    let body = json!({"agentId": agent, "provider": "twilio", "to": "+14155550100", "from": "+14155550123"});
    let message = expect_error(server.post("/api/voice-agent/calls/stream", &key, body).await, 503, "SERVICE_UNAVAILABLE").await;
    assert!(message.contains("timed out"), "{message}");
    holder.execute("COMMIT").await.unwrap();
    // The admission went on and made the call: with nobody to give its
    // stream URL to, it is hung up at once rather than left queued.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let id = loop {
        let calls = get_data(&server, &key, "/api/voice-agent/calls").await;
        if let Some(id) = calls[0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the admission never finished: {calls}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let call = wait_call(&server, &key, &id, Duration::from_secs(10), ended).await;
    assert_eq!(call["endReason"], "canceled", "{call:#}");
    assert_eq!(call["billedMinutes"], 0, "{call:#}");
    assert_eq!(balance(&server, &key).await, 1000);
}

#[tokio::test]
async fn a_stream_never_connected_ends_unbilled_and_an_idle_one_times_out() {
    let server = TestServer::start_configured("[calls]\necho = true\nstream_connect_secs = 2\n[sip]\nmedia_timeout_secs = 2\n", &[]).await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    let (id, url) = stream_call(&server, &key, &agent, "plivo").await;
    let call = wait_call(&server, &key, &id, Duration::from_secs(10), ended).await;
    assert_eq!((call["status"].as_str(), call["endReason"].as_str()), (Some("failed"), Some("not-connected")), "{call:#}");
    assert_eq!(call["billedMinutes"], 0);
    assert!(StreamPhone::connect(&url, Kind::Plivo).await.is_err(), "the URL died with the call");
    assert_eq!(balance(&server, &key).await, 1000);

    // Started, then silent: the media timeout ends it.
    let (id, url) = stream_call(&server, &key, &agent, "twilio").await;
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, mut source) = ws.split();
    let start = r#"{"event":"start","streamSid":"MZ1","start":{"callSid":"CA1","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#;
    sink.send(Message::text(start)).await.unwrap();
    let close = close_frame(&mut source).await.expect("a close frame");
    assert!(close.reason.contains("no media"), "{close:?}");
    let call = wait_call(&server, &key, &id, Duration::from_secs(10), ended).await;
    assert_eq!((call["status"].as_str(), call["endReason"].as_str()), (Some("completed"), Some("media-timeout")), "{call:#}");
}

#[tokio::test]
async fn a_twilio_trunk_places_the_call_by_rest_follows_signed_callbacks_and_hangs_up_by_rest() {
    let twilio = FakeTwilio::start().await;
    let server = echo_server(&twilio.carrier_toml()).await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    let (status, body) = json(
        server.post("/api/voice-agent/calls/outbound", &key, json!({"agentId": agent, "phoneNumber": "+14155550123", "trunk": "twilio"})).await,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["data"]["callId"].as_str().unwrap().to_owned();

    let phone = twilio.phone(Duration::from_secs(10)).await.expect("Twilio opened the stream from the TwiML");
    let call = wait_call(&server, &key, &id, Duration::from_secs(5), |c| c["status"] == "in-progress").await;
    assert!(call["ringingAt"].is_string() && call["answeredAt"].is_string(), "{call:#}");
    assert_eq!(call["carrier"], "twilio");
    // Echo calls send the callee's audio back: speech goes both ways.
    let hello = voxgate_agents::tts::espeak("What are your opening hours on Monday?", "en-us", 1.0).await.expect("espeak-ng");
    phone.say(&hello);
    let end = phone.wait_for_speech_then_silence(0, Duration::from_millis(600), Duration::from_secs(15)).await.expect("echo came back");
    let heard = transcribe(phone.received_16k(0, end)).await;
    // Whisper tiny on twice-coded espeak speech varies; most words must come back.
    assert!(recall("what are your opening hours on monday", &heard) >= 0.5, "heard '{heard}'");

    // What voxgate asked of Twilio.
    let requests = twilio.requests();
    let (_, create) = &requests[0];
    assert_eq!(create["To"], "+14155550123");
    assert_eq!(create["From"], "+14155550100");
    assert!(create["Twiml"].contains("<Connect><Stream url=\"ws://127.0.0.1:"), "{}", create["Twiml"]);
    assert!(create["StatusCallback"].ends_with(&format!("/carriers/twilio/{id}/status")));
    // A forged callback is refused; the real ones were taken.
    let forged = server
        .http
        .post(server.url(&format!("/carriers/twilio/{id}/status")))
        .header("X-Twilio-Signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .form(&[("CallSid", "CA1"), ("CallStatus", "completed")])
        .send()
        .await
        .unwrap();
    expect_error(forged, 403, "FORBIDDEN").await;
    let callback = |path: String| server.http.post(server.url(&path));
    let unsigned = callback(format!("/carriers/twilio/{id}/status")).form(&[("CallStatus", "completed")]).send().await.unwrap();
    expect_error(unsigned, 403, "FORBIDDEN").await;
    let unknown_status = callback(format!("/carriers/twilio/{id}/status"))
        .header("X-Twilio-Signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .form(&[("CallStatus", "exploded")])
        .send()
        .await
        .unwrap();
    expect_error(unknown_status, 400, "BAD_REQUEST").await;
    let other_call = callback("/carriers/twilio/00000000-0000-4000-8000-000000000000/status".into())
        .header("X-Twilio-Signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .form(&[("CallStatus", "completed")])
        .send()
        .await
        .unwrap();
    expect_error(other_call, 404, "NOT_FOUND").await;
    assert!(twilio.callback_answers().iter().all(|c| *c == 204), "{:?}", twilio.callback_answers());

    let (status, _) = json(server.post(&format!("/api/voice-agent/calls/{id}/hangup"), &key, json!({})).await).await;
    assert_eq!(status, 200);
    let call = wait_call(&server, &key, &id, Duration::from_secs(15), ended).await;
    assert_eq!((call["status"].as_str(), call["endReason"].as_str()), (Some("completed"), Some("local-hangup")), "{call:#}");
    let update = twilio.requests().into_iter().find(|(p, _)| p.starts_with("update")).expect("hang-up went through the REST API");
    assert_eq!(update.1["Status"], "completed");
    assert_eq!(call["billedMinutes"], 1);
    assert_eq!(balance(&server, &key).await, 990);

    // Twilio refusing the call: failed with its reason, nothing charged.
    let (status, body) = json(
        server.post("/api/voice-agent/calls/outbound", &key, json!({"agentId": agent, "phoneNumber": INVALID_TO, "trunk": "twilio"})).await,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let refused: Value =
        wait_call(&server, &key, body["data"]["callId"].as_str().unwrap(), Duration::from_secs(10), ended).await;
    assert_eq!((refused["status"].as_str(), refused["endReason"].as_str()), (Some("failed"), Some("rejected")), "{refused:#}");
    assert!(refused["sipReason"].as_str().unwrap_or_default().contains("21211"), "{refused:#}");
    assert_eq!(balance(&server, &key).await, 990);
}
