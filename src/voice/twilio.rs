//! Outbound calls through Twilio: the call is placed with Twilio's REST
//! API ("create a Call") with TwiML that connects its audio to our media
//! stream (`<Connect><Stream url="wss://.../media/twilio/{token}">`);
//! Twilio's status callbacks (checked against `X-Twilio-Signature`) tell
//! the call's progress, and the stream carries the conversation.
//!
//! Hang-up updates the call through the same API (`Status=canceled` while
//! it rings, `completed` once it is up). The account's auth token is a
//! secret: it signs requests and checks callbacks, and is never logged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use tokio::sync::mpsc;
use voxgate_media::session::MediaControl;
use voxgate_media::streams::protocol::Provider;
use voxgate_media::streams::{StreamEnd, StreamEvent};
use voxgate_sip::{stream_outcome, Call, CallEvent, CallStatus, EndReason, Outcome};

use super::streams::{ProviderStatus, StreamKind, Streams};
use crate::clock::now_ms;
use crate::domain::CallId;

/// The values of a status callback's `CallStatus`.
pub const STATUSES: [&str; 10] =
    ["queued", "initiated", "ringing", "in-progress", "answered", "completed", "busy", "no-answer", "canceled", "failed"];

/// How long a REST request to the provider may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// After our hang-up, the provider's final status is awaited this long.
const HANGUP_SETTLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CarrierKind {
    Twilio,
}

/// A CPaaS account that places calls and bridges their audio to a media
/// stream (`[[carriers]]`). Its name is a trunk name for the calls API.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarrierConfig {
    pub name: String,
    pub kind: CarrierKind,
    pub account_sid: String,
    /// Signs our requests and the provider's callbacks. Secret.
    pub auth_token: String,
    /// The caller id, E.164: a number of the account.
    pub from: String,
    /// The REST API's base (a local double in tests).
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// Seconds the callee's phone rings before `no-answer`.
    #[serde(default = "default_ring_secs")]
    pub ring_timeout_secs: u64,
}

impl std::fmt::Debug for CarrierConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarrierConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"<redacted>")
            .field("from", &self.from)
            .field("api_base", &self.api_base)
            .finish()
    }
}

fn default_api_base() -> String {
    "https://api.twilio.com".into()
}

fn default_ring_secs() -> u64 {
    30
}

/// Twilio's request signature: Base64(HMAC-SHA1(auth token, URL followed
/// by every POST parameter's name and value, sorted by name)).
pub fn signature(auth_token: &str, url: &str, params: &BTreeMap<String, String>) -> String {
    B64.encode(mac(auth_token, url, params).finalize().into_bytes())
}

/// Checks a callback's `X-Twilio-Signature` in constant time.
pub fn signature_valid(auth_token: &str, url: &str, params: &BTreeMap<String, String>, presented: &str) -> bool {
    let Ok(presented) = B64.decode(presented) else { return false };
    mac(auth_token, url, params).verify_slice(&presented).is_ok()
}

fn mac(auth_token: &str, url: &str, params: &BTreeMap<String, String>) -> Hmac<Sha1> {
    let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    for (k, v) in params {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    mac
}

/// The path Twilio posts `call`'s status to.
pub fn status_path(call: CallId) -> String {
    format!("/carriers/twilio/{call}/status")
}

#[derive(Deserialize)]
struct CreatedCall {
    sid: String,
}

#[derive(Deserialize)]
struct ApiError {
    code: Option<u64>,
    message: Option<String>,
}

/// Places `id`'s call to `to` through `carrier`; on success the call's
/// leg runs in a task of its own. The error is the provider's refusal.
pub async fn dial(streams: &Streams, http: &reqwest::Client, carrier: &CarrierConfig, id: CallId, to: &str) -> Result<Call, String> {
    let (media, life) = streams.open(id, StreamKind::Provider(Provider::Twilio));
    let (status_tx, status_rx) = mpsc::channel(16);
    streams.expect_status(id, status_tx, carrier.auth_token.clone());
    let expires = now_ms() / 1000 + streams.connect_timeout().as_secs() as i64 + carrier.ring_timeout_secs as i64;
    let stream_url = streams.url(id, StreamKind::Provider(Provider::Twilio), expires);
    let twiml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect><Stream url=\"{}\">\
         <Parameter name=\"voxgateCallId\" value=\"{id}\"/></Stream></Connect></Response>",
        xml_escape(&stream_url)
    );
    let callback = format!("{}{}", streams.public_base(), status_path(id));
    let timeout = carrier.ring_timeout_secs.to_string();
    let form: Vec<(&str, &str)> = vec![
        ("To", to),
        ("From", &carrier.from),
        ("Twiml", &twiml),
        ("Timeout", &timeout),
        ("StatusCallback", &callback),
        ("StatusCallbackMethod", "POST"),
        ("StatusCallbackEvent", "initiated"),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "answered"),
        ("StatusCallbackEvent", "completed"),
    ];
    let url = format!("{}/2010-04-01/Accounts/{}/Calls.json", carrier.api_base.trim_end_matches('/'), carrier.account_sid);
    let sent = http
        .post(&url)
        .basic_auth(&carrier.account_sid, Some(&carrier.auth_token))
        .form(&form)
        .timeout(API_TIMEOUT)
        .send()
        .await;
    let created = match sent {
        Ok(r) if r.status().is_success() => r.json::<CreatedCall>().await.map_err(|e| format!("twilio: unreadable answer: {e}")),
        Ok(r) => {
            let status = r.status();
            let e = r.json::<ApiError>().await.ok();
            Err(format!(
                "twilio refused the call ({status}{}): {}",
                e.as_ref().and_then(|e| e.code).map(|c| format!(", code {c}")).unwrap_or_default(),
                e.and_then(|e| e.message).unwrap_or_else(|| "no message".into())
            ))
        }
        Err(e) => Err(format!("twilio API unreachable: {}", e.without_url())),
    };
    let sid = match created {
        Ok(c) => c.sid,
        Err(e) => {
            streams.close(id);
            return Err(e);
        }
    };
    let (events_tx, events_rx) = mpsc::channel(8);
    let (hangup_tx, hangup_rx) = mpsc::channel(1);
    let leg = Leg {
        http: http.clone(),
        carrier: carrier.clone(),
        sid: sid.clone(),
        control: media.control.clone(),
        events: events_tx,
    };
    let streams = streams.clone();
    tokio::spawn(async move {
        let outcome = leg.follow(life, status_rx, hangup_rx).await;
        streams.close(id);
        let _ = leg.events.send(CallEvent::Ended(outcome)).await;
    });
    Ok(Call::new(sid, events_rx, media, hangup_tx))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;")
}

struct Leg {
    http: reqwest::Client,
    carrier: CarrierConfig,
    sid: String,
    control: MediaControl,
    events: mpsc::Sender<CallEvent>,
}

impl Leg {
    async fn follow(
        &self,
        mut life: mpsc::Receiver<StreamEvent>,
        mut status: mpsc::Receiver<ProviderStatus>,
        mut hangup: mpsc::Receiver<()>,
    ) -> Outcome {
        let mut answered = false;
        let mut rang = false;
        let mut hung_up = false;
        let settle = tokio::time::sleep(Duration::MAX);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                ev = life.recv() => match ev {
                    Some(StreamEvent::Started) => {
                        answered = true;
                        let _ = self.events.send(CallEvent::Answered { at: Instant::now() }).await;
                    }
                    Some(StreamEvent::Ended(end)) => {
                        // A stream that failed while the call is up leaves the
                        // callee on a silent line: end the call too.
                        if !hung_up && !matches!(end, StreamEnd::Stopped) {
                            self.update(if answered { "completed" } else { "canceled" }).await;
                        }
                        return stream_outcome(&end, answered, hung_up);
                    }
                    None => return stream_outcome(&StreamEnd::Closed, answered, true),
                },
                Some(s) = status.recv() => {
                    tracing::debug!(status = %s.status, "twilio status callback");
                    match s.status.as_str() {
                        "ringing" if !rang => {
                            rang = true;
                            let _ = self.events.send(CallEvent::Ringing { code: 180, at: Instant::now() }).await;
                        }
                        "queued" | "initiated" | "ringing" | "in-progress" | "answered" => {}
                        final_status => {
                            self.control.close().await;
                            return final_outcome(final_status, s.sip_code, answered, hung_up);
                        }
                    }
                }
                Some(()) = hangup.recv(), if !hung_up => {
                    hung_up = true;
                    self.update(if answered { "completed" } else { "canceled" }).await;
                    self.control.close().await;
                    settle.as_mut().reset(tokio::time::Instant::now() + HANGUP_SETTLE);
                }
                _ = &mut settle => return stream_outcome(&StreamEnd::Closed, answered, true),
            }
        }
    }

    /// Ends the call at the provider (`canceled` while ringing, `completed` once up).
    async fn update(&self, to: &str) {
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Calls/{}.json",
            self.carrier.api_base.trim_end_matches('/'),
            self.carrier.account_sid,
            self.sid
        );
        let sent = self
            .http
            .post(&url)
            .basic_auth(&self.carrier.account_sid, Some(&self.carrier.auth_token))
            .form(&[("Status", to)])
            .timeout(API_TIMEOUT)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => tracing::info!(status = to, "twilio call updated"),
            Ok(r) => tracing::warn!(status = to, http_status = %r.status(), "twilio refused the call update"),
            Err(e) => tracing::warn!(status = to, error = %e.without_url(), "twilio API unreachable for the call update"),
        }
    }
}

/// The outcome a final Twilio status means.
fn final_outcome(status: &str, sip_code: Option<u16>, answered: bool, hung_up: bool) -> Outcome {
    let (status, reason) = match status {
        "completed" if hung_up => (CallStatus::Completed, EndReason::LocalHangup),
        "completed" if answered => (CallStatus::Completed, EndReason::RemoteHangup),
        // Answered by Twilio but the stream never started: nothing was said.
        "completed" => (CallStatus::Failed, EndReason::NotConnected),
        "busy" => (CallStatus::Busy, EndReason::Rejected),
        "no-answer" => (CallStatus::NoAnswer, EndReason::RingTimeout),
        "canceled" => (CallStatus::Canceled, EndReason::Canceled),
        _ => (CallStatus::Failed, EndReason::Rejected),
    };
    Outcome { status, reason, sip_code, sip_reason: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_twilios_documented_example() {
        // The example of Twilio's signature validation snippets (api-snippets).
        let params: BTreeMap<String, String> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let sig = signature("12345", url, &params);
        assert_eq!(sig, "GvWf1cFY/Q7PnoempGyD5oXAezc=");
        assert!(signature_valid("12345", url, &params, &sig));
        assert!(!signature_valid("12346", url, &params, &sig));
        assert!(!signature_valid("12345", "https://mycompany.com/other", &params, &sig));
        assert!(!signature_valid("12345", url, &params, "not base64!"));
    }

    #[test]
    fn final_statuses_map_to_call_outcomes() {
        assert_eq!(final_outcome("busy", Some(486), false, false).status, CallStatus::Busy);
        assert_eq!(final_outcome("no-answer", None, false, false).reason, EndReason::RingTimeout);
        assert_eq!(final_outcome("completed", None, true, false).reason, EndReason::RemoteHangup);
        assert_eq!(final_outcome("completed", None, true, true).reason, EndReason::LocalHangup);
        assert_eq!(final_outcome("failed", Some(404), false, false).sip_code, Some(404));
    }

    #[test]
    fn the_auth_token_never_shows_in_debug_output() {
        let c = CarrierConfig {
            name: "tw".into(),
            kind: CarrierKind::Twilio,
            account_sid: "AC1".into(),
            auth_token: "very-secret".into(),
            from: "+14155550100".into(),
            api_base: default_api_base(),
            ring_timeout_secs: 30,
        };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
