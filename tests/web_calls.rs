//! Test calls from a browser: WebRTC (Opus, DTLS-SRTP, ICE on loopback)
//! against the real server, first with a WebRTC peer in the test playing
//! the browser, then with headless Chromium driving the dashboard with a
//! fake microphone that plays espeak-ng speech.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::voice::{balance, create_agent, ended, recall, transcribe, wait_call};
use common::web_client::WebClient;
use common::{expect_error, json, TestServer};
use serde_json::{json, Value};

const GREETING: &str = "Hello, this is Bright Dental. How can I help you today?";




async fn server() -> TestServer {
    TestServer::start_configured("[calls]\nwebrtc_loopback_only = true\nstream_connect_secs = 30\n", &[]).await
}

async fn web_call(server: &TestServer, key: &str, agent: &str) -> (String, String) {
    let (status, body) = json(server.post(&format!("/api/voice-agent/agents/{agent}/web-call"), key, json!({})).await).await;
    assert_eq!(status, 201, "{body}");
    (body["data"]["callId"].as_str().unwrap().to_owned(), body["data"]["url"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webrtc_call_greets_answers_and_is_billed_and_bad_offers_are_refused() {
    let server = server().await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    let (id, url) = web_call(&server, &key, &agent).await;
    assert!(url.starts_with(&server.url("/webrtc/")), "{url}");

    let client = WebClient::call(&url).await.expect("the offer is answered");
    let greeting_end = client
        .wait_for_speech_then_silence(0, Duration::from_millis(800), Duration::from_secs(40))
        .await
        .expect("the greeting came over WebRTC");
    let heard = transcribe(client.received_16k(0, greeting_end)).await;
    assert!(recall(GREETING, &heard) >= 0.7, "greeting heard as '{heard}'");
    let question = voxgate_agents::tts::espeak("What are your opening hours?", "en-us", 1.0).await.expect("espeak-ng");
    client.say(&question);
    while client.speaking() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = client.received_len();
    client.wait_for_speech_then_silence(asked, Duration::from_millis(1200), Duration::from_secs(60)).await.expect("the agent answered");
    // A second offer for the same call is refused.
    let (status, _) = WebClient::call(&url).await.err().expect("one offer per call");
    assert_eq!(status, 409);

    let (status, _) = json(server.post(&format!("/api/voice-agent/calls/{id}/hangup"), &key, json!({})).await).await;
    assert_eq!(status, 200);
    let call = wait_call(&server, &key, &id, Duration::from_secs(15), ended).await;
    assert_eq!((call["status"].as_str(), call["endReason"].as_str()), (Some("completed"), Some("local-hangup")), "{call:#}");
    assert_eq!((call["carrier"].as_str(), call["direction"].as_str()), (Some("webrtc"), Some("inbound")));
    let transcript = call["transcript"].as_array().unwrap();
    assert!(
        // Whisper tiny on espeak speech varies ("what's your", "what's up? you're"):
        // the content words are what must arrive.
        transcript.iter().any(|l| l["role"] == "caller" && recall("opening hours", l["text"].as_str().unwrap_or("")) >= 0.5),
        "{transcript:#?}"
    );
    assert!(transcript.iter().filter(|l| l["role"] == "agent").count() >= 2, "{transcript:#?}");
    let minutes = (call["durationSeconds"].as_f64().unwrap() / 60.0).ceil() as u64;
    assert_eq!(balance(&server, &key).await, 1000 - minutes * 10);

    // Refusals: not SDP, the wrong content type, a bad token, an unknown agent.
    let (_, url) = web_call(&server, &key, &agent).await;
    let post = |body: &'static str, ct: &'static str| server.http.post(&url).header("content-type", ct).body(body).send();
    expect_error(post("v=0\r\n", "text/plain").await.unwrap(), 400, "BAD_REQUEST").await;
    expect_error(post("hello", "application/sdp").await.unwrap(), 400, "BAD_REQUEST").await;
    let bad = server.http.post(format!("{url}x")).header("content-type", "application/sdp").body("v=0\r\n").send().await.unwrap();
    expect_error(bad, 401, "UNAUTHORIZED").await;
    // An offer that is SDP but not a usable one: refused, and the call ends unbilled.
    let broken = server.http.post(&url).header("content-type", "application/sdp").body("v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\n").send().await.unwrap();
    expect_error(broken, 400, "BAD_REQUEST").await;
    let not_json = server.http.post(server.url(&format!("/api/voice-agent/agents/{agent}/web-call"))).bearer_auth(&key).body("{oops").send().await.unwrap();
    expect_error(not_json, 400, "BAD_REQUEST").await;
    let missing = server.post("/api/voice-agent/agents/00000000-0000-4000-8000-000000000000/web-call", &key, json!({})).await;
    expect_error(missing, 404, "NOT_FOUND").await;
    assert_eq!(balance(&server, &key).await, 1000 - minutes * 10, "refused offers cost nothing");
}

/// `text` spoken by espeak-ng, then `silence_secs` of silence, as a WAV
/// file Chromium's fake microphone plays (in a loop).
fn caller_wav(dir: &std::path::Path, text: &str, silence_secs: u32) -> std::path::PathBuf {
    let speech = dir.join("speech.wav");
    let status = Command::new("espeak-ng").args(["-v", "en-us", "-w"]).arg(&speech).arg(text).status().expect("espeak-ng");
    assert!(status.success());
    let out = dir.join("caller.wav");
    // 16-bit mono 48 kHz; 5 s of silence first, so the greeting is heard out.
    let status = Command::new("sox")
        .arg(&speech)
        .args(["-r", "48000", "-c", "1", "-b", "16"])
        .arg(&out)
        .args(["pad", "5", &silence_secs.to_string()])
        .status()
        .expect("sox");
    assert!(status.success());
    out
}

fn chromium(args: &[&str]) -> Command {
    let mut c = Command::new("chromium");
    c.args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio"]).args(args);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_places_a_test_call_from_headless_chromium_and_shows_it() {
    let server = server().await;
    let (_, key) = server.account("enterprise", 1000);
    let agent = create_agent(&server, &key, GREETING).await;
    let dir = tempfile::tempdir().unwrap();
    let wav = caller_wav(dir.path(), "What are your opening hours?", 8);
    let profile = dir.path().join("profile");

    // The dashboard signs in from the fragment and places a 25 s test call.
    let page = format!("{}#key={key}&call={agent}&seconds=25", server.url("/"));
    let mut browser = chromium(&[
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        &format!("--use-file-for-fake-audio-capture={}", wav.display()),
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        &format!("--user-data-dir={}", profile.display()),
        "--remote-debugging-port=0",
        &page,
    ])
    .spawn()
    .expect("chromium (installed by scripts/setup)");

    // The call appears, is answered, and ends when the page hangs up.
    let deadline = Instant::now() + Duration::from_secs(90);
    let call: Value = loop {
        let (_, body) = json(server.get("/api/voice-agent/calls?limit=5", &key).await).await;
        if let Some(c) = body["data"].as_array().and_then(|a| a.iter().find(|c| c["carrier"] == "webrtc")) {
            if ended(c) {
                break c.clone();
            }
        }
        assert!(Instant::now() < deadline, "no ended web call; calls: {body:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = browser.kill();
    let _ = browser.wait();
    assert_eq!(call["status"], "completed", "{call:#}");
    let transcript = call["transcript"].as_array().unwrap();
    assert!(
        transcript.iter().any(|l| l["role"] == "caller" && recall("opening hours", l["text"].as_str().unwrap_or("")) >= 0.5),
        "the caller's words reached the agent: {transcript:#?}"
    );
    assert!(transcript.iter().filter(|l| l["role"] == "agent").count() >= 2, "greeting and a reply: {transcript:#?}");

    // A screenshot of the dashboard with the call listed.
    let shot = dir.path().join("dashboard.png");
    let status = chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1280,720",
        "--virtual-time-budget=5000",
        &format!("--user-data-dir={}", dir.path().join("profile2").display()),
        &format!("{}#key={key}&show={}", server.url("/"), call["id"].as_str().unwrap()),
    ])
    .status()
    .expect("chromium screenshot");
    assert!(status.success());
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    if let Ok(out) = std::env::var("VG_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, out).expect("copy screenshot");
    }
}
