//! Calls whose audio rides a CPaaS WebSocket media stream or a browser's
//! WebRTC connection: the signed URLs, the calls waiting for their provider
//! (or browser) to connect, and the leg that turns a stream's life into the
//! call events the manager knows.
//!
//! A stream URL is `/media/{provider}/{token}`; the token names the call,
//! the provider and an expiry, signed with the server's HMAC key, so only
//! the provider voxgate gave the URL to can open that call's stream (the
//! path form, because Twilio's `<Stream url>` takes no query string;
//! `?token=` works too). A stream connects once: a second connection for
//! the same call is refused. Waiting calls live in this process, so the
//! provider must reach the node that placed the call (DEPLOY: route
//! `/media/` by call, or run one node per public host name).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use hmac::Mac;
use tokio::sync::mpsc;
use voxgate_media::session::MediaHandle;
use voxgate_media::streams::protocol::Provider;
use voxgate_media::streams::{self, Attach, StreamConfig, StreamEvent};
use voxgate_media::webrtc::{self, Offer, WebRtcConfig};
use voxgate_sip::Call;

use crate::domain::CallId;
use crate::jobs::storage::Storage;
use crate::{Error, Result};

/// What the token signs first, so it can never pass for another signature.
const PURPOSE: &str = "media-stream";

/// A status report of the provider about a call (Twilio's status callback).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderStatus {
    /// queued, initiated, ringing, in-progress, answered, completed, busy,
    /// no-answer, canceled, failed.
    pub status: String,
    pub sip_code: Option<u16>,
}

/// How a waiting call's media arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A CPaaS's WebSocket media stream.
    Provider(Provider),
    /// A browser's WebRTC offer.
    WebRtc,
}

impl StreamKind {
    /// The call's `carrier`, and the name its token is signed for.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Provider(p) => p.as_str(),
            StreamKind::WebRtc => "webrtc",
        }
    }
}

/// Where the connecting side is handed over.
enum Door {
    Stream(Attach),
    WebRtc(Offer),
}

struct Waiting {
    kind: StreamKind,
    door: Option<Door>,
    /// Where the provider's status callbacks for this call go, and the
    /// secret that signs them (Twilio's auth token).
    status: Option<(mpsc::Sender<ProviderStatus>, String)>,
}

#[derive(Clone)]
pub struct Streams {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    /// `http(s)://host[:port]` the providers reach this node at.
    public_base: String,
    config: StreamConfig,
    webrtc: WebRtcConfig,
    waiting: Mutex<HashMap<CallId, Waiting>>,
}

impl Streams {
    pub fn new(storage: Storage, public_base: &str, config: StreamConfig, webrtc: WebRtcConfig) -> Streams {
        let inner = Inner {
            storage,
            public_base: public_base.trim_end_matches('/').to_owned(),
            config,
            webrtc,
            waiting: Mutex::new(HashMap::new()),
        };
        Streams { inner: Arc::new(inner) }
    }

    /// How long a stream URL stays valid (the provider must connect by then).
    pub fn connect_timeout(&self) -> Duration {
        self.inner.config.connect_timeout
    }

    /// The base URL the providers call back (`https://...`).
    pub fn public_base(&self) -> &str {
        &self.inner.public_base
    }

    fn mac(&self, call: CallId, kind: StreamKind, expires: i64) -> hmac::Hmac<sha2::Sha256> {
        self.inner.storage.mac_of(&[PURPOSE, &call.to_string(), kind.as_str(), &expires.to_string()])
    }

    /// The URL where `call`'s media connects, valid until `expires` (Unix
    /// seconds): `wss://.../media/{provider}/{token}` for a stream,
    /// `https://.../webrtc/{token}` (the SDP offer is posted there) for a browser.
    pub fn url(&self, call: CallId, kind: StreamKind, expires: i64) -> String {
        let base = &self.inner.public_base;
        let token = format!("{call}.{expires}.{}", B64URL.encode(self.mac(call, kind, expires).finalize().into_bytes()));
        match kind {
            StreamKind::Provider(provider) => {
                let ws = base
                    .strip_prefix("https://")
                    .map(|h| format!("wss://{h}"))
                    .or_else(|| base.strip_prefix("http://").map(|h| format!("ws://{h}")));
                format!("{}/media/{provider}/{token}", ws.unwrap_or_else(|| base.clone()))
            }
            StreamKind::WebRtc => format!("{base}/webrtc/{token}"),
        }
    }

    /// Starts `call`'s media leg and waits for its provider (or browser).
    pub fn open(&self, call: CallId, kind: StreamKind) -> (MediaHandle, mpsc::Receiver<StreamEvent>) {
        let (media, door, life) = match kind {
            StreamKind::Provider(provider) => {
                let (media, attach, life) = streams::start(provider, self.inner.config.clone());
                (media, Door::Stream(attach), life)
            }
            StreamKind::WebRtc => {
                let (media, offer, life) = webrtc::start(self.inner.webrtc.clone());
                (media, Door::WebRtc(offer), life)
            }
        };
        if let Ok(mut w) = self.inner.waiting.lock() {
            w.insert(call, Waiting { kind, door: Some(door), status: None });
        }
        (media, life)
    }

    /// Routes the provider's status callbacks for `call` to `tx`; `secret`
    /// checks their signature.
    pub fn expect_status(&self, call: CallId, tx: mpsc::Sender<ProviderStatus>, secret: String) {
        if let Ok(mut w) = self.inner.waiting.lock() {
            if let Some(entry) = w.get_mut(&call) {
                entry.status = Some((tx, secret));
            }
        }
    }

    /// Forgets `call` (its leg ended).
    pub fn close(&self, call: CallId) {
        if let Ok(mut w) = self.inner.waiting.lock() {
            w.remove(&call);
        }
    }

    /// Checks a stream token and hands over the call's session: 401 for a
    /// bad or expired token, 404 when no call here waits for it, 409 when
    /// its stream is already connected.
    pub fn connect(&self, provider: Provider, token: &str, now_secs: i64) -> Result<(CallId, Attach)> {
        match self.take(StreamKind::Provider(provider), token, now_secs)? {
            (call, Door::Stream(a)) if !a.is_closed() => Ok((call, a)),
            _ => Err(over()),
        }
    }

    /// Like [`connect`](Self::connect), for a browser's WebRTC offer.
    pub fn offer(&self, token: &str, now_secs: i64) -> Result<(CallId, Offer)> {
        match self.take(StreamKind::WebRtc, token, now_secs)? {
            (call, Door::WebRtc(o)) if !o.is_closed() => Ok((call, o)),
            _ => Err(over()),
        }
    }

    fn take(&self, kind: StreamKind, token: &str, now_secs: i64) -> Result<(CallId, Door)> {
        let call = self.verify(kind, token, now_secs)?;
        let mut w = self.inner.waiting.lock().map_err(|_| Error::Unavailable("stream registry unavailable".into()))?;
        let entry = w.get_mut(&call).filter(|e| e.kind == kind).ok_or_else(|| Error::not_found("call waiting for its media on this node"))?;
        entry.door.take().map(|d| (call, d)).ok_or_else(over)
    }

    fn verify(&self, kind: StreamKind, token: &str, now_secs: i64) -> Result<CallId> {
        const BAD: &str = "invalid or expired media stream token";
        let mut parts = token.splitn(3, '.');
        let (Some(call), Some(expires), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::Unauthorized(BAD));
        };
        let call: CallId = call.parse().map_err(|_| Error::Unauthorized(BAD))?;
        let expires: i64 = expires.parse().map_err(|_| Error::Unauthorized(BAD))?;
        let sig = B64URL.decode(sig).map_err(|_| Error::Unauthorized(BAD))?;
        // Constant-time comparison.
        self.mac(call, kind, expires).verify_slice(&sig).map_err(|_| Error::Unauthorized(BAD))?;
        if expires < now_secs {
            return Err(Error::Unauthorized(BAD));
        }
        Ok(call)
    }

    /// Delivers a status callback for `call` once `check` accepts its
    /// signature with the call's secret: 404 for a call not waiting here,
    /// 403 for a bad signature.
    pub fn status(&self, call: CallId, check: impl FnOnce(&str) -> bool, status: ProviderStatus) -> Result<()> {
        let tx = {
            let w = self.inner.waiting.lock().map_err(|_| Error::Unavailable("stream registry unavailable".into()))?;
            let (tx, secret) = w.get(&call).and_then(|e| e.status.as_ref()).ok_or_else(|| Error::not_found("call"))?;
            if !check(secret) {
                return Err(Error::Forbidden("invalid request signature".into()));
            }
            tx.clone()
        };
        // A call that ended meanwhile no longer listens: nothing to do.
        let _ = tx.try_send(status);
        Ok(())
    }
}

fn over() -> Error {
    Error::Conflict("this call's media is already connected or over".into())
}

/// A call the provider's stream (or a browser) brings in, with no REST
/// leg: answered when the media starts, over when it stops. Hang-up closes
/// the media.
pub fn answer(streams: &Streams, id: CallId, media: MediaHandle, life: mpsc::Receiver<StreamEvent>) -> Call {
    let streams = streams.clone();
    voxgate_sip::stream_call(String::new(), media, life, move || streams.close(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::storage::StorageConfig;

    fn streams() -> (Streams, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig { root: dir.path().to_path_buf(), ..Default::default() };
        let storage = Storage::open(&config, "http://127.0.0.1:1").unwrap();
        (Streams::new(storage, "https://voice.example.com/", StreamConfig::default(), WebRtcConfig::default()), dir)
    }

    fn token_of(url: &str) -> &str {
        url.rsplit('/').next().unwrap()
    }

    #[tokio::test]
    async fn a_token_opens_its_own_call_once_and_nothing_else() {
        let (s, _dir) = streams();
        let id = CallId::new();
        let url = s.url(id, StreamKind::Provider(Provider::Twilio), 1_000);
        assert!(url.starts_with("wss://voice.example.com/media/twilio/"), "{url}");
        let (_media, _life) = s.open(id, StreamKind::Provider(Provider::Twilio));
        let token = token_of(&url);
        // Another provider, a changed character, an expired token: 401.
        assert!(matches!(s.connect(Provider::Telnyx, token, 900), Err(Error::Unauthorized(_))));
        let mut tampered = token.to_owned();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(matches!(s.connect(Provider::Twilio, &tampered, 900), Err(Error::Unauthorized(_))));
        assert!(matches!(s.connect(Provider::Twilio, token, 1_001), Err(Error::Unauthorized(_))));
        assert!(matches!(s.connect(Provider::Twilio, "garbage", 900), Err(Error::Unauthorized(_))));
        let (got, _attach) = s.connect(Provider::Twilio, token, 900).expect("valid");
        assert_eq!(got, id);
        assert!(matches!(s.connect(Provider::Twilio, token, 900), Err(Error::Conflict(_))));
        // A valid token for a call this node does not run.
        let other = s.url(CallId::new(), StreamKind::Provider(Provider::Twilio), 1_000);
        // A stream token does not open a WebRTC call.
        assert!(matches!(s.offer(token, 900), Err(Error::Unauthorized(_))));
        assert!(matches!(s.connect(Provider::Twilio, token_of(&other), 900), Err(Error::NotFound(_))));
    }

}
