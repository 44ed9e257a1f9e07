//! SIP settings: where the user agent listens, its RTP port range, timers,
//! the trunks it calls out through, and the numbers it answers.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use voxgate_media::session::OpusComplexity;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// UDP address for SIP signalling.
    pub bind: SocketAddr,
    /// Address to put in Contact and SDP when it differs from `bind` (NAT).
    pub external_ip: Option<IpAddr>,
    /// RTP ports are taken in even/odd pairs from this range.
    pub rtp_port_min: u16,
    pub rtp_port_max: u16,
    /// An unanswered call is CANCELled after this long (`no-answer`).
    pub ring_timeout_secs: u64,
    /// No RTP for this long ends an answered call (`media-timeout`).
    pub media_timeout_secs: u64,
    /// Numbers (user parts) inbound INVITEs may call; others get 404.
    /// `"*"` answers any number.
    pub inbound_numbers: Vec<String>,
    /// Inbound calls ring (180) this long before they are answered.
    pub inbound_ring_ms: u64,
    /// Opus encoder complexity, 0-10, for legs that negotiate Opus (and
    /// WebRTC calls): 1 by default (see `voxgate_media::session::OpusComplexity`);
    /// a value out of range is refused when the configuration is read.
    pub opus_complexity: OpusComplexity,
    pub trunks: Vec<Trunk>,
}

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 5060)),
            external_ip: None,
            rtp_port_min: 20000,
            rtp_port_max: 30000,
            ring_timeout_secs: 30,
            media_timeout_secs: 30,
            inbound_numbers: Vec::new(),
            inbound_ring_ms: 0,
            opus_complexity: OpusComplexity::default(),
            trunks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Udp,
    Tcp,
}

/// A SIP trunk (a carrier or a PBX) that places our calls on the PSTN.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trunk {
    pub name: String,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub transport: Transport,
    /// Digest credentials, if the trunk challenges.
    pub username: Option<String>,
    pub password: Option<String>,
    /// User part of From (the caller id), e.g. "+14155550100".
    pub from_user: Option<String>,
    /// Send requests here instead of to `host` (an outbound proxy).
    pub outbound_proxy: Option<SocketAddr>,
}

fn default_port() -> u16 {
    5060
}
