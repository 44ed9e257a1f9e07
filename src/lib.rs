//! voxgate: AI voice agents on the phone.
//!
//! This crate is the server process: configuration, storage, API keys and
//! scopes, the credits ledger, rate limits, the SSRF guard for user-supplied
//! URLs, metrics and the HTTP API. Telephony (`voxgate-sip`), media
//! (`voxgate-media`) and the speech pipeline (`voxgate-agents`) live in their
//! own crates and know nothing of HTTP.

pub mod api;
pub mod auth;
pub mod billing;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod orgs;
pub mod server;
pub mod settings;
pub mod state;
pub mod telemetry;
pub mod voice;
pub mod webhooks;

pub use error::{Error, Result};
