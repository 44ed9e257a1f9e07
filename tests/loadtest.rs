//! `voxgate-loadtest` against a real server: the server's trunk points at
//! the load tester's SIP address, the tool places calls through the API,
//! answers them, speaks and listens, and writes its report.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sipp::{free_udp_port, free_udp_range};
use common::voice::{balance, trunk_config};
use common::{wait_for_exit, TestServer};
use serde_json::Value;

/// Built beside `voxgate` by `cargo build --workspace` (and by the test runs
/// of `scripts/test`).
fn loadtest_bin() -> PathBuf {
    let bin = Path::new(common::BIN).with_file_name("voxgate-loadtest");
    assert!(bin.exists(), "{} is missing: build the workspace (cargo build --workspace)", bin.display());
    bin
}

/// A server whose trunk points at a free port for the load tester's SIP,
/// with `extra` TOML; an account with 1,000 credits and its key.
async fn server_with_trunk_to_loadtest(extra: &str) -> (TestServer, String, u16) {
    let sip_port = free_udp_port();
    let server = TestServer::start_configured(&trunk_config(sip_port, extra), &[]).await;
    let (_account, key) = server.account("enterprise", 1000);
    (server, key, sip_port)
}

#[tokio::test(flavor = "multi_thread")]
async fn five_concurrent_calls_are_answered_and_each_measured() {
    let (server, key, sip_port) = server_with_trunk_to_loadtest("").await;
    let (report, out) = run_loadtest(
        &server,
        &key,
        sip_port,
        // Five turns at once queue for the same two cores (7-9 s each on
        // an idle machine, more on a busy one): the wait for an answer is
        // generous, since what is checked here is that each is measured.
        &["--calls", "5", "--concurrency", "5", "--cps", "20", "--duration", "90s", "--ring", "200ms", "--reply-timeout", "60s", "--utterance", "What are your opening hours?"],
    );
    let summary = &report["summary"];
    assert_eq!(summary["placed"], 5, "{summary}");
    assert_eq!(summary["answered"], 5, "{summary}");
    assert_eq!(summary["answer_seizure_ratio"], 100.0);
    let calls = report["calls"].as_array().expect("calls");
    for call in calls {
        let heard = &call["heard"];
        let latencies = heard["greeting_ms"].as_f64().into_iter().chain(heard["turns"].as_array().expect("turns").iter().filter_map(|t| t["latency_ms"].as_f64()));
        assert!(latencies.count() >= 1, "a call without a latency sample: {call}");
        assert!(call["post_dial_delay_ms"].as_f64().is_some_and(|d| d > 0.0), "{call}");
        assert!(heard["rtp"]["packets_received"].as_u64().is_some_and(|p| p > 50), "{call}");
    }
    assert!(summary["metrics"]["voice_to_voice_ms"]["n"].as_u64().is_some_and(|n| n >= 1), "no turn was answered: {summary}");
    assert!(summary["server"]["rss_mb_peak"].as_f64().is_some_and(|m| m > 10.0), "the server was sampled: {summary}");
    for file in ["summary.md", "latency_histogram.svg", "latency_cdf.svg", "latency_over_time.svg"] {
        assert!(out.path().join(file).exists(), "{file}");
    }
    // Every call is shorter than a minute: one minute (10 credits) each.
    assert_eq!(balance(&server, &key).await, 1000 - 5 * 10);
}

/// Runs the tool against `server` with `args`; the parsed report.json.
fn run_loadtest(server: &TestServer, key: &str, sip_port: u16, args: &[&str]) -> (Value, tempfile::TempDir) {
    let out = tempfile::tempdir().expect("tempdir");
    let rtp = free_udp_range(40);
    let child = Command::new(loadtest_bin())
        .args(["--server", &server.url(""), "--no-progress"])
        .args(["--sip-bind", &format!("127.0.0.1:{sip_port}"), "--rtp-ports", &format!("{rtp}-{}", rtp + 40)])
        .args(["--server-pid", &server.pid().expect("running").to_string()])
        .args(args)
        .arg("--out")
        .arg(out.path())
        .env("LOADTEST_API_KEY", key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start voxgate-loadtest");
    assert!(wait_for_exit(child, Duration::from_secs(150)), "voxgate-loadtest failed or did not stop by itself");
    let report = serde_json::from_slice(&std::fs::read(out.path().join("report.json")).expect("report.json")).expect("JSON");
    (report, out)
}

#[tokio::test(flavor = "multi_thread")]
async fn media_mode_measures_the_echo_of_every_call_without_loss() {
    let (server, key, sip_port) = server_with_trunk_to_loadtest("[calls]\necho = true\n").await;
    let (report, _out) = run_loadtest(&server, &key, sip_port, &["--mode", "media", "--calls", "4", "--concurrency", "4", "--cps", "20", "--hold", "4s", "--ring", "0s"]);
    let summary = &report["summary"];
    assert_eq!(summary["answered"], 4, "{summary}");
    let echo = &summary["metrics"]["echo_round_trip_ms"];
    assert!(echo["n"].as_u64().is_some_and(|n| n >= 4 * 2), "a round trip per second of each call: {summary}");
    assert!(echo["p50"].as_f64().is_some_and(|ms| ms > 0.0 && ms < 1000.0), "{echo}");
    assert_eq!(summary["turns_without_reply"], 0, "every burst came back: {summary}");
    assert_eq!(summary["rtp"]["lost"], 0, "{summary}");
    assert!(summary["rtp"]["packets_received"].as_u64().is_some_and(|p| p >= 4 * 140), "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_twilio_websocket_transport_plays_the_provider_and_measures_agent_calls() {
    let (server, key, sip_port) = server_with_trunk_to_loadtest("").await;
    let (report, _out) = run_loadtest(
        &server,
        &key,
        sip_port,
        &[
            "--transport", "twilio", "--calls", "3", "--concurrency", "3", "--cps", "20", "--duration", "90s", "--reply-timeout", "40s",
            "--utterance", "What are your opening hours?", "--utterance", "Thank you.",
        ],
    );
    let summary = &report["summary"];
    assert_eq!((summary["placed"].as_u64(), summary["answered"].as_u64()), (Some(3), Some(3)), "{summary}");
    assert_eq!(report["options"]["transport"], "twilio");
    for call in report["calls"].as_array().expect("calls") {
        let heard = &call["heard"];
        assert!(heard["greeting_ms"].as_f64().is_some_and(|ms| ms > 0.0), "greeting timed at the socket: {call}");
        assert!(heard["rtp"]["packets_received"].as_u64().is_some_and(|p| p > 50), "{call}");
        let id = call["call_id"].as_str().expect("call id");
        let record = common::voice::wait_call(&server, &key, id, Duration::from_secs(15), common::voice::ended).await;
        assert_eq!((record["carrier"].as_str(), record["status"].as_str()), (Some("twilio"), Some("completed")), "{record}");
    }
    assert!(summary["metrics"]["voice_to_voice_ms"]["n"].as_u64().is_some_and(|n| n >= 1), "no turn was answered: {summary}");
    // The first answers were heard to their end (the second ones are cut by the hang-up).
    let gap = &summary["metrics"]["reply_longest_gap_ms"];
    assert!(gap["n"].as_u64().is_some_and(|n| n >= 1) && gap["max"].as_f64().is_some_and(|ms| ms > 0.0 && ms < 800.0), "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn media_mode_over_vonage_binary_streams_gets_every_echo_back() {
    let (server, key, sip_port) = server_with_trunk_to_loadtest("[calls]\necho = true\n").await;
    let (report, _out) =
        run_loadtest(&server, &key, sip_port, &["--transport", "vonage", "--mode", "media", "--calls", "3", "--concurrency", "3", "--cps", "20", "--hold", "4s"]);
    let summary = &report["summary"];
    assert_eq!(summary["answered"], 3, "{summary}");
    let echo = &summary["metrics"]["echo_round_trip_ms"];
    assert!(echo["n"].as_u64().is_some_and(|n| n >= 3 * 2), "{summary}");
    assert!(echo["p50"].as_f64().is_some_and(|ms| ms > 0.0 && ms < 1000.0), "{echo}");
    assert_eq!(summary["turns_without_reply"], 0, "every burst came back: {summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_run_stops_at_its_duration_and_hangs_up_every_call() {
    let (server, key, sip_port) = server_with_trunk_to_loadtest("[calls]\necho = true\n").await;
    let started = std::time::Instant::now();
    let (report, _out) = run_loadtest(&server, &key, sip_port, &["--mode", "media", "--calls", "3", "--concurrency", "3", "--hold", "10m", "--duration", "4s", "--ring", "0s"]);
    assert!(started.elapsed() < Duration::from_secs(30), "stopped after {:?}", started.elapsed());
    for call in report["calls"].as_array().expect("calls") {
        assert_eq!(call["heard"]["ended_by"], "caller", "{call}");
        let id = call["call_id"].as_str().expect("call id");
        let record = common::voice::wait_call(&server, &key, id, Duration::from_secs(10), common::voice::ended).await;
        assert_eq!((record["status"].as_str(), record["endReason"].as_str()), (Some("completed"), Some("remote-hangup")), "{record}");
    }
}

#[test]
fn help_documents_every_option_and_remote_targets_are_refused() {
    let help = Command::new(loadtest_bin()).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&help.stdout);
    for option in ["--server", "--api-key", "--mode", "--transport", "--calls", "--cps", "--concurrency", "--duration", "--barge-in-after", "--server-pid", "--allow-remote"] {
        assert!(help.contains(option), "--help does not mention {option}");
    }
    let out = Command::new(loadtest_bin()).args(["--server", "http://203.0.113.7:8080", "--api-key", "k"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}
