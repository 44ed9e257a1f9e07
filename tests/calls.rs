//! Outbound calls end to end: the real server places calls through its SIP
//! trunk to SIPp, the test plays the far end's media (espeak-ng speech in,
//! agent audio recorded and run through Whisper), and billing, quota,
//! errors and crash recovery are checked through the API.

mod common;

use std::time::Duration;

use common::far_end::FarEnd;
use common::sipp::uas_with_far_end as sipp_agent;
use common::voice::{balance, create_agent, ended, get_call, has_words, place_call, recall, transcribe, trunk_config, wait_call};
use common::{expect_error, json, TestServer};
use serde_json::json;


async fn outbound(server: &TestServer, key: &str, body: serde_json::Value) -> reqwest::Response {
    server.post("/api/voice-agent/calls/outbound", key, body).await
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_greets_answers_the_caller_and_the_call_is_recorded_and_billed() {
    let far = FarEnd::start().await;
    let mut sipp = sipp_agent("uas_agent.xml", &far);
    let server = TestServer::start_configured(&trunk_config(sipp.addr.port(), ""), &[]).await;
    let (_, key) = server.account("enterprise", 1000);
    let greeting = "Hello, this is Bright Dental. How can I help you today?";
    let agent = create_agent(&server, &key, greeting).await;
    let id = place_call(&server, &key, &agent).await;

    let Some(greeting_end) = far.wait_for_speech_then_silence(0, Duration::from_millis(800), Duration::from_secs(30)).await else {
        panic!("no greeting heard; {} RTP packets received; {:#}", far.packets(), get_call(&server, &key, &id).await);
    };
    let question = voxgate_agents::tts::espeak("What are your opening hours?", "en-us", 1.0).await.expect("espeak-ng");
    far.say(&question);
    while far.speaking() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let question_end = far.received_len();
    let answer_end = far
        .wait_for_speech_then_silence(question_end, Duration::from_millis(1500), Duration::from_secs(60))
        .await
        .expect("the agent answered");
    assert!(answer_end > question_end);

    let (status, body) = json(server.post(&format!("/api/voice-agent/calls/{id}/hangup"), &key, json!({})).await).await;
    assert_eq!(status, 200, "{body}");
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp saw our BYE and the call complete");
    let call = wait_call(&server, &key, &id, Duration::from_secs(10), ended).await;

    let heard_greeting = transcribe(far.received_16k(0)[..greeting_end * 2].to_vec()).await;
    assert!(recall(greeting, &heard_greeting) >= 0.7, "greeting heard as '{heard_greeting}'");
    let heard_answer = transcribe(far.received_16k(question_end)).await;
    assert!(has_words(&heard_answer), "no words in the agent's answer");

    assert_eq!(call["status"], "completed", "{call:#}");
    assert_eq!(call["endReason"], "local-hangup");
    assert!(call["ringingAt"].is_string() && call["answeredAt"].is_string() && call["endedAt"].is_string());
    let transcript = call["transcript"].as_array().expect("transcript");
    let caller: Vec<&str> =
        transcript.iter().filter(|l| l["role"] == "caller").filter_map(|l| l["text"].as_str()).collect();
    assert!(
        caller.iter().any(|t| recall("what are your opening hours", t) >= 0.75),
        "caller line in {transcript:#?}"
    );
    let agent_lines: Vec<&str> =
        transcript.iter().filter(|l| l["role"] == "agent").filter_map(|l| l["text"].as_str()).collect();
    assert!(agent_lines.len() >= 2, "greeting and answer in {transcript:#?}");
    assert!(recall(greeting, agent_lines[0]) >= 0.9);
    // What the caller heard is what the agent said.
    let answer_line = agent_lines[1];
    assert!(recall(answer_line, &heard_answer) >= 0.6, "agent said '{answer_line}', caller heard '{heard_answer}'");

    let latency = &call["latency"];
    assert!(!latency["turns"].as_array().unwrap().is_empty(), "{latency:#}");
    assert!(latency["voiceToVoiceP50Ms"].as_u64().is_some());
    assert!(latency["answerToGreetingMs"].as_u64().is_some());
    let duration = call["durationSeconds"].as_f64().unwrap();
    let minutes = (duration / 60.0).ceil() as u64;
    assert_eq!(call["billedMinutes"], minutes, "{duration} s connected");
    assert_eq!(call["creditsCharged"], minutes * 10);
    assert_eq!(balance(&server, &key).await, 1000 - minutes * 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_bye_after_a_minute_and_a_half_bills_two_started_minutes_and_sends_signed_webhooks() {
    let hook = common::webhook_sink::WebhookSink::start().await;
    let far = FarEnd::start().await;
    let mut sipp = sipp_agent("uas_agent_bye.xml", &far);
    // A billed "minute" of 3 s: SIPp's BYE 4.5 s after answer is in minute 2.
    let extra = "[calls]\nminute_secs = 3\n\n[ssrf]\nallow_networks = [\"127.0.0.1/32\"]\nallow_http_in_allowed_networks = true\n";
    let server = TestServer::start_configured(&trunk_config(sipp.addr.port(), extra), &[]).await;
    let (_, key) = server.account("enterprise", 100);
    let (status, body) = json(server.post("/api/settings", &key, json!({"webhookUrl": hook.url()})).await).await;
    assert_eq!(status, 200, "{body}");
    let secret = body["data"]["webhookSecret"].as_str().expect("secret shown once").to_owned();
    let agent = create_agent(&server, &key, "Hello!").await;
    let id = place_call(&server, &key, &agent).await;

    assert!(sipp.wait(Duration::from_secs(30)), "SIPp hung up and got its 200");
    let call = wait_call(&server, &key, &id, Duration::from_secs(10), ended).await;
    assert_eq!(call["status"], "completed");
    assert_eq!(call["endReason"], "remote-hangup");
    assert_eq!(call["billedMinutes"], 2, "{call:#}");
    assert_eq!(call["creditsCharged"], 20);
    assert_eq!(balance(&server, &key).await, 80);

    let events = hook.wait_for(3, Duration::from_secs(10)).await;
    // Deliveries may overtake each other; each carries its event and the call.
    let mut names: Vec<&str> = events.iter().map(|e| e.body["event"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["call.answered", "call.ended", "call.ringing"]);
    for e in &events {
        assert!(e.signature_valid(&secret), "signature of {}", e.body["event"]);
        assert_eq!(e.body["data"]["id"], id.as_str());
    }
    let ended_event = events.iter().find(|e| e.body["event"] == "call.ended").unwrap();
    assert_eq!(ended_event.body["data"]["billedMinutes"], 2);
    assert_eq!(ended_event.body["data"]["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_for_one_minute_ends_the_call_with_a_closing_line_after_it() {
    let far = FarEnd::start().await;
    let mut sipp = sipp_agent("uas_agent.xml", &far);
    let server = TestServer::start_configured(&trunk_config(sipp.addr.port(), "[calls]\nminute_secs = 4\n"), &[]).await;
    let (_, key) = server.account("enterprise", 15);
    let agent = create_agent(&server, &key, "Hello!").await;
    let id = place_call(&server, &key, &agent).await;

    assert!(sipp.wait(Duration::from_secs(40)), "voxgate hung up with BYE");
    let call = wait_call(&server, &key, &id, Duration::from_secs(10), ended).await;
    assert_eq!(call["status"], "completed", "{call:#}");
    assert_eq!(call["endReason"], "insufficient-credits");
    assert_eq!(call["billedMinutes"], 1);
    assert_eq!(call["creditsCharged"], 10);
    assert_eq!(balance(&server, &key).await, 5);
    let last = call["transcript"].as_array().unwrap().last().cloned().unwrap_or_default();
    assert_eq!(last["role"], "agent", "{call:#}");
    assert!(last["text"].as_str().unwrap_or("").contains("Goodbye"), "closing line: {last}");
    // Hung up before the unpaid minute ran out.
    assert!(call["durationSeconds"].as_f64().unwrap() < 4.0 + 6.5, "{call:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_over_the_hourly_quota_get_429_and_exactly_the_limit_is_placed() {
    // The trunk is a socket that never answers: the calls stay unanswered
    // and cost nothing.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server =
        TestServer::start_configured(&trunk_config(silent.local_addr().unwrap().port(), "[calls]\nhourly_limit = 3\n"), &[]).await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, "Hello!").await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = server
            .http
            .post(server.url("/api/voice-agent/calls/outbound"))
            .bearer_auth(&key)
            .json(&json!({"agentId": agent, "phoneNumber": "+14155550123"}));
        requests.spawn(request.send());
    }
    let mut placed = 0;
    let mut refused = 0;
    while let Some(r) = requests.join_next().await {
        let r = r.unwrap().expect("response");
        match r.status().as_u16() {
            201 => {
                placed += 1;
                assert_eq!(r.headers()["x-ratelimit-limit"], "3");
            }
            429 => {
                refused += 1;
                let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((3500..=3600).contains(&retry), "Retry-After {retry}");
                expect_error(r, 429, "RATE_LIMITED").await;
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    assert_eq!((placed, refused), (3, 5));
    let (_, list) = json(server.get("/api/voice-agent/calls", &key).await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 3);
    assert_eq!(balance(&server, &key).await, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_right_code_and_no_sip_traffic_or_charge() {
    let trunk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = TestServer::start_configured(&trunk_config(trunk.local_addr().unwrap().port(), ""), &[]).await;
    let (account, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, "Hello!").await;
    let (_, other_key) = server.account("enterprise", 1000);
    let other_agent = create_agent(&server, &other_key, "Hi!").await;
    let (poor, poor_key) = server.account("enterprise", 5);
    let _ = poor;
    let poor_agent = create_agent(&server, &poor_key, "Hi!").await;
    let agents_only = server.key_with_scopes(&account, "agents");

    for number in ["12345", "+1555", "+1415555abcd", "14155550123", "+1 415 555 0123", "+10005550123", ""] {
        let msg = expect_error(outbound(&server, &key, json!({"agentId": agent, "phoneNumber": number})).await, 400, "BAD_REQUEST").await;
        assert!(msg.contains("phoneNumber") && msg.contains(number), "{number}: {msg}");
    }
    let msg = expect_error(outbound(&server, &key, json!({"agentId": "nope", "phoneNumber": "+14155550123"})).await, 400, "BAD_REQUEST").await;
    assert!(msg.contains("agentId"), "{msg}");
    expect_error(outbound(&server, &key, json!({"agentId": uuid::Uuid::new_v4(), "phoneNumber": "+14155550123"})).await, 404, "NOT_FOUND").await;
    expect_error(outbound(&server, &key, json!({"agentId": other_agent, "phoneNumber": "+14155550123"})).await, 404, "NOT_FOUND").await;
    let msg = expect_error(outbound(&server, &agents_only, json!({"agentId": agent, "phoneNumber": "+14155550123"})).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("calls"), "{msg}");
    let msg = expect_error(outbound(&server, &poor_key, json!({"agentId": poor_agent, "phoneNumber": "+14155550123"})).await, 402, "PAYMENT_REQUIRED").await;
    assert!(msg.contains("10 needed, 5 available"), "{msg}");
    expect_error(outbound(&server, &key, json!({"agentId": agent})).await, 400, "BAD_REQUEST").await;
    expect_error(outbound(&server, &key, json!({"agentId": agent, "phoneNumber": "+14155550123", "trunk": "nope"})).await, 400, "BAD_REQUEST").await;
    expect_error(outbound(&server, &key, json!({"agentId": agent, "phoneNumber": "+14155550123", "metadata": [1]})).await, 400, "BAD_REQUEST").await;

    let mut buf = [0u8; 1500];
    let got = tokio::time::timeout(Duration::from_millis(500), trunk.recv_from(&mut buf)).await;
    assert!(got.is_err(), "no SIP message may reach the trunk");
    assert_eq!(balance(&server, &key).await, 1000);
    assert_eq!(balance(&server, &poor_key).await, 5);
    let (_, list) = json(server.get("/api/voice-agent/calls", &key).await).await;
    assert_eq!(list["data"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_a_killed_server_is_closed_as_node_lost_on_restart_without_more_charges() {
    let far = FarEnd::start().await;
    let sipp = sipp_agent("uas_agent.xml", &far);
    let mut server = TestServer::start_configured(&trunk_config(sipp.addr.port(), ""), &[]).await;
    let (_, key) = server.account("enterprise", 100);
    let agent = create_agent(&server, &key, "Hello!").await;
    let id = place_call(&server, &key, &agent).await;
    let live = wait_call(&server, &key, &id, Duration::from_secs(20), |c| c["billedMinutes"] == 1 && c["status"] == "in-progress").await;
    assert_eq!(live["status"], "in-progress");
    let before = balance(&server, &key).await;
    assert_eq!(before, 90);

    server.kill();
    drop(sipp);
    server.launch();
    let call = get_call(&server, &key, &id).await;
    assert_eq!(call["status"], "failed", "{call:#}");
    assert_eq!(call["endReason"], "node-lost");
    assert_eq!(call["billedMinutes"], 1);
    assert_eq!(call["creditsCharged"], 10);
    assert_eq!(balance(&server, &key).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_places_one_call() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = TestServer::start_configured(&trunk_config(silent.local_addr().unwrap().port(), ""), &[]).await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, "Hello!").await;
    let send = || {
        server
            .http
            .post(server.url("/api/voice-agent/calls/outbound"))
            .bearer_auth(&key)
            .header("Idempotency-Key", "order-42")
            .json(&json!({"agentId": agent, "phoneNumber": "+14155550123"}))
            .send()
    };
    let (first, second) = tokio::join!(send(), send());
    let (a, b) = (json(first.unwrap()).await, json(second.unwrap()).await);
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 201], "{a:?} {b:?}");
    assert_eq!(a.1["data"]["callId"], b.1["data"]["callId"]);
    let (_, list) = json(server.get("/api/voice-agent/calls", &key).await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_finish_then_hangs_them_up_and_settles_them() {
    let far = FarEnd::start().await;
    let mut sipp = sipp_agent("uas_agent.xml", &far);
    let mut server =
        TestServer::start_configured(&trunk_config(sipp.addr.port(), "[calls]\nshutdown_grace_secs = 1\n"), &[]).await;
    let (_, key) = server.account("enterprise", 100);
    let agent = create_agent(&server, &key, "Hello!").await;
    let id = place_call(&server, &key, &agent).await;
    wait_call(&server, &key, &id, Duration::from_secs(20), |c| c["status"] == "in-progress").await;

    assert!(server.terminate(Duration::from_secs(30)), "voxgate exited cleanly");
    assert!(sipp.wait(Duration::from_secs(10)), "the call was ended with a BYE");
    server.launch();
    let call = get_call(&server, &key, &id).await;
    assert_eq!(call["status"], "completed", "{call:#}");
    assert_eq!(call["endReason"], "shutdown");
    assert_eq!(call["billedMinutes"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_concurrent_call_limit_answers_503_and_charges_nothing() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = trunk_config(silent.local_addr().unwrap().port(), "[calls]\nmax_concurrent = 1\n");
    let server = TestServer::start_configured(&config, &[]).await;
    let (_, key) = server.account("enterprise", 100);
    let agent = create_agent(&server, &key, "Hello!").await;
    place_call(&server, &key, &agent).await;
    let msg = expect_error(
        outbound(&server, &key, json!({"agentId": agent, "phoneNumber": "+14155550123"})).await,
        503,
        "SERVICE_UNAVAILABLE",
    )
    .await;
    assert!(msg.contains("limit of 1 concurrent calls"), "{msg}");
    let (_, list) = json(server.get("/api/voice-agent/calls", &key).await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(balance(&server, &key).await, 100);
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("voxgate_calls_active 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_listed_newest_first_with_filters_and_cursor_pages() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = TestServer::start_configured(&trunk_config(silent.local_addr().unwrap().port(), ""), &[]).await;
    let (_, key) = server.account("enterprise", 100);
    let agent = create_agent(&server, &key, "Hello!").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(place_call(&server, &key, &agent).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, first) = json(server.get("/api/voice-agent/calls?limit=2", &key).await).await;
    assert_eq!(status, 200, "{first}");
    let page: Vec<&str> = first["data"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(page, [ids[2].as_str(), ids[1].as_str()]);
    let cursor = first["nextCursor"].as_str().expect("a next page");
    let (_, second) = json(server.get(&format!("/api/voice-agent/calls?limit=2&cursor={cursor}"), &key).await).await;
    assert_eq!(second["data"][0]["id"], ids[0].as_str());
    assert!(second["nextCursor"].is_null());

    let (_, by_agent) = json(server.get(&format!("/api/voice-agent/calls?agentId={agent}"), &key).await).await;
    assert_eq!(by_agent["data"].as_array().unwrap().len(), 3);
    let (_, other) = json(server.get(&format!("/api/voice-agent/calls?agentId={}", uuid::Uuid::new_v4()), &key).await).await;
    assert_eq!(other["data"], json!([]));
    let (_, future) = json(server.get("/api/voice-agent/calls?from=2999-01-01T00:00:00Z", &key).await).await;
    assert_eq!(future["data"], json!([]));
    let (_, past) = json(server.get("/api/voice-agent/calls?to=2000-01-01T00:00:00Z", &key).await).await;
    assert_eq!(past["data"], json!([]));
    let (_, completed) = json(server.get("/api/voice-agent/calls?status=completed", &key).await).await;
    assert_eq!(completed["data"], json!([]));
    for bad in ["status=done", "limit=0", "limit=101", "cursor=xyz", "from=yesterday", "agentId=7", "colour=red"] {
        expect_error(server.get(&format!("/api/voice-agent/calls?{bad}"), &key).await, 400, "BAD_REQUEST").await;
    }
    expect_error(server.get(&format!("/api/voice-agent/calls/{}", uuid::Uuid::new_v4()), &key).await, 404, "NOT_FOUND").await;
    let (_, other_key) = server.account("enterprise", 100);
    expect_error(server.get(&format!("/api/voice-agent/calls/{}", ids[0]), &other_key).await, 404, "NOT_FOUND").await;
}
