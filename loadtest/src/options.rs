//! The command line: what to call, how many, how fast, and what the far end
//! says. Parsed once into [`Options`], checked by [`Options::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use url::Url;

/// Plays the far end of many concurrent voxgate calls and reports what a
/// caller hears: post-dial delay, greeting latency, voice-to-voice latency
/// per turn, barge-in stop time, RTP loss, jitter and reordering.
///
/// With `--transport sip` (the default) voxgate places the calls (through
/// its API, with the key given here) to numbers on a SIP trunk that must
/// point at this tool's `--sip-bind` address; this tool answers them,
/// speaks and listens. With `--transport twilio` (or telnyx, plivo,
/// vonage) this tool plays the CPaaS instead: it asks the API for a stream
/// call and connects to its `/media/...` WebSocket as the provider would.
#[derive(Debug, Clone, Parser)]
#[command(name = "voxgate-loadtest", version)]
pub struct Options {
    /// voxgate's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub server: Url,

    /// API key with the `agents` and `calls` scopes (or `*`). Not read from
    /// a `VOXGATE_*` variable: voxgate takes those as its own settings.
    #[arg(long, env = "LOADTEST_API_KEY", hide_env_values = true)]
    pub api_key: String,

    /// `agent`: each call talks to a voice agent (the full pipeline).
    /// `media`: voxgate runs with `calls.echo = true` and sends the caller's
    /// audio back; measures the media engine alone.
    #[arg(long, value_enum, default_value_t = Mode::Agent)]
    pub mode: Mode,

    /// How the calls reach voxgate: over SIP, or as a CPaaS's WebSocket
    /// media stream in its protocol.
    #[arg(long, value_enum, default_value_t = Transport::Sip)]
    pub transport: Transport,

    /// Calls to place in all.
    #[arg(long, default_value_t = 10)]
    pub calls: u32,

    /// Calls placed per second.
    #[arg(long, default_value_t = 5.0)]
    pub cps: f64,

    /// Calls up at once at most (a new call waits for one to end).
    #[arg(long, default_value_t = 10)]
    pub concurrency: u32,

    /// The whole run stops after this long: no new calls, every call still
    /// up is hung up (BYE), the report is written.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// An existing agent to call with; without it one is created.
    #[arg(long)]
    pub agent: Option<String>,

    /// The created agent's greeting.
    #[arg(long, default_value = "Hello, thanks for calling Bright Dental. How can I help?")]
    pub greeting: String,

    /// The created agent's system prompt.
    #[arg(
        long,
        default_value = "You are the receptionist of Bright Dental. The office is open Monday to Friday from 9 AM to 5 PM. Answer in one short sentence."
    )]
    pub system_prompt: String,

    /// The created agent's TTS model.
    #[arg(long, default_value = "piper")]
    pub tts_model: String,

    /// The created agent's LLM.
    #[arg(long, default_value = "smollm2-135m")]
    pub llm_model: String,

    /// What the caller says, one turn each, in order (repeat the option).
    /// Synthesized once, in `--caller-voice`.
    #[arg(long = "utterance", default_values_t = [
        "What are your opening hours?".to_string(),
        "Can I book an appointment for Tuesday?".to_string(),
    ])]
    pub utterances: Vec<String>,

    /// The caller's voice. `espeak`: espeak-ng (the same audio every run,
    /// but robotic: Whisper tiny.en mishears some of it over the phone, so
    /// the agent may answer another question). `piper`: the Piper voice
    /// of voxgate's models (`--models-dir`), which Whisper hears far
    /// better; it varies a little from run to run.
    #[arg(long, value_enum, default_value_t = CallerVoice::Espeak)]
    pub caller_voice: CallerVoice,

    /// voxgate's models directory (`scripts/setup` fills it), for
    /// `--caller-voice piper`.
    #[arg(long, default_value = "models")]
    pub models_dir: PathBuf,

    /// Interrupt each agent answer this long after it starts (with the next
    /// utterance) and measure how fast the agent stops talking.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub barge_in_after: Option<Duration>,

    /// Silence after which the agent counts as done talking.
    #[arg(long, default_value = "800ms", value_parser = humantime::parse_duration)]
    pub quiet: Duration,

    /// How long to wait for the greeting or an answer before giving up on it.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub reply_timeout: Duration,

    /// Media mode: how long each call stays up (a 200 ms tone each second).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// Rings (180) this long before answering.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub ring: Duration,

    /// Where this tool's SIP user agent listens (voxgate's trunk points here).
    #[arg(long, default_value = "127.0.0.1:5070")]
    pub sip_bind: SocketAddr,

    /// RTP port range of this tool, e.g. 40000-59999 (two ports per call).
    #[arg(long, default_value = "40000-59999", value_parser = parse_port_range)]
    pub rtp_ports: (u16, u16),

    /// voxgate trunk to call through (its first trunk by default).
    #[arg(long)]
    pub trunk: Option<String>,

    /// Numbers called are this prefix plus four digits, one per call up at once.
    #[arg(long, default_value = "+1415555")]
    pub number_prefix: String,

    /// Process id of the voxgate server, to sample its CPU and memory.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Directory for the report (JSON, Markdown, SVG plots).
    #[arg(long, default_value = "loadtest-report")]
    pub out: PathBuf,

    /// Allow a server or SIP address outside loopback.
    #[arg(long)]
    pub allow_remote: bool,

    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Agent,
    Media,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerVoice {
    Espeak,
    Piper,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Sip,
    Twilio,
    Telnyx,
    Plivo,
    Vonage,
}

impl Transport {
    /// The media stream protocol, for the stream transports.
    pub fn provider(self) -> Option<voxgate_media::streams::protocol::Provider> {
        use voxgate_media::streams::protocol::Provider;
        match self {
            Transport::Sip => None,
            Transport::Twilio => Some(Provider::Twilio),
            Transport::Telnyx => Some(Provider::Telnyx),
            Transport::Plivo => Some(Provider::Plivo),
            Transport::Vonage => Some(Provider::Vonage),
        }
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX, e.g. 40000-59999")?;
    let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| "MIN is not a port")?, b.trim().parse().map_err(|_| "MAX is not a port")?);
    if a >= b || b - a < 4 {
        return Err("MAX must be at least MIN + 4".into());
    }
    Ok((a, b))
}

impl Options {
    /// Refuses what would make the run meaningless or reach beyond this
    /// machine without `--allow-remote`.
    pub fn validate(&self) -> Result<(), String> {
        if self.calls == 0 || self.concurrency == 0 {
            return Err("--calls and --concurrency must be at least 1".into());
        }
        if !(self.cps.is_finite() && self.cps > 0.0 && self.cps <= 1000.0) {
            return Err("--cps must be above 0 and at most 1000".into());
        }
        if self.concurrency > 10_000 {
            return Err("--concurrency is at most 10000 (four digits of numbers)".into());
        }
        let digits = self.number_prefix.strip_prefix('+').unwrap_or_default();
        if digits.is_empty() || digits.len() > 11 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err("--number-prefix must be '+' and 1 to 11 digits".into());
        }
        if self.mode == Mode::Agent && self.utterances.iter().all(|u| u.trim().is_empty()) {
            return Err("agent mode needs at least one --utterance".into());
        }
        let ports = u32::from(self.rtp_ports.1 - self.rtp_ports.0) / 2;
        if ports < self.concurrency {
            return Err(format!("--rtp-ports holds {ports} calls, fewer than --concurrency {}", self.concurrency));
        }
        if !self.allow_remote {
            if !matches!(self.server.scheme(), "http" | "https") {
                return Err("--server must be an http(s) URL".into());
            }
            let local_server = match self.server.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if !local_server {
                return Err(format!("--server {} is not on this machine; pass --allow-remote to load a remote server", self.server));
            }
            if !self.sip_bind.ip().is_loopback() {
                return Err(format!("--sip-bind {} is not loopback; pass --allow-remote", self.sip_bind));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `args` after the program name and an API key, parsed.
    pub(crate) fn parse(args: &[&str]) -> Options {
        Options::try_parse_from([&["voxgate-loadtest", "--api-key", "k"], args].concat()).expect("parses")
    }

    #[test]
    fn defaults_are_a_valid_local_run() {
        let o = parse(&[]);
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.utterances.len(), 2);
        assert_eq!(o.ring, Duration::from_millis(500));
        assert_eq!(o.transport, Transport::Sip);
        assert_eq!(o.caller_voice, CallerVoice::Espeak);
        assert_eq!(parse(&["--caller-voice", "piper"]).caller_voice, CallerVoice::Piper);
        assert!(Options::try_parse_from(["x", "--api-key", "k", "--caller-voice", "kokoro"]).is_err());
        assert_eq!(parse(&["--transport", "twilio"]).transport.provider().map(|p| p.as_str()), Some("twilio"));
    }

    #[test]
    fn durations_and_port_ranges_parse() {
        let o = parse(&["--duration", "90s", "--rtp-ports", "30000-30100", "--barge-in-after", "700ms", "--concurrency", "50"]);
        assert_eq!(o.duration, Duration::from_secs(90));
        assert_eq!(o.rtp_ports, (30000, 30100));
        assert_eq!(o.barge_in_after, Some(Duration::from_millis(700)));
        assert!(Options::try_parse_from(["x", "--api-key", "k", "--rtp-ports", "5-2"]).is_err());
    }

    #[test]
    fn remote_targets_need_allow_remote() {
        let o = parse(&["--server", "http://voxgate.example.com"]);
        assert!(o.validate().unwrap_err().contains("--allow-remote"));
        let o = parse(&["--server", "http://10.0.0.5:8080", "--allow-remote"]);
        assert_eq!(o.validate(), Ok(()));
        let o = parse(&["--sip-bind", "0.0.0.0:5070"]);
        assert!(o.validate().unwrap_err().contains("--sip-bind"));
        assert_eq!(parse(&["--server", "http://localhost:9000"]).validate(), Ok(()));
    }

    #[test]
    fn nonsense_is_refused() {
        assert!(parse(&["--calls", "0"]).validate().is_err());
        assert!(parse(&["--cps", "0"]).validate().is_err());
        assert!(parse(&["--number-prefix", "1415"]).validate().is_err());
        assert!(parse(&["--concurrency", "20000", "--rtp-ports", "10000-60000"]).validate().is_err());
        assert!(parse(&["--concurrency", "100", "--rtp-ports", "40000-40100"]).validate().unwrap_err().contains("holds 50"));
    }
}
