//! The generation and job API against a fake provider that speaks the
//! channels' real protocols: every route queues a paid job that ends with
//! stored, signed outputs; bounds, enums, SSRF, plan, credits and missing
//! channels are refused before anything is charged; failures refund once
//! and are reported by signed webhooks retried on the schedule; jobs
//! survive a crash of the server.

mod common;

use std::time::{Duration, Instant};

use common::upstream::{channel, FakeUpstream, MP4, PNG, TRUST_LOOPBACK};
use common::voice::balance;
use common::webhook_sink::WebhookSink;
use common::{expect_error, json, wait_job, TestServer};
use serde_json::{json, Value};

/// The generation quota is lifted so tests can queue many jobs and poll them.
const MANY: [(&str, &str); 2] = [("VOXGATE_RATE_LIMITS__GENERATION__REQUESTS", "1000"), ("VOXGATE_RATE_LIMITS__READS__REQUESTS", "10000")];

async fn server_with(upstream: &FakeUpstream, extra: &str) -> TestServer {
    let all_replicate = [
        "flux-2-dev", "flux-2-pro", "wan-2.6", "veo-3.1", "elevenlabs-v3", "kokoro", "voice-clone", "veed-fabric", "clip", "commercial",
        "translate", "instant-ad", "photoshoot",
    ];
    let config = format!(
        "{extra}{TRUST_LOOPBACK}{}{}",
        channel("oa", "openai", &upstream.openai_url(), &["flux-2-dev", "kling-2.6-pro", "gpt-up"], 5),
        channel("rep", "replicate", &upstream.replicate_url(), &all_replicate, 0),
    );
    TestServer::start_configured(&config, &MANY).await
}

async fn submit(server: &TestServer, key: &str, route: &str, body: Value) -> Value {
    let (status, reply) = json(server.post(&format!("/api/generate/{route}"), key, body).await).await;
    assert_eq!(status, 200, "{route}: {reply}");
    assert_eq!(reply["data"]["status"], "queued", "{reply}");
    reply["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_job_runs_on_the_openai_channel_and_its_signed_url_serves_the_png() {
    let up = FakeUpstream::start().await;
    let server = server_with(&up, "").await;
    let (_, key) = server.account("enterprise", 100);
    let queued = submit(&server, &key, "image", json!({"prompt": "A futuristic city skyline at sunset", "width": 512, "height": 768})).await;
    assert_eq!(queued["creditsCharged"], 10);
    assert!(queued["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(balance(&server, &key).await, 90, "debited before processing");

    let job = wait_job(&server, &key, queued["jobId"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!((job["type"].clone(), job["outputType"].clone(), job["progress"].clone()), (json!("image"), json!("image/png"), json!(100)));
    assert_eq!(job["metadata"]["width"], 512);
    assert_eq!(job["metadata"]["model"], "flux-2-dev");
    assert!(job["metadata"]["durationMs"].is_u64());
    assert_eq!(up.hits("size 512x768"), 1, "the size reached the provider");
    assert!(job["completedAt"].is_string() && job["failedAt"].is_null());

    let url = job["outputUrl"].as_str().expect("output URL").to_owned();
    let got = server.http.get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/png");
    assert_eq!(got.bytes().await.unwrap().as_ref(), PNG);
    // Tampering with the path, the expiry or the signature is a 403; so is no signature.
    let tampered = [
        url.replace("output.png", "output.mp4"),
        url.replace("expires=", "expires=9"),
        // The signature's last digit changed (to a digit it is not: a fixed
        // '0' left one URL in 16 unchanged).
        format!("{}{}", &url[..url.len() - 1], if url.ends_with('0') { '1' } else { '0' }),
        url.split('?').next().unwrap().to_string(),
    ];
    for bad in tampered {
        let resp = server.http.get(&bad).send().await.unwrap();
        expect_error(resp, 403, "FORBIDDEN").await;
    }
    // The generic list shows it too, with the same fields.
    let (_, list) = json(server.get("/api/jobs?type=image&status=completed", &key).await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["data"][0]["id"], job["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generation_route_charges_its_price_and_ends_with_its_outputs() {
    let up = FakeUpstream::start().await;
    let server = server_with(&up, "").await;
    let (_, key) = server.account("enterprise", 20_000);
    let u = "https://127.0.0.1/media/sample";
    let cases: Vec<(&str, Value, u64, &str)> = vec![
        ("image", json!({"prompt": "a cat", "model": "flux-2-pro", "seed": 7, "style": "3d", "negativePrompt": "dogs"}), 10, "image/png"),
        ("video", json!({"script": "Hello", "avatarImage": u, "duration": 10, "resolution": "1080p", "style": "casual", "model": "veo-3.1"}), 250, "video/mp4"),
        ("voice", json!({"text": "Hi there", "model": "elevenlabs-v3", "speed": 1.5, "language": "de"}), 80, "audio/wav"),
        ("voice-clone", json!({"name": "Ann", "sampleAudioUrl": u}), 80, "application/json"),
        ("avatar", json!({"image": u, "resolution": "720p", "model": "veed-fabric", "text": "Welcome"}), 750, "video/mp4"),
        ("clip", json!({"sourceVideoUrl": u, "maxClips": 3, "minDuration": 10, "maxDuration": 60, "addCaptions": true, "aspectRatio": "1:1", "viralScoreThreshold": 7}), 30, "video/mp4"),
        ("b-roll", json!({"prompt": "ocean waves", "duration": 4, "resolution": "480p", "model": "kling-2.6-pro"}), 150, "video/mp4"),
        ("text2video", json!({"script": "A story", "duration": 8, "style": "aerial"}), 250, "video/mp4"),
        ("commercial", json!({"product": "Shoes", "platform": "tiktok", "duration": 30, "tone": "funny", "productImages": [u, u], "videoModel": "wan-2.6"}), 3000, "video/mp4"),
        ("translate", json!({"videoUrl": u, "outputLanguage": "pt-BR", "preserveOriginalVoice": true}), 1800, "video/mp4"),
        ("instant-ad", json!({"websiteUrl": u, "platform": "linkedin", "count": 3, "style": "bold"}), 1000, "image/png"),
        ("photoshoot", json!({"productImage": u, "background": "custom", "customBackground": "marble", "angle": "hero", "lighting": "soft", "count": 2}), 30, "image/png"),
    ];
    let mut spent = 0;
    let mut ids = Vec::new();
    for (route, body, price, _) in &cases {
        let queued = submit(&server, &key, route, body.clone()).await;
        assert_eq!(queued["creditsCharged"], *price, "{route}");
        assert_eq!(queued.get("estimatedMinutes").is_some(), *route == "voice", "{route}: {queued}");
        spent += price;
        ids.push(queued["jobId"].as_str().unwrap().to_owned());
    }
    assert_eq!(balance(&server, &key).await, 20_000 - spent);
    for ((route, _, _, output_type), id) in cases.iter().zip(&ids) {
        let job = wait_job(&server, &key, id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "completed", "{route}: {job:#}");
        assert_eq!(job["type"], *route);
        assert_eq!(job["outputType"], *output_type, "{route}");
        let urls = job["outputUrls"].as_array().unwrap();
        let expected_outputs = match *route {
            "voice-clone" => 0,
            "clip" | "instant-ad" => 3,
            "photoshoot" => 2,
            _ => 1,
        };
        assert_eq!(urls.len(), expected_outputs, "{route}: {job:#}");
        for url in urls {
            let resp = server.http.get(url.as_str().unwrap()).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{route}");
        }
        let m = &job["metadata"];
        match *route {
            "video" => assert_eq!((m["resolution"].clone(), m["model"].clone()), (json!("1080p"), json!("veo-3.1"))),
            "voice" => assert_eq!((m["language"].clone(), m["durationSeconds"].clone()), (json!("de"), json!(2.5))),
            "voice-clone" => assert_eq!(m["voiceId"], "voice_cloned_42"),
            "clip" => assert_eq!((m["clipCount"].clone(), m["viralScores"].clone()), (json!(3), json!([9.1, 8.4, 7.7]))),
            "commercial" => assert_eq!((m["sceneClips"].clone(), m["platform"].clone()), (json!(["hook", "demo", "cta"]), json!("tiktok"))),
            "translate" => assert_eq!(m["outputLanguage"], "pt-BR"),
            "instant-ad" => assert_eq!((m["variationCount"].clone(), m["format"].clone()), (json!(3), json!("image"))),
            "photoshoot" => assert_eq!((m["photoCount"].clone(), m["background"].clone()), (json!(2), json!("custom"))),
            _ => {}
        }
    }
    // Video bytes made it through the openai channel's authorised /content download.
    let (_, jobs) = json(server.get("/api/jobs?type=b-roll", &key).await).await;
    let url = jobs["data"][0]["outputUrl"].as_str().unwrap().to_owned();
    assert_eq!(server.http.get(&url).send().await.unwrap().bytes().await.unwrap().as_ref(), MP4);
    assert_eq!(up.hits("POST /v1/videos"), 1, "kling-2.6-pro is served by the openai channel");
    assert_eq!(balance(&server, &key).await, 20_000 - spent, "nothing refunded");
    let (_, usage) = json(server.get("/api/usage", &key).await).await;
    assert_eq!(usage["data"]["used"]["instantAds"], 1, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_enums_and_urls_are_checked_before_anything_is_charged() {
    let up = FakeUpstream::start().await;
    let server = server_with(&up, "").await;
    let (_, key) = server.account("enterprise", 10_000);
    let u = "https://127.0.0.1/x.png";
    let long = |n: usize| "x".repeat(n);
    // Just inside every bound: accepted.
    let inside: Vec<(&str, Value)> = vec![
        ("image", json!({"prompt": long(2000), "width": 256, "height": 2048, "steps": 1})),
        ("image", json!({"prompt": "a", "width": 2048, "height": 256, "steps": 50})),
        ("video", json!({"script": long(5000), "duration": 3})),
        ("video", json!({"script": "a", "duration": 60})),
        ("voice", json!({"text": long(10_000), "speed": 0.5, "model": "kokoro"})),
        ("voice", json!({"text": "a", "speed": 2.0, "model": "kokoro"})),
        ("voice-clone", json!({"name": long(100), "sampleAudioUrl": u})),
        ("clip", json!({"sourceVideoUrl": u, "maxClips": 1, "viralScoreThreshold": 1})),
        ("clip", json!({"sourceVideoUrl": u, "maxClips": 20, "viralScoreThreshold": 10})),
        ("b-roll", json!({"prompt": "a", "duration": 3})),
        ("b-roll", json!({"prompt": "a", "duration": 6})),
        ("instant-ad", json!({"websiteUrl": u, "platform": "tiktok", "count": 1, "style": "modern"})),
        ("instant-ad", json!({"websiteUrl": u, "platform": "tiktok", "count": 4, "style": "modern"})),
        ("photoshoot", json!({"productImage": u, "background": "outdoor", "angle": "top-down", "lighting": "golden-hour", "count": 4})),
    ];
    for (route, body) in &inside {
        submit(&server, &key, route, body.clone()).await;
    }
    let after_inside = balance(&server, &key).await;
    // Just outside, a wrong enum, a missing field, an unknown field, a bad URL: 400, nothing charged.
    let outside: Vec<(&str, Value, &str)> = vec![
        ("image", json!({"prompt": long(2001)}), "prompt"),
        ("image", json!({"prompt": ""}), "prompt"),
        ("image", json!({"prompt": "a", "width": 255}), "width"),
        ("image", json!({"prompt": "a", "height": 2049}), "height"),
        ("image", json!({"prompt": "a", "steps": 0}), "steps"),
        ("image", json!({"prompt": "a", "steps": 51}), "steps"),
        ("image", json!({"prompt": "a", "style": "cubist"}), "style"),
        ("image", json!({"prompt": "a", "model": "dall-e-3"}), "model"),
        ("image", json!({"prompt": "a", "width": 512.5}), "width"),
        ("image", json!({"prompt": "a", "colour": "red"}), "colour"),
        ("image", json!({}), "prompt"),
        ("video", json!({"script": long(5001)}), "script"),
        ("video", json!({"script": "a", "duration": 2}), "duration"),
        ("video", json!({"script": "a", "duration": 61}), "duration"),
        ("video", json!({"script": "a", "resolution": "4k"}), "resolution"),
        ("video", json!({"script": "a", "avatarImage": "http://1.1.1.1/face.png"}), "avatarImage"),
        ("video", json!({"script": "a", "avatarImage": "https://10.0.0.1/face.png"}), "avatarImage"),
        ("video", json!({"script": "a", "avatarImage": "https://169.254.169.254/latest/meta-data"}), "avatarImage"),
        ("voice", json!({"text": long(10_001)}), "text"),
        ("voice", json!({"text": "a", "speed": 0.49}), "speed"),
        ("voice", json!({"text": "a", "speed": 2.01}), "speed"),
        ("voice", json!({"text": "a", "language": "english"}), "language"),
        ("voice", json!({"text": "a", "model": "polly"}), "model"),
        ("voice-clone", json!({"name": long(101), "sampleAudioUrl": u}), "name"),
        ("voice-clone", json!({"name": "a", "sampleAudioUrl": "ftp://1.1.1.1/a.wav"}), "sampleAudioUrl"),
        ("avatar", json!({"image": u, "resolution": "720p", "model": "veed-fabric"}), "audio or text"),
        ("avatar", json!({"image": u, "resolution": "2160p", "model": "veed-fabric", "text": "a"}), "resolution"),
        ("clip", json!({"sourceVideoUrl": u, "maxClips": 0}), "maxClips"),
        ("clip", json!({"sourceVideoUrl": u, "maxClips": 21}), "maxClips"),
        ("clip", json!({"sourceVideoUrl": u, "viralScoreThreshold": 10.5}), "viralScoreThreshold"),
        ("clip", json!({"sourceVideoUrl": u, "minDuration": 30, "maxDuration": 10}), "minDuration"),
        ("clip", json!({"sourceVideoUrl": u, "aspectRatio": "4:3"}), "aspectRatio"),
        ("b-roll", json!({"prompt": "a", "duration": 2}), "duration"),
        ("b-roll", json!({"prompt": "a", "duration": 7}), "duration"),
        ("b-roll", json!({"prompt": "a", "model": "veo-3.1"}), "model"),
        ("text2video", json!({"script": "a", "style": "noir"}), "style"),
        ("commercial", json!({"product": "a", "platform": "tiktok", "duration": 45, "tone": "funny"}), "duration"),
        ("commercial", json!({"product": "a", "platform": "radio", "duration": 30, "tone": "funny"}), "platform"),
        ("translate", json!({"videoUrl": u, "outputLanguage": "Portuguese"}), "outputLanguage"),
        ("instant-ad", json!({"websiteUrl": u, "platform": "tiktok", "count": 0, "style": "bold"}), "count"),
        ("instant-ad", json!({"websiteUrl": u, "platform": "tiktok", "count": 5, "style": "bold"}), "count"),
        ("instant-ad", json!({"websiteUrl": u, "platform": "tiktok", "count": 1, "style": "bold", "outputFormat": "gif"}), "outputFormat"),
        ("photoshoot", json!({"productImage": u, "background": "custom", "angle": "hero", "lighting": "soft", "count": 1}), "customBackground"),
        ("photoshoot", json!({"productImage": u, "background": "studio-white", "angle": "side", "lighting": "soft", "count": 1}), "angle"),
        ("photoshoot", json!({"productImage": u, "background": "studio-white", "angle": "hero", "lighting": "soft", "count": 5}), "count"),
    ];
    for (route, body, field) in &outside {
        let resp = server.post(&format!("/api/generate/{route}"), &key, body.clone()).await;
        let msg = expect_error(resp, 400, "BAD_REQUEST").await;
        assert!(msg.contains(field), "{route} {body}: the message names {field}: {msg}");
    }
    assert_eq!(balance(&server, &key).await, after_inside, "no refused request was charged");
    let (_, jobs) = json(server.get("/api/jobs?limit=100", &key).await).await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), inside.len(), "no refused request was queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_channel_short_credits_plan_and_scope_are_refused_without_charge() {
    let up = FakeUpstream::start().await;
    let server = server_with(&up, "").await;
    let (account, key) = server.account("enterprise", 15);
    // ideogram-v3 is a known model that no channel serves here.
    let msg = expect_error(server.post("/api/generate/image", &key, json!({"prompt": "a", "model": "ideogram-v3"})).await, 503, "SERVICE_UNAVAILABLE").await;
    assert!(msg.contains("ideogram-v3"), "{msg}");
    expect_error(server.post("/api/generate/video", &key, json!({"script": "a"})).await, 402, "PAYMENT_REQUIRED").await;
    assert_eq!(balance(&server, &key).await, 15);
    // Two image jobs at once with credits for one: exactly one goes through.
    let (a, b) = tokio::join!(
        server.post("/api/generate/image", &key, json!({"prompt": "one"})),
        server.post("/api/generate/image", &key, json!({"prompt": "two"}))
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 402]);
    assert_eq!(balance(&server, &key).await, 5);
    let (_, jobs) = json(server.get("/api/jobs", &key).await).await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1);

    let (_, free_key) = server.account("free", 1000);
    expect_error(server.post("/api/generate/voice-clone", &free_key, json!({"name": "a", "sampleAudioUrl": "https://127.0.0.1/a.wav"})).await, 403, "FORBIDDEN").await;
    expect_error(server.post("/api/generate/image", &free_key, json!({"prompt": "a", "model": "flux-2-pro"})).await, 403, "FORBIDDEN").await;
    assert_eq!(balance(&server, &free_key).await, 1000);
    let jobs_only = server.key_with_scopes(&account, "jobs");
    expect_error(server.post("/api/generate/image", &jobs_only, json!({"prompt": "a"})).await, 403, "FORBIDDEN").await;
    let generate_only = server.key_with_scopes(&account, "generate");
    expect_error(server.get("/api/jobs", &generate_only).await, 403, "FORBIDDEN").await;
    expect_error(server.get("/api/jobs?id=00000000-0000-4000-8000-000000000000", &key).await, 404, "NOT_FOUND").await;
    expect_error(server.get("/api/jobs/not-a-uuid", &key).await, 404, "NOT_FOUND").await;
    expect_error(server.get("/api/jobs?status=done", &key).await, 400, "BAD_REQUEST").await;
    expect_error(server.get("/api/jobs?limit=0", &key).await, 400, "BAD_REQUEST").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upstream_task_fails_the_job_refunds_once_and_sends_a_signed_webhook() {
    let up = FakeUpstream::start().await;
    let hook = WebhookSink::start().await;
    let server = server_with(&up, "").await;
    let (_, key) = server.account("enterprise", 1000);
    let (_, settings) = json(server.post("/api/settings", &key, json!({"webhookUrl": hook.url()})).await).await;
    let secret = settings["data"]["webhookSecret"].as_str().expect("secret").to_owned();

    let queued = submit(&server, &key, "video", json!({"script": "please fail-upstream now", "model": "wan-2.6"})).await;
    let job = wait_job(&server, &key, queued["jobId"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"], "Generation failed", "internal details stay inside");
    assert_eq!(job["creditsRefunded"], 250);
    assert!(job["failedAt"].is_string() && job["outputUrl"].is_null());
    assert_eq!(balance(&server, &key).await, 1000);

    let got = hook.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].signature_valid(&secret), "signature verifies");
    let body = &got[0].body;
    assert_eq!(body["event"], "job.failed");
    assert_eq!(body["data"]["jobId"], queued["jobId"]);
    assert_eq!(body["data"]["type"], "video");
    assert_eq!(body["data"]["creditsRefunded"], 250);
    assert_eq!(body["data"]["error"], "Generation failed");
    assert!(!got[0].raw.contains("/srv/secret"), "{}", got[0].raw);
    assert!(body["timestamp"].is_string());
    for field in ["createdAt", "failedAt"] {
        assert!(body["data"][field].is_string(), "{field}");
    }

    // A rejected request (4xx from the provider) fails at once, refunded too.
    let queued = submit(&server, &key, "image", json!({"prompt": "refuse-me please"})).await;
    let job = wait_job(&server, &key, queued["jobId"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!((job["status"].clone(), job["creditsRefunded"].clone()), (json!("failed"), json!(10)));
    assert_eq!(up.hits("POST /v1/images/generations"), 1, "a 4xx is not retried");
    assert_eq!(balance(&server, &key).await, 1000);

    let (_, deliveries) = json(server.get("/api/webhooks/deliveries", &key).await).await;
    let list = deliveries["data"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{deliveries:#}");
    assert!(list.iter().all(|d| d["event"] == "job.failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_job_webhook_retries_a_down_receiver_on_the_schedule() {
    let up = FakeUpstream::start().await;
    let hook = WebhookSink::start_failing(2).await;
    let server = server_with(&up, "[webhooks]\nretry_delays_secs = [1, 2, 3]\npoll_interval_ms = 100\n\n").await;
    let (_, key) = server.account("enterprise", 100);
    let (_, settings) = json(server.post("/api/settings", &key, json!({"webhookUrl": hook.url()})).await).await;
    let secret = settings["data"]["webhookSecret"].as_str().expect("secret").to_owned();
    let queued = submit(&server, &key, "image", json!({"prompt": "a"})).await;

    let got = hook.wait_for(3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 3, "two refusals, then delivered");
    assert_eq!(got.iter().map(|d| d.refused).collect::<Vec<_>>(), [true, true, false]);
    assert!(got.iter().all(|d| d.raw == got[0].raw && d.signature_valid(&secret)), "the same signed body every time");
    assert!(got[1].at - got[0].at >= Duration::from_millis(900), "first retry after the first delay");
    assert!(got[2].at - got[1].at >= Duration::from_millis(1900), "second retry after the second delay");
    let body = &got[2].body;
    assert_eq!(body["event"], "job.completed");
    assert_eq!(body["data"]["jobId"], queued["jobId"]);
    assert_eq!(body["data"]["outputType"], "image/png");
    assert_eq!(body["data"]["metadata"]["model"], "flux-2-dev");
    let url = body["data"]["outputUrl"].as_str().expect("outputUrl").to_owned();
    assert_eq!(server.http.get(&url).send().await.unwrap().bytes().await.unwrap().as_ref(), PNG);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, deliveries) = json(server.get("/api/webhooks/deliveries", &key).await).await;
    let d = &deliveries["data"][0];
    assert_eq!((d["status"].clone(), d["attempts"].clone()), (json!("delivered"), json!(3)), "{d:#}");
    let statuses: Vec<Value> = d["attemptLog"].as_array().unwrap().iter().map(|a| a["status"].clone()).collect();
    assert_eq!(statuses, [json!(503), json!(503), json!(200)]);
    assert!(d["payload"]["data"]["jobId"] == queued["jobId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_channel_gives_way_to_the_next_and_exhausted_retries_refund() {
    let up = FakeUpstream::start().await;
    let extra = "[jobs]\nmax_attempts = 2\nretry_backoff_secs = [1]\n\n";
    let server = server_with(&up, extra).await;
    let (_, key) = server.account("enterprise", 100);
    // flux-2-dev: the openai channel (priority 5) answers 500, the replicate channel takes it.
    up.set(|s| s.fail_submissions = 1);
    let queued = submit(&server, &key, "image", json!({"prompt": "a"})).await;
    let job = wait_job(&server, &key, queued["jobId"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!((up.hits("POST /v1/images/generations"), up.hits("submit flux-2-dev")), (1, 1));

    // Both channels down for both runs: the job fails after its second run, refunded.
    up.set(|s| s.fail_submissions = 4);
    let queued = submit(&server, &key, "image", json!({"prompt": "b"})).await;
    let job = wait_job(&server, &key, queued["jobId"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!((job["status"].clone(), job["creditsRefunded"].clone()), (json!("failed"), json!(10)), "{job:#}");
    assert_eq!(up.hits("POST /v1/images/generations") + up.hits("submit flux-2-dev"), 2 + 4);
    assert_eq!(balance(&server, &key).await, 90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_a_crash_and_each_ends_exactly_once() {
    let up = FakeUpstream::start().await;
    let hook = WebhookSink::start().await;
    up.set(|s| s.hold = true);
    let extra = "[jobs]\nworkers = 2\nlease_secs = 2\n\n";
    let mut server = server_with(&up, extra).await;
    let (_, key) = server.account("enterprise", 10_000);
    json(server.post("/api/settings", &key, json!({"webhookUrl": hook.url()})).await).await;
    let bodies = [
        ("video", json!({"script": "one", "model": "wan-2.6"})),
        // Its task is made upstream, but the answer comes only after the crash.
        ("video", json!({"script": "two fail-upstream stall-submit", "model": "wan-2.6"})),
        ("text2video", json!({"script": "three"})),
        ("translate", json!({"videoUrl": "https://127.0.0.1/v.mp4", "outputLanguage": "fr"})),
    ];
    let mut ids = Vec::new();
    for (route, body) in &bodies {
        ids.push(submit(&server, &key, route, body.clone()).await["jobId"].as_str().unwrap().to_owned());
    }
    // Two workers: one job is being polled upstream, one waits for the
    // answer to its submission, two wait in the queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = json(server.get("/api/jobs?status=processing", &key).await).await;
        if (list["data"].as_array().unwrap().len() == 2 && up.tasks() == 2) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, queued) = json(server.get("/api/jobs?status=queued", &key).await).await;
    assert_eq!(queued["data"].as_array().unwrap().len(), 2, "{queued:#}");
    assert_eq!(up.tasks(), 2);

    server.kill();
    up.set(|s| s.hold = false);
    server.launch();

    let mut refunded = 0;
    for id in &ids {
        let job = wait_job(&server, &key, id, Duration::from_secs(30)).await;
        assert!(job["status"] == "completed" || job["status"] == "failed", "{job:#}");
        refunded += job["creditsRefunded"].as_u64().unwrap();
    }
    assert_eq!(refunded, 250, "only the failing job was refunded, once");
    assert_eq!(balance(&server, &key).await, 10_000 - (250 + 250 + 250 + 1800) + 250);
    // The jobs that were running upstream were polled again, and the one
    // whose answer was lost was submitted again under the same key: one
    // upstream task per job.
    assert_eq!(up.tasks(), 4);
    assert!(up.hits("replayed submission") >= 1);
    let got = hook.wait_for(4, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = hook.wait_for(5, Duration::from_millis(10)).await;
    assert_eq!(got.len(), 4);
    assert_eq!(got_after.len(), 4, "one webhook per job");
    let mut job_ids: Vec<&str> = got.iter().map(|d| d.body["data"]["jobId"].as_str().unwrap()).collect();
    job_ids.sort();
    job_ids.dedup();
    assert_eq!(job_ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_gateway_queues_tasks_polls_them_and_speaks_openai_errors() {
    let up = FakeUpstream::start().await;
    let server = server_with(&up, "").await;
    let (_, key) = server.account("enterprise", 300);

    let (status, models) = json(server.get("/v1/models", &key).await).await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"flux-2-dev") && ids.contains(&"wan-2.6"), "{ids:?}");

    let (status, task) = json(server.post("/v1/images/generations", &key, json!({"model": "flux-2-dev", "prompt": "a city", "size": "512x512", "n": 1})).await).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["object"], "gateway.image.task");
    assert_eq!(task["status"], "pending");
    assert_eq!(task["task_id"], task["id"]);
    let id = task["task_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let (_, t) = json(server.get(&format!("/v1/tasks/{id}"), &key).await).await;
        if t["status"] == "completed" || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "completed", "{done:#}");
    let url = done["output"]["url"].as_str().unwrap().to_owned();
    assert_eq!(server.http.get(&url).send().await.unwrap().bytes().await.unwrap().as_ref(), PNG);
    assert_eq!(up.hits("size 512x512"), 1);

    let (status, video) = json(server.post("/v1/videos", &key, json!({"model": "wan-2.6", "prompt": "launch", "seconds": "8", "size": "1280x720"})).await).await;
    assert_eq!(status, 200, "{video}");
    assert_eq!(video["object"], "gateway.video.task");
    assert_eq!(balance(&server, &key).await, 300 - 10 - 250);

    // Relayed chat on the openai channel that serves the model.
    let (status, chat) = json(server.post("/v1/chat/completions", &key, json!({"model": "gpt-up", "messages": [{"role": "user", "content": "hi"}]})).await).await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["choices"][0]["message"]["content"], "relayed");

    // OpenAI's error shape on /v1.
    let openai_error = |body: &Value, code: &str| {
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert!(body["error"]["type"].is_string(), "{body}");
    };
    let (status, body) = json(server.post("/v1/videos", &key, json!({"model": "wan-2.6", "prompt": "again"})).await).await;
    assert_eq!(status, 402);
    openai_error(&body, "insufficient_credits");
    assert_eq!(body["error"]["type"], "gateway_error");
    let (status, body) = json(server.post("/v1/images/generations", "sk_live_wrong", json!({"prompt": "a"})).await).await;
    assert_eq!(status, 401);
    openai_error(&body, "invalid_api_key");
    let (status, body) = json(server.post("/v1/images/generations", &key, json!({"prompt": "a", "size": "huge"})).await).await;
    assert_eq!(status, 400);
    openai_error(&body, "invalid_request");
    for bad in [json!({"prompt": "a", "size": "640x480"}), json!({"prompt": "a", "seconds": "eight"}), json!({"prompt": "a", "callback_url": "https://1.1.1.1/h"})] {
        let (status, body) = json(server.post("/v1/videos", &key, bad).await).await;
        assert_eq!(status, 400, "{body}");
        openai_error(&body, "invalid_request");
    }
    let (status, body) = json(server.post("/v1/chat/completions", &key, json!({"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]})).await).await;
    assert_eq!(status, 503);
    openai_error(&body, "service_unavailable");
    let (status, body) = json(server.get("/v1/tasks/00000000-0000-4000-8000-000000000000", &key).await).await;
    assert_eq!(status, 404);
    openai_error(&body, "not_found");
    // x-api-key works as well (seed 002).
    let resp = server.http.get(server.url("/v1/models")).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sixth_generation_request_in_ten_seconds_is_429_and_not_charged() {
    let up = FakeUpstream::start().await;
    let config = format!("{TRUST_LOOPBACK}{}", channel("oa", "openai", &up.openai_url(), &["flux-2-dev"], 0));
    let server = TestServer::start_configured(&config, &[]).await;
    let (_, key) = server.account("enterprise", 1000);
    for remaining in (0..5).rev() {
        let resp = server.post("/api/generate/image", &key, json!({"prompt": "a"})).await;
        assert_eq!(resp.headers()["x-ratelimit-limit"], "5");
        assert_eq!(resp.headers()["x-ratelimit-remaining"], remaining.to_string().as_str());
        assert_eq!(resp.status(), 200);
    }
    let refused = server.post("/api/generate/image", &key, json!({"prompt": "a"})).await;
    assert!(refused.headers().get("retry-after").is_some());
    expect_error(refused, 429, "RATE_LIMITED").await;
    assert_eq!(balance(&server, &key).await, 1000 - 5 * 10, "the refused request cost nothing");
    // Reads have their own quota.
    assert_eq!(server.get("/api/jobs", &key).await.status(), 200);
}
