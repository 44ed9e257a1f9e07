//! Organisations and credentials: no key reaches another organisation's
//! objects on any route (the routes come from the server's own OpenAPI
//! document, so a new route is checked without being listed here); per-key
//! limits (models, client networks, a daily credit cap); the token exchange
//! (valid, expired, tampered, revoked); the admin CLI.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use common::upstream::{channel, FakeUpstream};
use common::voice::{balance, create_agent};
use common::{expect_error, json, TestServer};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};

const SIGNING_KEY: &str = "orgs-test-signing-key-0123456789";
const MANY: [(&str, &str); 4] = [
    ("VOXGATE_RATE_LIMITS__GENERATION__REQUESTS", "1000"),
    ("VOXGATE_RATE_LIMITS__READS__REQUESTS", "10000"),
    ("VOXGATE_RATE_LIMITS__WRITES__REQUESTS", "10000"),
    ("VOXGATE_RATE_LIMITS__DELETES__REQUESTS", "10000"),
];

async fn server(upstream: &FakeUpstream, top: &str) -> TestServer {
    let config = format!(
        "{top}[storage]\nsigning_key = \"{SIGNING_KEY}\"\n\n{}",
        channel("oa", "openai", &upstream.openai_url(), &["flux-2-dev", "gpt-up"], 5)
    );
    TestServer::start_configured(&config, &MANY).await
}

/// What organisation A owns, by kind.
struct Owned {
    agent: String,
    call: String,
    job: String,
    key: String,
}

impl Owned {
    fn all(&self) -> [&str; 4] {
        [&self.agent, &self.call, &self.job, &self.key]
    }

    /// The object a path parameter names, from the collection it follows.
    fn for_collection(&self, collection: &str, path: &str) -> &str {
        match collection {
            "agents" => &self.agent,
            "calls" => &self.call,
            "jobs" | "tasks" => &self.job,
            "keys" => &self.key,
            other => panic!("{path}: no object of another organisation for '{other}'; add one to this suite"),
        }
    }
}

/// A body for a route that names objects: A's where one is named, plain
/// valid values for the rest.
fn body_for(schema: &Value, a: &Owned, b_key: &str, path: &str) -> Option<Value> {
    let props = schema["properties"].as_object()?;
    let names = ["agentId", "appId"];
    if !props.keys().any(|k| names.contains(&k.as_str())) {
        return None;
    }
    let mut body = serde_json::Map::new();
    for field in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let value = match field {
            "agentId" => json!(a.agent),
            "appId" => json!(a.key),
            "userKey" => json!(b_key),
            "phoneNumber" => json!("+14155550123"),
            "provider" => json!("twilio"),
            other => panic!("{path}: required field '{other}' has no value in this suite; add one"),
        };
        body.insert(field.into(), value);
    }
    Some(Value::Object(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_lets_a_key_reach_another_organisations_objects() {
    let up = FakeUpstream::start().await;
    up.set(|s| s.hold = true);
    let server = server(&up, "").await;
    let (_, a_key) = server.account("enterprise", 10_000);
    let (_, b_key) = server.account("enterprise", 10_000);

    let agent = create_agent(&server, &a_key, "Hello!").await;
    let (status, call) = json(server.post("/api/voice-agent/calls/stream", &a_key, json!({"agentId": agent, "provider": "twilio"})).await).await;
    assert_eq!(status, 201, "{call}");
    let (status, job) = json(server.post("/api/generate/image", &a_key, json!({"prompt": "a cat", "model": "flux-2-dev"})).await).await;
    assert_eq!(status, 200, "{job}");
    let (status, key) = json(server.post("/api/keys", &a_key, json!({"name": "second"})).await).await;
    assert_eq!(status, 201, "{key}");
    let a = Owned {
        agent,
        call: call["data"]["callId"].as_str().unwrap().into(),
        job: job["data"]["jobId"].as_str().unwrap().into(),
        key: key["data"]["id"].as_str().unwrap().into(),
    };

    let (_, doc) = json(server.http.get(server.url("/api/openapi")).send().await.unwrap()).await;
    let schemas = &doc["components"]["schemas"];
    let mut checked = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "post", "patch", "put", "delete"].contains(&method.as_str()) {
                continue;
            }
            let verb = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let segments: Vec<&str> = path.split('/').collect();
            let params: Vec<(usize, &str)> = segments.iter().enumerate().filter(|(_, s)| s.starts_with('{')).map(|(i, s)| (i, *s)).collect();
            let request = |url: String| server.http.request(verb.clone(), url).bearer_auth(&b_key);
            if !params.is_empty() {
                // Every object named in the path is A's.
                let mut concrete = segments.clone();
                for (i, _) in &params {
                    concrete[*i] = a.for_collection(segments[i - 1], path);
                }
                let url = server.url(&concrete.join("/"));
                let resp = request(url.clone()).json(&json!({})).send().await.unwrap();
                let msg = expect_error(resp, 404, "NOT_FOUND").await;
                assert!(!a.all().iter().any(|id| msg.contains(id)), "{method} {path} tells about A's object: {msg}");
                checked.push(format!("{method} {path}"));
                continue;
            }
            // An `id` query parameter names one object: A's.
            let id_query = op["parameters"].as_array().into_iter().flatten().any(|p| p["in"] == "query" && p["name"] == "id");
            if id_query && method == "get" {
                let resp = request(server.url(&format!("{path}?id={}", a.job))).send().await.unwrap();
                expect_error(resp, 404, "NOT_FOUND").await;
                checked.push(format!("{method} {path}?id"));
                continue;
            }
            // A body that names A's objects.
            let schema_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str();
            if let Some(body) = schema_ref.and_then(|r| body_for(&schemas[r.rsplit('/').next().unwrap()], &a, &b_key, path)) {
                let resp = request(server.url(path)).json(&body).send().await.unwrap();
                let (status, reply) = json(resp).await;
                assert!(status == 404 || (path == "/api/auth/token" && status == 401), "{method} {path} with {body}: {status} {reply}");
                checked.push(format!("{method} {path} (body)"));
                continue;
            }
            // Everything else (lists, B's own settings and usage) must not
            // show anything of A's.
            if method == "get" {
                let resp = request(server.url(path)).send().await.unwrap();
                let text = resp.text().await.unwrap();
                for id in a.all() {
                    assert!(!text.contains(id), "{method} {path} shows A's {id}: {text}");
                }
                checked.push(format!("{method} {path} (listing)"));
            }
        }
    }
    // The OpenAI-compatible routes are outside the document: the task route
    // names a job.
    let resp = server.get(&format!("/v1/tasks/{}", a.job), &b_key).await;
    assert_eq!(resp.status(), 404, "{}", resp.text().await.unwrap());
    assert!(checked.len() >= 20, "only {} operations checked: {checked:#?}", checked.len());
    for must in ["get /api/voice-agent/agents/{id}", "delete /api/keys/{id}", "post /api/voice-agent/calls/{id}/hangup", "get /api/jobs/{id}"] {
        assert!(checked.iter().any(|c| c == must), "{must} not checked: {checked:#?}");
    }

    // A's objects are untouched by B's attempts (delete, revoke, hang up).
    let (status, _) = json(server.get(&format!("/api/voice-agent/agents/{}", a.agent), &a_key).await).await;
    assert_eq!(status, 200);
    let (_, k) = json(server.get(&format!("/api/keys/{}", a.key), &a_key).await).await;
    assert!(k["data"]["revokedAt"].is_null(), "{k}");
    let (_, c) = json(server.get(&format!("/api/voice-agent/calls/{}", a.call), &a_key).await).await;
    assert_eq!(c["data"]["status"], "queued", "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_limited_to_their_models_networks_and_daily_credits() {
    let up = FakeUpstream::start().await;
    up.set(|s| s.hold = true);
    // This node sits behind a load balancer at 127.0.0.1.
    let server = server(&up, "trusted_proxies = [\"127.0.0.1/32\"]\n").await;
    let (org, admin) = server.account("enterprise", 10_000);

    // Models.
    let flux_only = server.cli(&["keys", "create", "--org", &org, "--models", "flux-2-dev"]);
    let (status, _) = json(server.post("/api/generate/image", &flux_only, json!({"prompt": "a", "model": "flux-2-dev"})).await).await;
    assert_eq!(status, 200);
    // The /v1 gateway answers in OpenAI's error shape.
    let (status, err) = json(server.post("/v1/chat/completions", &flux_only, json!({"model": "gpt-up", "messages": [{"role": "user", "content": "hi"}]})).await).await;
    assert_eq!((status, &err["error"]["code"]), (403, &json!("forbidden")), "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("gpt-up") && msg.contains("flux-2-dev"), "{msg}");

    // Networks: the client is the last address the load balancer saw.
    let office = server.cli(&["keys", "create", "--org", &org, "--ip", "10.0.0.0/8,192.0.2.7"]);
    let from = |ip: &str, key: &str| server.http.get(server.url("/api/usage")).bearer_auth(key).header("x-forwarded-for", ip).send();
    assert_eq!(from("10.1.2.3", &office).await.unwrap().status(), 200);
    assert_eq!(from("192.0.2.7", &office).await.unwrap().status(), 200);
    // A forged first hop does not help: the balancer appended the real one.
    let msg = expect_error(from("10.1.2.3, 198.51.100.9", &office).await.unwrap(), 403, "FORBIDDEN").await;
    assert!(msg.contains("198.51.100.9") && msg.contains("ipAllowlist"), "{msg}");
    // Without the header the client is the balancer itself.
    expect_error(server.get("/api/usage", &office).await, 403, "FORBIDDEN").await;
    assert_eq!(server.get("/api/usage", &admin).await.status(), 200);

    // Daily credits: 25 a day buys two images of 10, not a third.
    let capped = server.cli(&["keys", "create", "--org", &org, "--daily-cap", "25"]);
    let before = balance(&server, &admin).await;
    for _ in 0..2 {
        let (status, body) = json(server.post("/api/generate/image", &capped, json!({"prompt": "a", "model": "flux-2-dev"})).await).await;
        assert_eq!(status, 200, "{body}");
    }
    let msg = expect_error(server.post("/api/generate/image", &capped, json!({"prompt": "a", "model": "flux-2-dev"})).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("daily credit cap of 25") && msg.contains("20 spent"), "{msg}");
    assert_eq!(balance(&server, &admin).await, before - 20);
    // The organisation's other keys are not held by that key's cap.
    let (status, _) = json(server.post("/api/generate/image", &admin, json!({"prompt": "a", "model": "flux-2-dev"})).await).await;
    assert_eq!(status, 200);
    // Nor can the capped key start a call whose first minute (10) it cannot pay.
    let agent = create_agent(&server, &admin, "Hello!").await;
    let msg = expect_error(server.post("/api/voice-agent/calls/stream", &capped, json!({"agentId": agent, "provider": "twilio"})).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("leaves 5 credits"), "{msg}");
    // A key limited to image models cannot make or call an agent with speech models.
    let msg = expect_error(
        server.post("/api/voice-agent/agents", &flux_only, json!({"name": "A", "systemPrompt": "Be brief.", "ttsModel": "piper", "llmModel": "smollm2-135m"})).await,
        403,
        "FORBIDDEN",
    )
    .await;
    assert!(msg.contains("smollm2-135m"), "{msg}");
    expect_error(server.post("/api/voice-agent/calls/stream", &flux_only, json!({"agentId": agent, "provider": "twilio"})).await, 403, "FORBIDDEN").await;
    let (_, calls) = json(server.get("/api/voice-agent/calls", &admin).await).await;
    assert_eq!(calls["data"], json!([]), "refused calls leave nothing behind");

    // A key hands out only what it has; what it leaves out is inherited.
    let (status, made) = json(server.post("/api/keys", &capped, json!({"name": "child", "member": "ana@example.com"})).await).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["data"]["dailyCreditCap"], 25);
    assert_eq!(made["data"]["member"], "ana@example.com");
    let msg = expect_error(server.post("/api/keys", &capped, json!({"name": "wider", "dailyCreditCap": 26})).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("26"), "{msg}");
    let msg = expect_error(server.post("/api/keys", &flux_only, json!({"name": "x", "allowedModels": ["gpt-up"]})).await, 403, "FORBIDDEN").await;
    assert!(msg.contains("gpt-up"), "{msg}");
    expect_error(server.post("/api/keys", &admin, json!({"name": "x", "ipAllowlist": ["10.0.0.300/8"]})).await, 400, "BAD_REQUEST").await;
    expect_error(server.post("/api/keys", &admin, json!({"name": "x", "allowedModels": []})).await, 400, "BAD_REQUEST").await;
    expect_error(server.post("/api/keys", &admin, json!({"name": "x", "dailyCreditCap": 0})).await, 400, "BAD_REQUEST").await;
    // Rotation keeps the limits.
    let (_, listed) = json(server.get("/api/keys", &admin).await).await;
    let office_id = listed["data"].as_array().unwrap().iter().find(|k| k["ipAllowlist"].is_array()).unwrap()["id"].as_str().unwrap().to_owned();
    let (status, rotated) = json(server.post(&format!("/api/keys/{office_id}/rotate"), &admin, json!({})).await).await;
    assert_eq!(status, 201, "{rotated}");
    assert_eq!(rotated["data"]["ipAllowlist"], json!(["10.0.0.0/8", "192.0.2.7/32"]));

    // The CLI refuses a bad network with a clear message.
    let out = std::process::Command::new(common::BIN)
        .args(["keys", "create", "--org", &org, "--ip", "ten.0.0.0/8"])
        .env("DATABASE_URL", &server.db.url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ten.0.0.0/8"));
}

/// A token signed as the server signs them, with the claims given.
fn forge(claims: &Value) -> String {
    let payload = B64.encode(serde_json::to_vec(claims).unwrap());
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SIGNING_KEY.as_bytes()).unwrap();
    mac.update(format!("access-token\nv1\n{payload}").as_bytes());
    format!("vxt_{payload}.{}", B64.encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_id_and_user_key_buy_a_day_long_token_that_dies_with_its_key() {
    let up = FakeUpstream::start().await;
    let server = server(&up, "").await;
    let (org, admin) = server.account("enterprise", 1000);
    let (_, me) = json(server.get("/api/org", &admin).await).await;
    let app_id = me["data"]["keyId"].as_str().unwrap().to_owned();
    assert_eq!(me["data"]["id"], org.as_str());
    let exchange = |body: Value| server.http.post(server.url("/api/auth/token")).json(&body).send();

    let (status, t) = json(exchange(json!({"appId": app_id, "userKey": admin})).await.unwrap()).await;
    assert_eq!(status, 200, "{t}");
    let token = t["data"]["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(t["data"]["tokenType"], "Bearer");
    assert_eq!(t["data"]["expiresIn"], 86_400);
    assert_eq!(t["data"]["orgId"], org.as_str());
    let (status, me) = json(server.get("/api/org", &token).await).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["data"]["id"], org.as_str());
    assert!(me["data"]["tokenExpiresAt"].is_string());
    assert_eq!(server.get("/api/usage", &token).await.status(), 200);

    // Narrower scopes hold; wider ones cannot be asked for.
    let (_, t2) = json(exchange(json!({"appId": app_id, "userKey": admin, "scopes": ["usage"], "expiresIn": 600})).await.unwrap()).await;
    let usage_only = t2["data"]["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(server.get("/api/usage", &usage_only).await.status(), 200);
    expect_error(server.get("/api/keys", &usage_only).await, 403, "FORBIDDEN").await;
    let usage_key = server.key_with_scopes(&org, "usage");
    let (_, usage_me) = json(server.get("/api/org", &usage_key).await).await;
    let usage_id = usage_me["data"]["keyId"].as_str().unwrap().to_owned();
    expect_error(exchange(json!({"appId": usage_id, "userKey": usage_key, "scopes": ["*"]})).await.unwrap(), 403, "FORBIDDEN").await;

    // Bad exchanges.
    expect_error(exchange(json!({"appId": app_id, "userKey": usage_key})).await.unwrap(), 401, "UNAUTHORIZED").await;
    expect_error(exchange(json!({"appId": uuid::Uuid::new_v4(), "userKey": admin})).await.unwrap(), 401, "UNAUTHORIZED").await;
    expect_error(exchange(json!({"appId": app_id, "userKey": "sk_live_nope"})).await.unwrap(), 401, "UNAUTHORIZED").await;
    expect_error(exchange(json!({"appId": app_id, "userKey": admin, "expiresIn": 86_401})).await.unwrap(), 400, "BAD_REQUEST").await;
    expect_error(exchange(json!({"appId": app_id})).await.unwrap(), 400, "BAD_REQUEST").await;

    // Expired: the same signature scheme, an expiry in the past.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = json!({"kid": app_id, "org": org, "scopes": ["*"], "iat": now - 90_000, "exp": now - 10});
    let msg = expect_error(server.get("/api/usage", &forge(&claims)).await, 401, "UNAUTHORIZED").await;
    assert!(msg.contains("expired"), "{msg}");
    // The oracle signs like the server: the same claims in date pass.
    let live = json!({"kid": app_id, "org": org, "scopes": ["usage"], "iat": now, "exp": now + 60});
    assert_eq!(server.get("/api/usage", &forge(&live)).await.status(), 200);

    // Tampered: more scopes, another organisation, a later expiry, a cut signature.
    let (payload, sig) = token.strip_prefix("vxt_").unwrap().split_once('.').unwrap();
    let mut claims: Value = serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
    claims["exp"] = json!(now + 10 * 86_400);
    let tampered = format!("vxt_{}.{sig}", B64.encode(serde_json::to_vec(&claims).unwrap()));
    expect_error(server.get("/api/usage", &tampered).await, 401, "UNAUTHORIZED").await;
    expect_error(server.get("/api/usage", &format!("vxt_{payload}.{}", &sig[..sig.len() - 2])).await, 401, "UNAUTHORIZED").await;
    let (other_org, _) = server.account("enterprise", 0);
    let moved = json!({"kid": app_id, "org": other_org, "scopes": ["*"], "iat": now, "exp": now + 60});
    expect_error(server.get("/api/usage", &forge(&moved)).await, 401, "UNAUTHORIZED").await;

    // Revoking the key ends its tokens at once.
    let (_, created) = json(server.post("/api/keys", &admin, json!({"name": "app"})).await).await;
    let (app_key, app_key_id) = (created["data"]["key"].as_str().unwrap().to_owned(), created["data"]["id"].as_str().unwrap().to_owned());
    let (_, t3) = json(exchange(json!({"appId": app_key_id, "userKey": app_key})).await.unwrap()).await;
    let app_token = t3["data"]["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(server.get("/api/usage", &app_token).await.status(), 200);
    assert_eq!(server.delete(&format!("/api/keys/{app_key_id}"), &admin).await.status(), 200);
    let msg = expect_error(server.get("/api/usage", &app_token).await, 401, "UNAUTHORIZED").await;
    assert!(msg.contains("revoked"), "{msg}");

    // The admin CLI lists the organisations.
    let listed = server.cli(&["orgs", "list"]);
    assert!(listed.contains(&org) && listed.contains(&other_org), "{listed}");
}
