//! A local stand-in for Twilio: the subset of the REST API voxgate uses
//! (create a Call with TwiML, update a Call's Status), with basic auth and
//! Twilio's errors; for each call it posts signed status callbacks
//! (initiated, ringing, in-progress, completed) and, once "answered", opens
//! the `<Connect><Stream url>` WebSocket as Twilio would and plays the
//! callee with a [`StreamPhone`].
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;

use super::stream_phone::{Kind, StreamPhone};

pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const AUTH_TOKEN: &str = "twilio-test-auth-token";
/// Twilio's test number that is not a valid phone number (error 21211).
pub const INVALID_TO: &str = "+15005550001";

#[derive(Default)]
pub struct Twilio {
    /// Every REST request: (path, form).
    pub requests: Vec<(String, BTreeMap<String, String>)>,
    pub phones: Vec<Arc<StreamPhone>>,
    /// Status codes voxgate answered our callbacks with.
    pub callback_answers: Vec<u16>,
    /// Milliseconds the callee's phone rings.
    pub ring_ms: u64,
    callbacks: BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct FakeTwilio {
    pub addr: std::net::SocketAddr,
    pub state: Arc<Mutex<Twilio>>,
}

impl FakeTwilio {
    pub async fn start() -> FakeTwilio {
        let state = Arc::new(Mutex::new(Twilio { ring_ms: 300, ..Default::default() }));
        let app = Router::new()
            .route("/2010-04-01/Accounts/{sid}/Calls.json", post(create_call))
            .route("/2010-04-01/Accounts/{sid}/Calls/{call}", post(update_call))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeTwilio { addr, state }
    }

    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// voxgate.toml lines of a carrier `twilio` pointed here.
    pub fn carrier_toml(&self) -> String {
        format!(
            "[[carriers]]\nname = \"twilio\"\nkind = \"twilio\"\naccount_sid = \"{ACCOUNT_SID}\"\nauth_token = \"{AUTH_TOKEN}\"\nfrom = \"+14155550100\"\napi_base = \"{}\"\n",
            self.api_base()
        )
    }

    /// The callee of the first call, once its stream is up.
    pub async fn phone(&self, within: Duration) -> Option<Arc<StreamPhone>> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(p) = self.state.lock().unwrap().phones.first().cloned() {
                return Some(p);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn requests(&self) -> Vec<(String, BTreeMap<String, String>)> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn callback_answers(&self) -> Vec<u16> {
        self.state.lock().unwrap().callback_answers.clone()
    }
}

fn authorised(headers: &HeaderMap) -> bool {
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}")));
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
}

fn form(body: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(body.as_bytes()).into_owned() {
        // StatusCallbackEvent repeats; the last one is enough here.
        out.insert(k, v);
    }
    out
}

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status.as_u16()}))).into_response()
}

async fn create_call(State(state): State<Arc<Mutex<Twilio>>>, Path(sid): Path<String>, headers: HeaderMap, body: String) -> Response {
    if !authorised(&headers) || sid != ACCOUNT_SID {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let params = form(&body);
    state.lock().unwrap().requests.push(("create".into(), params.clone()));
    if params.get("To").map(String::as_str) == Some(INVALID_TO) {
        return twilio_error(StatusCode::BAD_REQUEST, 21211, "Invalid 'To' Phone Number");
    }
    let (Some(twiml), Some(callback)) = (params.get("Twiml"), params.get("StatusCallback")) else {
        return twilio_error(StatusCode::BAD_REQUEST, 21205, "Url or Twiml is required");
    };
    // <Stream url="..."> with &amp; and friends undone.
    let Some(url) = twiml.split("<Stream url=\"").nth(1).and_then(|r| r.split('"').next()) else {
        return twilio_error(StatusCode::BAD_REQUEST, 12100, "Document parse failure");
    };
    let url = url.replace("&quot;", "\"").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&");
    let call_sid = format!("CA{}", uuid::Uuid::new_v4().simple());
    state.lock().unwrap().callbacks.insert(call_sid.clone(), callback.clone());
    tokio::spawn(run_call(state.clone(), call_sid.clone(), callback.clone(), url));
    (StatusCode::CREATED, Json(json!({"sid": call_sid, "status": "queued", "account_sid": ACCOUNT_SID}))).into_response()
}

async fn run_call(state: Arc<Mutex<Twilio>>, call_sid: String, callback: String, stream_url: String) {
    let ring = Duration::from_millis(state.lock().unwrap().ring_ms);
    status_callback(&state, &callback, &call_sid, "initiated", &[]).await;
    status_callback(&state, &callback, &call_sid, "ringing", &[]).await;
    tokio::time::sleep(ring).await;
    status_callback(&state, &callback, &call_sid, "in-progress", &[]).await;
    let phone = StreamPhone::connect(&stream_url, Kind::Twilio).await.expect("voxgate accepts the stream");
    state.lock().unwrap().phones.push(Arc::new(phone));
}

/// Posts a status callback signed the way Twilio signs it.
pub async fn status_callback(state: &Arc<Mutex<Twilio>>, url: &str, call_sid: &str, status: &str, extra: &[(&str, &str)]) {
    let mut params: BTreeMap<String, String> = [("CallSid", call_sid), ("AccountSid", ACCOUNT_SID), ("CallStatus", status)]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    params.insert("CallbackSource".into(), "call-progress-events".into());
    let signature = voxgate::voice::twilio::signature(AUTH_TOKEN, url, &params);
    let resp = reqwest::Client::new().post(url).header("X-Twilio-Signature", signature).form(&params).send().await;
    let code = resp.map(|r| r.status().as_u16()).unwrap_or(0);
    state.lock().unwrap().callback_answers.push(code);
}

async fn update_call(
    State(state): State<Arc<Mutex<Twilio>>>,
    Path((sid, call)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if !authorised(&headers) || sid != ACCOUNT_SID {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let call_sid = call.trim_end_matches(".json").to_owned();
    let params = form(&body);
    let (callback, phone) = {
        let mut s = state.lock().unwrap();
        s.requests.push((format!("update {call_sid}"), params.clone()));
        (s.callbacks.get(&call_sid).cloned(), s.phones.first().cloned())
    };
    let Some(callback) = callback else { return twilio_error(StatusCode::NOT_FOUND, 20404, "The requested resource was not found") };
    let status = params.get("Status").cloned().unwrap_or_default();
    let answer = json!({"sid": call_sid, "status": status});
    tokio::spawn(async move {
        if let Some(phone) = phone {
            phone.hang_up().await;
        }
        let final_status = if status == "canceled" { "canceled" } else { "completed" };
        status_callback(&state, &callback, &call_sid, final_status, &[("CallDuration", "3")]).await;
    });
    (StatusCode::OK, Json(answer)).into_response()
}
