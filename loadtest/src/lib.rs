//! voxgate-loadtest: the far end of many concurrent voxgate calls.
//!
//! It places calls through voxgate's API to numbers on a SIP trunk that
//! points at its own SIP user agent, answers them, plays a scripted caller
//! (utterances synthesized once with espeak-ng or the Piper voice, sent as
//! paced RTP) and measures what a caller hears, with timestamps taken at
//! the wire. The report holds every raw sample, percentiles and plots. With
//! a stream transport it plays a CPaaS instead of a SIP trunk: the calls
//! come in over voxgate's `/media/{provider}` WebSocket ([`stream`]).
//!
//! Modules: [`options`] (the command line), [`api`] (voxgate's HTTP API),
//! [`script`] (one call's caller and its measurements), [`stream`] (the
//! WebSocket leg), [`run`] (the
//! dispatcher, sampler and tear-down), [`report`] (JSON, Markdown, SVG) and
//! [`procstat`] (CPU and memory from `/proc`).

pub mod api;
pub mod options;
pub mod procstat;
pub mod report;
pub mod run;
pub mod script;
pub mod stream;

pub use options::{Mode, Options};
pub use report::Report;
pub use run::run;
