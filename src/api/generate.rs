//! `/api/generate/*`: one route per kind of generation (`generate` scope).
//! Each request is checked in full (bounds, enums, plan, URLs through the
//! SSRF guard, a model something here can serve) before its cost is
//! debited and the job queued, so a refused request costs nothing.

use axum::extract::State;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;
use voxgate_agents::PIPER;

use super::json::{ok, ApiJson, Data};
use crate::auth::{Auth, AuthContext};
use crate::domain::Scope;
use crate::error::ErrorBody;
use crate::jobs::queue::{self, Job, Source};
use crate::jobs::spec::{self, NewJob, Spec};
use crate::jobs::spec::{
    AvatarRequest, BRollRequest, ClipRequest, CommercialRequest, ImageRequest, InstantAdRequest, PhotoshootRequest, TextToVideoRequest,
    TranslateRequest, VideoRequest, VoiceCloneRequest, VoiceRequest,
};
use crate::jobs::JobKind;
use crate::state::AppState;
use crate::{Error, Result};

/// The answer to a generation request.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Queued {
    pub job_id: String,
    /// Always `queued`.
    pub status: String,
    pub credits_charged: u64,
    pub message: String,
    /// Voice only: the expected length of the audio, in whole minutes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_minutes: Option<u64>,
}

/// Characters of speech per minute (about 150 words).
const CHARS_PER_MINUTE: u64 = 900;

/// Refuses a model nothing here serves (503, nothing charged).
pub(super) async fn available(state: &AppState, new: &NewJob) -> Result<()> {
    if new.kind == JobKind::Voice && state.engines.has_tts(&new.model) {
        if let Ok(engines) = state.engines.get().await {
            if engines.tts_models().contains(&new.model.as_str()) {
                let language = new.input["language"].as_str().unwrap_or("en");
                if new.model == PIPER && !language.starts_with("en") {
                    return Err(Error::bad_request(format!(
                        "model piper speaks English only; use model espeak for language '{language}'"
                    )));
                }
                return Ok(());
            }
        }
    }
    if state.jobs.channels.serves(new.kind, &new.model) {
        return Ok(());
    }
    Err(Error::Unavailable(format!(
        "model '{}' is not available for {}: no provider channel serving it is configured",
        new.model, new.kind
    )))
}

/// Checks, prices, charges and queues a job (shared with the `/v1` routes).
pub(super) async fn submit_job(state: &AppState, auth: &AuthContext, new: NewJob, source: Source) -> Result<Job> {
    let feature = if new.kind == JobKind::VoiceClone { "voice cloning".to_string() } else { format!("model '{}'", new.model) };
    auth.require_plan(new.min_plan, &feature)?;
    auth.require_model(&new.model)?;
    available(state, &new).await?;
    let job = queue::submit(&state.db, auth.org, auth.spender(), &new, source, state.config.jobs.max_attempts).await?;
    state.jobs.notify();
    tracing::info!(job_id = %job.id, kind = %job.kind, model = %job.model, credits = job.cost.get(), "job queued");
    Ok(job)
}

async fn generate<S: Spec>(state: AppState, auth: AuthContext, spec: S) -> Result<Response> {
    auth.require(Scope::Generate)?;
    let new = spec::prepare(spec, &state.ssrf).await?;
    let estimated_minutes =
        (new.kind == JobKind::Voice).then(|| (new.input["text"].as_str().unwrap_or_default().chars().count() as u64).div_ceil(CHARS_PER_MINUTE).max(1));
    let job = submit_job(&state, &auth, new, Source::Api).await?;
    Ok(ok(Queued {
        message: format!("{} generation job queued", job.kind),
        job_id: job.id,
        status: "queued".into(),
        credits_charged: job.cost.get(),
        estimated_minutes,
    }))
}

macro_rules! route {
    ($name:ident, $path:literal, $body:ty, $cost:literal) => {
        #[doc = $cost]
        #[utoipa::path(post, path = $path, tag = "generation", request_body = $body,
            responses((status = 200, body = Data<Queued>), (status = 400, body = ErrorBody), (status = 402, body = ErrorBody),
                (status = 403, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
        pub async fn $name(State(state): State<AppState>, Auth(auth): Auth, ApiJson(body): ApiJson<$body>) -> Result<Response> {
            generate(state, auth, body).await
        }
    };
}

route!(image, "/api/generate/image", ImageRequest, "Generate an image (10 credits).");
route!(video, "/api/generate/video", VideoRequest, "Generate a video from a script (250 credits).");
route!(voice, "/api/generate/voice", VoiceRequest, "Convert text to speech (80 credits).");
route!(voice_clone, "/api/generate/voice-clone", VoiceCloneRequest, "Clone a voice from an audio sample (80 credits, Creator plan or higher); the voice id is in the finished job's metadata.");
route!(avatar, "/api/generate/avatar", AvatarRequest, "Generate a talking-head video (750 credits).");
route!(clip, "/api/generate/clip", ClipRequest, "Extract the best clips of a long video (30 credits).");
route!(b_roll, "/api/generate/b-roll", BRollRequest, "Generate B-roll footage (150 credits).");
route!(text2video, "/api/generate/text2video", TextToVideoRequest, "Generate a video from a text script (250 credits).");
route!(commercial, "/api/generate/commercial", CommercialRequest, "Generate a commercial (3,000 credits).");
route!(translate, "/api/generate/translate", TranslateRequest, "Translate a video with lip-sync (1,800 credits).");
route!(instant_ad, "/api/generate/instant-ad", InstantAdRequest, "Ad creatives from a website (500 credits plus 250 per variation after the first: 500-1,250).");
route!(photoshoot, "/api/generate/photoshoot", PhotoshootRequest, "Product photos with AI backgrounds (30 credits).");
