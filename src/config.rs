//! Process configuration: defaults, then `voxgate.toml`, then environment.
//!
//! Environment variables are `VOXGATE_<FIELD>` with `__` between nested
//! fields (`VOXGATE_RATE_LIMITS__READS__REQUESTS=100`), plus the conventional
//! `DATABASE_URL`. The config is read once in `main` and carried in `AppState`.

use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use voxgate_agents::llm::MAX_REPLY_TOKENS;
use voxgate_agents::{EnginesConfig, TurnConfig};
use voxgate_sip::SipConfig;

use crate::jobs::channels::ChannelConfig;
use crate::jobs::storage::StorageConfig;
use crate::jobs::worker::JobsConfig;
use crate::voice::twilio::CarrierConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on. Port 0 picks a free port.
    pub bind: SocketAddr,
    /// `sqlite://voxgate.db` (default) or `postgres://...`.
    pub database_url: String,
    /// Upper bound of the connection pool.
    pub db_max_connections: u32,
    /// Identifies this process among several sharing one database.
    pub node_id: String,
    pub log: LogConfig,
    pub rate_limits: RateLimits,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// A request that takes longer is answered with 503.
    pub request_timeout_secs: u64,
    /// The SIP user agent (`[sip]`, with `[[sip.trunks]]`).
    pub sip: SipConfig,
    /// The speech engines (`[agents]`): models directory, pool, remote engines.
    pub agents: EnginesConfig,
    pub calls: CallsConfig,
    pub webhooks: WebhooksConfig,
    /// Exceptions to the SSRF guard for user-supplied URLs (`[ssrf]`).
    pub ssrf: SsrfConfig,
    /// The generation job workers (`[jobs]`).
    pub jobs: JobsConfig,
    /// Provider upstreams of the generation routes (`[[channels]]`).
    pub channels: Vec<ChannelConfig>,
    /// Where job outputs are kept and how their URLs are signed (`[storage]`).
    pub storage: StorageConfig,
    /// The URL CPaaS providers reach this node at (`https://voice.example.com`):
    /// media stream URLs (`wss://`) and status callbacks are built on it.
    /// Default: the address the API listens on, which only local peers reach.
    pub public_url: Option<String>,
    /// CPaaS accounts that place outbound calls over media streams
    /// (`[[carriers]]`, kind `twilio`); their names are trunk names.
    pub carriers: Vec<CarrierConfig>,
    /// Load balancers in front of this node (CIDRs): the client address of
    /// a request that comes through one is taken from `X-Forwarded-For`
    /// (for keys' IP allowlists). Empty: the socket's peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Several processes on one database (`[cluster]`).
    pub cluster: ClusterConfig,
}

/// `[cluster]`: how the processes sharing a database watch each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often this node records that it is alive.
    pub heartbeat_secs: u64,
    /// A node silent this long is dead: a survivor closes its calls
    /// (`failed`, `node-lost`) and requeues its jobs.
    pub dead_after_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { heartbeat_secs: 5, dead_after_secs: 15 }
    }
}

/// `[calls]`: the call manager's limits and billing clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Calls this process runs at once; more are refused with 503.
    pub max_concurrent: usize,
    /// Outbound calls an account may place per rolling hour (all processes).
    pub hourly_limit: u32,
    /// Length of a billed minute in seconds (60; tests shorten it).
    pub minute_secs: u64,
    /// Credits per started minute of connected time.
    pub credits_per_minute: u64,
    /// What the agent says before hanging up when credits run out.
    pub closing_line: String,
    /// On shutdown, calls in progress get this long to finish before they
    /// are hung up.
    pub shutdown_grace_secs: u64,
    /// Load the speech models at start-up instead of at the first agent.
    pub preload_models: bool,
    /// A media stream URL must be connected within this many seconds.
    pub stream_connect_secs: u64,
    /// WebRTC calls offer loopback ICE candidates only (a browser on this
    /// host, tests); otherwise every local interface's.
    pub webrtc_loopback_only: bool,
    /// Load testing of the media engine alone: answered calls send the
    /// caller's audio straight back instead of running the agent (no models
    /// are needed). Never for real callers.
    pub echo: bool,
    /// Turn-taking of every agent's calls (`[calls.turn]`): the silence
    /// that ends a caller's turn, and the pause a reply is started on.
    pub turn: TurnConfig,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            max_concurrent: 32,
            hourly_limit: 200,
            minute_secs: 60,
            credits_per_minute: 10,
            closing_line: "I'm sorry, but I have to end the call here. Goodbye.".into(),
            shutdown_grace_secs: 30,
            preload_models: true,
            stream_connect_secs: 60,
            webrtc_loopback_only: false,
            echo: false,
            turn: TurnConfig::default(),
        }
    }
}

/// `[webhooks]`: how events reach the account's webhook URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The endpoint must answer 2xx within this many seconds.
    pub timeout_secs: u64,
    /// Delays before the retries of a failed delivery (the contract: 10, 60, 300).
    pub retry_delays_secs: Vec<u64>,
    /// How often the sender looks for due deliveries, in milliseconds.
    pub poll_interval_ms: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig { timeout_secs: 10, retry_delays_secs: vec![10, 60, 300], poll_interval_ms: 500 }
    }
}

/// `[ssrf]`: networks an operator trusts for user-supplied URLs (an
/// internal webhook receiver), and whether plain `http` is allowed for them.
/// Empty by default: only public https endpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsrfConfig {
    pub allow_networks: Vec<ipnet::IpNet>,
    /// `http://` URLs are accepted when they resolve into `allow_networks`.
    pub allow_http_in_allowed_networks: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` for people, `json` for log collectors.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `voxgate=debug,sqlx=warn`.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Per-key request quotas, one per class of endpoint (the contract's table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// `POST /api/generate/*`.
    pub generation: Quota,
    /// `GET` endpoints.
    pub reads: Quota,
    /// Other writes (`POST`/`PATCH` outside generation and uploads).
    pub writes: Quota,
    /// `/api/upload/*`.
    pub uploads: Quota,
    /// `DELETE`.
    pub deletes: Quota,
}

/// `requests` per `seconds`, refilled continuously (GCRA).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub requests: u32,
    pub seconds: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "sqlite://voxgate.db".into(),
            db_max_connections: 16,
            node_id: "node-1".into(),
            log: LogConfig { format: LogFormat::Pretty, filter: "info".into() },
            rate_limits: RateLimits::default(),
            max_body_bytes: 1024 * 1024,
            request_timeout_secs: 30,
            sip: SipConfig::default(),
            agents: EnginesConfig::default(),
            calls: CallsConfig::default(),
            webhooks: WebhooksConfig::default(),
            ssrf: SsrfConfig::default(),
            jobs: JobsConfig::default(),
            channels: Vec::new(),
            storage: StorageConfig::default(),
            public_url: None,
            carriers: Vec::new(),
            trusted_proxies: Vec::new(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            generation: Quota { requests: 5, seconds: 10 },
            reads: Quota { requests: 20, seconds: 10 },
            writes: Quota { requests: 20, seconds: 10 },
            uploads: Quota { requests: 10, seconds: 60 },
            deletes: Quota { requests: 10, seconds: 60 },
        }
    }
}

impl Config {
    /// Defaults, then the TOML file if it exists, then the environment.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(path))
            .merge(Env::raw().only(&["DATABASE_URL"]))
            .merge(Env::prefixed("VOXGATE_").ignore(&["CONFIG"]).split("__"))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let rl = &self.rate_limits;
        for (name, q) in [
            ("generation", rl.generation),
            ("reads", rl.reads),
            ("writes", rl.writes),
            ("uploads", rl.uploads),
            ("deletes", rl.deletes),
        ] {
            anyhow::ensure!(
                q.requests > 0 && q.seconds > 0,
                "rate_limits.{name}: requests and seconds must both be at least 1"
            );
        }
        anyhow::ensure!(self.db_max_connections > 0, "db_max_connections must be at least 1");
        let c = &self.cluster;
        anyhow::ensure!(c.heartbeat_secs > 0, "cluster.heartbeat_secs must be at least 1");
        anyhow::ensure!(
            c.dead_after_secs >= 2 * c.heartbeat_secs,
            "cluster.dead_after_secs must be at least twice cluster.heartbeat_secs"
        );
        anyhow::ensure!(
            !self.node_id.is_empty() && self.node_id.len() <= 64 && self.node_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "node_id must be 1-64 characters of letters, digits, '-', '_' or '.'"
        );
        anyhow::ensure!(self.max_body_bytes >= 1024, "max_body_bytes must be at least 1024");
        anyhow::ensure!(self.request_timeout_secs > 0, "request_timeout_secs must be at least 1");
        let calls = &self.calls;
        anyhow::ensure!(calls.max_concurrent > 0, "calls.max_concurrent must be at least 1");
        anyhow::ensure!(calls.hourly_limit > 0, "calls.hourly_limit must be at least 1");
        anyhow::ensure!(calls.minute_secs > 0, "calls.minute_secs must be at least 1");
        anyhow::ensure!(calls.credits_per_minute > 0, "calls.credits_per_minute must be at least 1");
        calls.turn.validate().map_err(|e| anyhow::anyhow!("calls.turn.{e}"))?;
        anyhow::ensure!(self.webhooks.timeout_secs > 0, "webhooks.timeout_secs must be at least 1");
        anyhow::ensure!(self.webhooks.poll_interval_ms > 0, "webhooks.poll_interval_ms must be at least 1");
        anyhow::ensure!(
            self.sip.rtp_port_min < self.sip.rtp_port_max,
            "sip.rtp_port_min must be below sip.rtp_port_max"
        );
        self.jobs.validate()?;
        for channel in &self.channels {
            channel.validate()?;
        }
        anyhow::ensure!(self.storage.url_ttl_secs > 0, "storage.url_ttl_secs must be at least 1");
        for trunk in &self.sip.trunks {
            anyhow::ensure!(!trunk.name.is_empty(), "sip.trunks: every trunk needs a name");
        }
        anyhow::ensure!(self.calls.stream_connect_secs > 0, "calls.stream_connect_secs must be at least 1");
        anyhow::ensure!(matches!(self.agents.llm_threads, None | Some(1 | 2)), "agents.llm_threads must be 1 or 2");
        for remote in &self.agents.remote_llms {
            anyhow::ensure!(
                remote.context_tokens > MAX_REPLY_TOKENS,
                "agents.remote_llms ({}): context_tokens must be more than a reply's {MAX_REPLY_TOKENS} tokens",
                remote.base_url
            );
        }
        if let Some(url) = &self.public_url {
            let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("public_url: {e}"))?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "http" | "https") && parsed.path() == "/" && parsed.query().is_none(),
                "public_url must be http(s)://host[:port] with no path"
            );
        }
        for c in &self.carriers {
            anyhow::ensure!(!c.name.is_empty(), "carriers: every carrier needs a name");
            anyhow::ensure!(
                !self.sip.trunks.iter().any(|t| t.name == c.name),
                "carriers: '{}' is also a SIP trunk's name",
                c.name
            );
            anyhow::ensure!(!c.account_sid.is_empty() && !c.auth_token.is_empty(), "carriers.{}: account_sid and auth_token are required", c.name);
            crate::domain::PhoneNumber::parse("from", &c.from).map_err(|e| anyhow::anyhow!("carriers.{}: {e}", c.name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("voxgate.toml", "bind = \"127.0.0.1:9000\"\n[rate_limits.reads]\nrequests = 7\nseconds = 3\n")?;
            jail.set_env("VOXGATE_BIND", "127.0.0.1:9001");
            jail.set_env("DATABASE_URL", "postgres://127.0.0.1/test");
            let c = Config::load(Path::new("voxgate.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.bind.port(), 9001);
            assert_eq!(c.database_url, "postgres://127.0.0.1/test");
            assert_eq!(c.rate_limits.reads, Quota { requests: 7, seconds: 3 });
            assert_eq!(c.rate_limits.generation, Quota { requests: 5, seconds: 10 });
            Ok(())
        });
    }

    #[test]
    fn call_defaults_follow_the_contract() {
        let c = Config::default();
        assert_eq!(c.calls.hourly_limit, 200);
        assert_eq!(c.calls.credits_per_minute, 10);
        assert_eq!(c.calls.minute_secs, 60);
        assert_eq!(c.webhooks.retry_delays_secs, [10, 60, 300]);
        assert_eq!(c.webhooks.timeout_secs, 10);
        assert!(c.ssrf.allow_networks.is_empty() && !c.ssrf.allow_http_in_allowed_networks);
    }

    #[test]
    fn zero_quota_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("VOXGATE_RATE_LIMITS__READS__REQUESTS", "0");
            let err = Config::load(Path::new("missing.toml")).unwrap_err().to_string();
            assert!(err.contains("rate_limits.reads"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn turn_taking_is_read_from_calls_turn_and_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("voxgate.toml", "[calls.turn]\npause_ms = 60\n")?;
            jail.set_env("VOXGATE_CALLS__TURN__END_SILENCE_MS", "700");
            jail.set_env("VOXGATE_CALLS__TURN__FIRST_PIECE_WORDS", "3");
            let turn = Config::load(Path::new("voxgate.toml")).unwrap().calls.turn;
            assert_eq!((turn.pause_ms, turn.end_silence_ms, turn.early_end_silence_ms, turn.first_piece_words), (60, 700, 240, 3));
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("voxgate.toml", "[calls.turn]\npause_ms = 300\n")?;
            let err = Config::load(Path::new("voxgate.toml")).unwrap_err().to_string();
            assert_eq!(err, "calls.turn.pause_ms must be 40-240 ms (got 300)");
            Ok(())
        });
    }

    #[test]
    fn a_remote_llms_context_must_hold_more_than_a_reply() {
        let endpoint = |context: &str| format!("[[agents.remote_llms]]\nmodels = [\"m\"]\nbase_url = \"https://llm.example.com/v1\"\n{context}");
        for bad in ["context_tokens = 0\n", "context_tokens = 120\n"] {
            figment::Jail::expect_with(|jail| {
                jail.create_file("voxgate.toml", &endpoint(bad))?;
                let err = Config::load(Path::new("voxgate.toml")).unwrap_err().to_string();
                assert!(err.contains("context_tokens must be more than"), "{err}");
                Ok(())
            });
        }
        figment::Jail::expect_with(|jail| {
            jail.create_file("voxgate.toml", &endpoint(""))?;
            assert_eq!(Config::load(Path::new("voxgate.toml")).unwrap().agents.remote_llms[0].context_tokens, 8_192);
            Ok(())
        });
    }

    #[test]
    fn llm_threads_is_1_or_2() {
        for bad in ["0", "3"] {
            figment::Jail::expect_with(|jail| {
                jail.create_file("voxgate.toml", &format!("[agents]\nllm_threads = {bad}\n"))?;
                let err = Config::load(Path::new("voxgate.toml")).unwrap_err().to_string();
                assert!(err.contains("agents.llm_threads"), "{err}");
                Ok(())
            });
        }
        figment::Jail::expect_with(|jail| {
            jail.create_file("voxgate.toml", "[agents]\nllm_threads = 2\n")?;
            assert_eq!(Config::load(Path::new("voxgate.toml")).unwrap().agents.llm_threads, Some(2));
            Ok(())
        });
    }

    #[test]
    fn opus_complexity_is_0_to_10() {
        assert_eq!(Config::default().sip.opus_complexity.get(), 1);
        figment::Jail::expect_with(|jail| {
            jail.create_file("voxgate.toml", "[sip]\nopus_complexity = 11\n")?;
            let err = Config::load(Path::new("voxgate.toml")).unwrap_err().to_string();
            assert!(err.contains("sip.opus_complexity") && err.contains("0 to 10"), "{err}");
            jail.create_file("voxgate.toml", "[sip]\nopus_complexity = 10\n")?;
            assert_eq!(Config::load(Path::new("voxgate.toml")).map_err(|e| e.to_string())?.sip.opus_complexity.get(), 10);
            Ok(())
        });
    }
}
