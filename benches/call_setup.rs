//! Call set-up latency, end to end on this machine: the real server places
//! sequential calls through its trunk to SIPp, and we measure
//! - API request sent -> INVITE received by SIPp (SIPp's message trace
//!   timestamps, same clock as the request's), and
//! - answer -> first greeting packet on the wire (voxgate's own measure at
//!   its RTP socket, `latency.answerToGreetingMs` of each call).
//!
//! SIPp answers at once (180 and 200 back to back), so the greeting's
//! synthesis is not hidden behind ringing: the worst case.
//!
//! `cargo bench --bench call_setup -- [calls]` (default 20).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::far_end::FarEnd;
use common::sipp::{scenario, Sipp};
use common::voice::{create_agent, ended, get_call, trunk_config, wait_call};
use common::TestServer;
use serde_json::json;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Unix seconds of every INVITE SIPp received, from its message trace.
fn invite_times(trace: &str) -> Vec<f64> {
    let mut times = Vec::new();
    let mut last_stamp = None;
    let mut lines = trace.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("----------------------------------------------- ") {
            // "2026-11-23 06:30:00.123456"
            last_stamp = time::PrimitiveDateTime::parse(
                rest.trim(),
                time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond]"),
            )
            .ok()
            .map(|t| t.assume_utc().unix_timestamp_nanos() as f64 / 1e9);
        } else if line.contains("message received") {
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() {
                    lines.next();
                } else {
                    break;
                }
            }
            if lines.peek().is_some_and(|l| l.starts_with("INVITE ")) {
                times.extend(last_stamp);
            }
        }
    }
    times
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20);
    let far = FarEnd::start().await;
    let trace = std::env::temp_dir().join(format!("voxgate-bench-{}.msg", std::process::id()));
    let trace_s = trace.display().to_string();
    let n = calls.to_string();
    let sink = far.port.to_string();
    let mut sipp = Sipp::uas(
        scenario("uas_agent.xml").to_str().unwrap(),
        &["-key", "sink_port", &sink, "-m", &n, "-timeout", "900s", "-trace_msg", "-message_file", &trace_s],
    );
    let server = TestServer::start_configured(&trunk_config(sipp.addr.port(), ""), &[("VOXGATE_RATE_LIMITS__READS__REQUESTS", "1000")]).await;
    let (_, key) = server.account("enterprise", 1_000_000);
    let agent = create_agent(&server, &key, "Hello, this is Bright Dental. How can I help you today?").await;

    let mut sent = Vec::new();
    let mut greeting = Vec::new();
    for i in 0..calls {
        let t0 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let resp = server
            .post("/api/voice-agent/calls/outbound", &key, json!({"agentId": agent, "phoneNumber": "+14155550123"}))
            .await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap_or_default());
        let id = resp.json::<serde_json::Value>().await.unwrap()["data"]["callId"].as_str().unwrap().to_owned();
        sent.push(t0);
        wait_call(&server, &key, &id, Duration::from_secs(20), |c| c["status"] == "in-progress").await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        server.post(&format!("/api/voice-agent/calls/{id}/hangup"), &key, json!({})).await;
        let call = wait_call(&server, &key, &id, Duration::from_secs(20), ended).await;
        match call["latency"]["answerToGreetingMs"].as_f64() {
            Some(ms) => greeting.push(ms),
            None => eprintln!("call {i}: no greeting packet measured: {:#}", get_call(&server, &key, &id).await),
        }
    }
    assert!(sipp.wait(Duration::from_secs(30)), "SIPp completed every call");
    let invites = invite_times(&std::fs::read_to_string(&trace).expect("SIPp message trace"));
    assert_eq!(invites.len(), calls, "one INVITE per call in the trace (retransmissions would add more)");
    let mut to_invite: Vec<f64> = sent.iter().zip(&invites).map(|(s, i)| (i - s) * 1000.0).collect();
    let _ = std::fs::remove_file(&trace);

    println!("calls: {calls}");
    println!(
        "API request -> INVITE on the wire: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        percentile(&mut to_invite, 0.5),
        percentile(&mut to_invite, 0.95),
        percentile(&mut to_invite, 1.0)
    );
    println!(
        "answer -> first greeting packet: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms ({} calls measured)",
        percentile(&mut greeting, 0.5),
        percentile(&mut greeting, 0.95),
        percentile(&mut greeting, 1.0),
        greeting.len()
    );
}
