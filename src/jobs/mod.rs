//! Generation jobs: what each `/api/generate/*` request asks for ([`spec`]),
//! the durable queue they wait in ([`queue`]), the workers that run them
//! ([`worker`]) on the local speech engines or on provider channels
//! ([`channels`]), and where their outputs are kept ([`storage`]).
//!
//! Money follows the ledger's rules: a job's cost is debited in the same
//! transaction that queues it (idempotency key `job:<id>`), and a job that
//! fails is refunded with that key, so a refund happens at most once however
//! many workers or restarts see the failure.

pub mod channels;
pub mod queue;
pub mod spec;
pub mod storage;
pub mod worker;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::domain::Credits;

/// The kinds of generation, one per `/api/generate/{kind}` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum JobKind {
    #[serde(rename = "image")]
    Image,
    #[serde(rename = "video")]
    Video,
    #[serde(rename = "voice")]
    Voice,
    #[serde(rename = "voice-clone")]
    VoiceClone,
    #[serde(rename = "avatar")]
    Avatar,
    #[serde(rename = "clip")]
    Clip,
    #[serde(rename = "b-roll")]
    BRoll,
    #[serde(rename = "text2video")]
    TextToVideo,
    #[serde(rename = "commercial")]
    Commercial,
    #[serde(rename = "translate")]
    Translate,
    #[serde(rename = "instant-ad")]
    InstantAd,
    #[serde(rename = "photoshoot")]
    Photoshoot,
}

impl JobKind {
    pub const ALL: [JobKind; 12] = [
        JobKind::Image,
        JobKind::Video,
        JobKind::Voice,
        JobKind::VoiceClone,
        JobKind::Avatar,
        JobKind::Clip,
        JobKind::BRoll,
        JobKind::TextToVideo,
        JobKind::Commercial,
        JobKind::Translate,
        JobKind::InstantAd,
        JobKind::Photoshoot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Image => "image",
            JobKind::Video => "video",
            JobKind::Voice => "voice",
            JobKind::VoiceClone => "voice-clone",
            JobKind::Avatar => "avatar",
            JobKind::Clip => "clip",
            JobKind::BRoll => "b-roll",
            JobKind::TextToVideo => "text2video",
            JobKind::Commercial => "commercial",
            JobKind::Translate => "translate",
            JobKind::InstantAd => "instant-ad",
            JobKind::Photoshoot => "photoshoot",
        }
    }

    /// The contract's price. Instant ads vary with the number of variations
    /// and are priced by [`spec`]; this is their lowest price.
    pub fn base_cost(self) -> Credits {
        Credits::new(match self {
            JobKind::Image => 10,
            JobKind::Video => 250,
            JobKind::Voice => 80,
            JobKind::VoiceClone => 80,
            JobKind::Avatar => 750,
            JobKind::Clip => 30,
            JobKind::BRoll => 150,
            JobKind::TextToVideo => 250,
            JobKind::Commercial => 3000,
            JobKind::Translate => 1800,
            JobKind::InstantAd => 500,
            JobKind::Photoshoot => 30,
        })
    }

    /// Whether the output is a video (the OpenAI-style `/videos` protocol
    /// can serve it).
    pub fn is_video(self) -> bool {
        matches!(self, JobKind::Video | JobKind::BRoll | JobKind::TextToVideo)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
            crate::Error::bad_request(format!("type '{s}' is not one of {}", names.join(", ")))
        })
    }
}

/// Where a job is in its life. `completed` and `failed` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Processing,
    Completed,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }
}

impl FromStr for JobStatus {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        [JobStatus::Queued, JobStatus::Processing, JobStatus::Completed, JobStatus::Failed]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| crate::Error::bad_request(format!("status '{s}' is not one of queued, processing, completed, failed")))
    }
}

/// The generic message a failed job shows (the contract: internal details
/// are never exposed; they are in the logs under the job id).
pub const FAILED_MESSAGE: &str = "Generation failed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_cost_what_the_contract_says() {
        for k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        let costs: Vec<u64> = JobKind::ALL.iter().map(|k| k.base_cost().get()).collect();
        assert_eq!(costs, [10, 250, 80, 80, 750, 30, 150, 250, 3000, 1800, 500, 30]);
        assert!("music".parse::<JobKind>().is_err());
    }
}
