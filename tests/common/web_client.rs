//! A browser's side of a web call without the browser: a WebRTC peer
//! (webrtc-rs) that offers Opus, posts its offer WHIP-style to the call's
//! URL, sends the caller's audio every 20 ms (silence when quiet) and
//! records what the agent says (8 kHz, on the same time line as the phone
//! doubles of the other tests).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::interceptor::registry::Registry;
use webrtc::media::Sample;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;
use webrtc::track::track_local::TrackLocal;

use super::far_end::speech_end;

#[derive(Default)]
struct State {
    /// What the agent said, 8 kHz.
    received: Vec<i16>,
    /// 16 kHz caller audio to send.
    to_send: VecDeque<i16>,
}

pub struct WebClient {
    pub pc: Arc<RTCPeerConnection>,
    state: Arc<Mutex<State>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn opus() -> RTCRtpCodecCapability {
    RTCRtpCodecCapability { mime_type: MIME_TYPE_OPUS.to_owned(), clock_rate: 48_000, channels: 2, sdp_fmtp_line: "minptime=10;useinbandfec=1".into(), rtcp_feedback: vec![] }
}

impl WebClient {
    /// Offers to `url`; the error is the HTTP status and body of a refusal.
    pub async fn call(url: &str) -> Result<WebClient, (u16, String)> {
        voxgate_media::webrtc::install_crypto();
        let mut media = MediaEngine::default();
        media.register_default_codecs().unwrap();
        let registry = register_default_interceptors(Registry::new(), &mut media).unwrap();
        let mut settings = SettingEngine::default();
        settings.set_include_loopback_candidate(true);
        settings.set_ip_filter(Box::new(|ip| ip.is_loopback()));
        let api = APIBuilder::new().with_media_engine(media).with_interceptor_registry(registry).with_setting_engine(settings).build();
        let pc = Arc::new(api.new_peer_connection(RTCConfiguration::default()).await.unwrap());
        let track = Arc::new(TrackLocalStaticSample::new(opus(), "mic".into(), "browser".into()));
        pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal + Send + Sync>).await.unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        pc.on_track(Box::new(move |remote, _, _| {
            let st = st.clone();
            Box::pin(async move {
                tokio::spawn(async move {
                    let mut decoder = opus::Decoder::new(16_000, opus::Channels::Mono).unwrap();
                    let mut pcm = vec![0i16; 1920];
                    while let Ok((packet, _)) = remote.read_rtp().await {
                        let n = decoder.decode(&packet.payload, &mut pcm, false).unwrap_or(0);
                        st.lock().unwrap().received.extend(pcm[..n].chunks(2).map(|c| c[0]));
                    }
                });
            })
        }));
        let offer = pc.create_offer(None).await.unwrap();
        let mut gathered = pc.gathering_complete_promise().await;
        pc.set_local_description(offer).await.unwrap();
        let _ = gathered.recv().await;
        let sdp = pc.local_description().await.unwrap().sdp;
        let resp = reqwest::Client::new().post(url).header("content-type", "application/sdp").body(sdp).send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        if status != 201 {
            let _ = pc.close().await;
            return Err((status, body));
        }
        pc.set_remote_description(RTCSessionDescription::answer(body).unwrap()).await.unwrap();
        let st = state.clone();
        let sender = tokio::spawn(async move {
            let mut encoder = opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut out = vec![0u8; 400];
            loop {
                tick.tick().await;
                let frame: Vec<i16> = {
                    let mut s = st.lock().unwrap();
                    let n = s.to_send.len().min(320);
                    let mut f: Vec<i16> = s.to_send.drain(..n).collect();
                    f.resize(320, 0);
                    f
                };
                let n = encoder.encode(&frame, &mut out).unwrap();
                let sample = Sample { data: Bytes::copy_from_slice(&out[..n]), duration: Duration::from_millis(20), ..Default::default() };
                if track.write_sample(&sample).await.is_err() {
                    break;
                }
            }
        });
        Ok(WebClient { pc, state, tasks: vec![sender] })
    }

    pub fn say(&self, pcm16k: &[i16]) {
        self.state.lock().unwrap().to_send.extend(pcm16k.iter().copied());
    }

    pub fn speaking(&self) -> bool {
        !self.state.lock().unwrap().to_send.is_empty()
    }

    pub fn received_len(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    pub fn received_16k(&self, from: usize, to: usize) -> Vec<f32> {
        let s = self.state.lock().unwrap();
        super::far_end::to_16k(&s.received[from.min(s.received.len())..to.min(s.received.len())])
    }

    pub async fn wait_for_speech_then_silence(&self, from: usize, quiet: Duration, within: Duration) -> Option<usize> {
        super::voice::poll(within, || speech_end(&self.state.lock().unwrap().received, from, quiet)).await
    }

    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

impl Drop for WebClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
