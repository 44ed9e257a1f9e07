//! Two real voxgate processes on one database (PostgreSQL in production;
//! the suite runs them on SQLite too): the hourly call quota and credits
//! hold exactly across both, and when one is killed the other closes its
//! calls (`node-lost`, only the minutes already paid), requeues its jobs,
//! and every call and job ends, and is announced, exactly once.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::far_end::FarEnd;
use common::sipp::uas_with_far_end;
use common::upstream::{channel, FakeUpstream, TRUST_LOOPBACK};
use common::voice::{balance, create_agent, trunk_config, wait_call};
use common::webhook_sink::WebhookSink;
use common::{json, wait_job, TestServer};
use serde_json::{json, Value};

/// Dead after 6 s of silence (the default is 15): short for the test,
/// long enough that a node busy loading models is not taken for dead.
const MANY: [(&str, &str); 4] = [
    ("VOXGATE_CLUSTER__DEAD_AFTER_SECS", "6"),
    ("VOXGATE_RATE_LIMITS__GENERATION__REQUESTS", "10000"),
    ("VOXGATE_RATE_LIMITS__READS__REQUESTS", "10000"),
    ("VOXGATE_RATE_LIMITS__WRITES__REQUESTS", "10000"),
];

/// Sends every request at once, alternating between the nodes; returns
/// the count of each status.
async fn burst(nodes: [&TestServer; 2], n: usize, path: &str, key: &str, body: Value) -> HashMap<u16, usize> {
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..n {
        let node = nodes[i % 2];
        requests.spawn(node.http.post(node.url(path)).bearer_auth(key).json(&body).send());
    }
    let mut counts = HashMap::new();
    while let Some(r) = requests.join_next().await {
        let r = r.unwrap().expect("response");
        *counts.entry(r.status().as_u16()).or_default() += 1;
    }
    counts
}

async fn count_calls(node: &TestServer, key: &str) -> usize {
    let (mut n, mut cursor) = (0, None::<String>);
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/voice-agent/calls?limit=100&cursor={c}"),
            None => "/api/voice-agent/calls?limit=100".into(),
        };
        let (status, page) = json(node.get(&path, key).await).await;
        assert_eq!(status, 200, "{page}");
        n += page["data"].as_array().unwrap().len();
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return n,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_quota_and_credits_hold_exactly_across_two_processes() {
    let up = FakeUpstream::start().await;
    up.set(|s| s.hold = true);
    // The trunk never answers: admitted calls ring and cost nothing.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "[calls]\nhourly_limit = 200\nmax_concurrent = 400\necho = true\n\n{TRUST_LOOPBACK}{}",
        channel("oa", "openai", &up.openai_url(), &["flux-2-dev"], 5)
    );
    // Each node has RTP ports of its own for its 100-odd ringing calls.
    let trunk = silent.local_addr().unwrap().port();
    let config = format!(
        "[sip]\nrtp_port_min = 40000\nrtp_port_max = 41998\n\n[[sip.trunks]]\nname = \"silent\"\nhost = \"127.0.0.1\"\nport = {trunk}\n\n{extra}"
    );
    let a = TestServer::start_configured(&config, &MANY).await;
    let b = a.peer("node-2", &[("VOXGATE_SIP__RTP_PORT_MIN", "42000"), ("VOXGATE_SIP__RTP_PORT_MAX", "43998")]);
    let (_, key) = a.account("enterprise", 100_000);
    let agent = create_agent(&a, &key, "Hello!").await;

    let calls = burst([&a, &b], 300, "/api/voice-agent/calls/outbound", &key, json!({"agentId": agent, "phoneNumber": "+14155550123"})).await;
    assert_eq!(calls, HashMap::from([(201, 200), (429, 100)]), "exactly the quota is placed across both nodes");
    assert_eq!(count_calls(&a, &key).await, 200);
    assert_eq!(count_calls(&b, &key).await, 200);
    assert_eq!(balance(&b, &key).await, 100_000, "unanswered calls cost nothing");

    // 3,000 credits buy 300 images of 10, whichever node takes the request.
    let (_, buyer) = a.account("enterprise", 3_000);
    let debits = burst([&a, &b], 500, "/api/generate/image", &buyer, json!({"prompt": "a cat", "model": "flux-2-dev"})).await;
    assert_eq!(debits, HashMap::from([(200, 300), (402, 200)]));
    assert_eq!(balance(&a, &buyer).await, 0);
    assert_eq!(balance(&b, &buyer).await, 0);
    let (_, usage) = json(b.get("/api/usage", &buyer).await).await;
    assert_eq!(usage["data"]["credits"], 0, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_with_a_call_up_and_jobs_leased_is_settled_by_the_survivor_once() {
    let up = FakeUpstream::start().await;
    up.set(|s| s.hold = true);
    let hook = WebhookSink::start().await;
    let far = FarEnd::start().await;
    let sipp = uas_with_far_end("uas_agent.xml", &far);
    // Leases far longer than the time to notice a dead node: the jobs come
    // back because the node was found dead, not because a lease ran out.
    let extra = format!(
        "[calls]\necho = true\n\n[jobs]\nworkers = 2\nlease_secs = 120\n\n{TRUST_LOOPBACK}{}",
        channel("rep", "replicate", &up.replicate_url(), &["wan-2.6"], 0)
    );
    let mut a = TestServer::start_configured(&trunk_config(sipp.addr.port(), &extra), &MANY).await;
    let (_, key) = a.account("enterprise", 10_000);
    json(a.post("/api/settings", &key, json!({"webhookUrl": hook.url()})).await).await;
    let agent = create_agent(&a, &key, "Hello!").await;

    let mut jobs = Vec::new();
    for script in ["one", "two"] {
        let (status, body) = json(a.post("/api/generate/video", &key, json!({"script": script, "model": "wan-2.6"})).await).await;
        assert_eq!(status, 200, "{body}");
        jobs.push(body["data"]["jobId"].as_str().unwrap().to_owned());
    }
    // One call up (the SIPp far end takes one).
    let mut calls = Vec::new();
    for _ in 0..1 {
        let (status, body) = json(a.post("/api/voice-agent/calls/outbound", &key, json!({"agentId": agent, "phoneNumber": "+14155550123"})).await).await;
        assert_eq!(status, 201, "{body}");
        calls.push(body["data"]["callId"].as_str().unwrap().to_owned());
    }
    for id in &calls {
        let call = wait_call(&a, &key, id, Duration::from_secs(20), |c| c["status"] == "in-progress" && c["billedMinutes"] == 1).await;
        assert_eq!(call["status"], "in-progress", "{call:#}");
    }
    for id in &jobs {
        let deadline = Instant::now() + Duration::from_secs(10);
        while wait_job(&a, &key, id, Duration::ZERO).await["status"] != "processing" {
            assert!(Instant::now() < deadline, "job {id} was not leased by node A");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let before = balance(&a, &key).await;
    assert_eq!(before, 10_000 - 2 * 250 - 10);

    // The survivor starts after A holds the jobs' leases, then A dies.
    let b = a.peer("node-2", &[]);
    a.kill();
    let killed = Instant::now();
    for id in &calls {
        let call = wait_call(&b, &key, id, Duration::from_secs(30), |c| c["status"] == "failed").await;
        assert_eq!(call["status"], "failed", "{call:#}");
        assert_eq!(call["endReason"], "node-lost");
        assert_eq!(call["billedMinutes"], 1);
        assert_eq!(call["creditsCharged"], 10);
    }
    // Noticed after the configured 6 s of silence, long before any lease ends.
    assert!(killed.elapsed() < Duration::from_secs(30), "calls closed after {:?}", killed.elapsed());

    up.set(|s| s.hold = false);
    for id in &jobs {
        let job = wait_job(&b, &key, id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "completed", "{job:#}");
    }
    assert!(killed.elapsed() < Duration::from_secs(100), "jobs came back only when their leases ran out");
    // Polled again where A left them upstream, not submitted twice.
    assert_eq!(up.hits("submit wan-2.6"), 2);
    assert_eq!(balance(&b, &key).await, before, "no more minutes, no refunds");

    // Each call ended and each job completed is announced once.
    let want = |d: &common::webhook_sink::Delivery| d.body["event"] == "call.ended" || d.body["event"] == "job.completed";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while Instant::now() < deadline {
        got = hook.wait_for(100, Duration::from_millis(500)).await.into_iter().filter(want).collect();
        if got.len() >= 3 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<_> = hook.wait_for(100, Duration::from_millis(10)).await.into_iter().filter(want).collect();
    assert_eq!(after.len(), 3, "{:#?}", after.iter().map(|d| &d.body).collect::<Vec<_>>());
    assert_eq!(got.len(), 3);
    let mut ids: Vec<String> = after
        .iter()
        .map(|d| d.body["data"]["jobId"].as_str().or(d.body["data"]["id"].as_str()).unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = calls.iter().chain(&jobs).cloned().collect();
    expected.sort();
    assert_eq!(ids, expected);
    drop(sipp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_hung_up_through_a_node_that_does_not_run_it() {
    let far = FarEnd::start().await;
    let mut sipp = uas_with_far_end("uas_agent.xml", &far);
    let a = TestServer::start_configured(&trunk_config(sipp.addr.port(), "[calls]\necho = true\n\n"), &MANY).await;
    let b = a.peer("node-2", &[]);
    let (_, key) = a.account("enterprise", 1_000);
    let agent = create_agent(&a, &key, "Hello!").await;
    let (status, body) = json(a.post("/api/voice-agent/calls/outbound", &key, json!({"agentId": agent, "phoneNumber": "+14155550123"})).await).await;
    assert_eq!(status, 201, "{body}");
    let id = body["data"]["callId"].as_str().unwrap().to_owned();
    wait_call(&a, &key, &id, Duration::from_secs(20), |c| c["status"] == "in-progress").await;

    // Node B does not run the call; it passes the hang-up on.
    let (status, call) = json(b.post(&format!("/api/voice-agent/calls/{id}/hangup"), &key, json!({})).await).await;
    assert_eq!(status, 200, "{call}");
    let call = wait_call(&b, &key, &id, Duration::from_secs(10), |c| c["status"] == "completed").await;
    assert_eq!(call["endReason"], "local-hangup", "{call:#}");
    assert_eq!(call["billedMinutes"], 1);
    // The far end got the BYE and finished its scenario.
    assert!(sipp.wait(Duration::from_secs(10)), "SIPp did not see the call end");
    // Asking again answers with the ended call.
    let (status, again) = json(a.post(&format!("/api/voice-agent/calls/{id}/hangup"), &key, json!({})).await).await;
    assert_eq!((status, &again["data"]["status"]), (200, &json!("completed")));
    assert_eq!(balance(&b, &key).await, 990);
}
