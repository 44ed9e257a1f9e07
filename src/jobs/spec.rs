//! The request of every `/api/generate/*` route, with the contract's fields,
//! defaults and bounds. A request is checked in full (bounds, enums, plan,
//! every URL through the SSRF guard) before anything is charged; what comes
//! out is a [`NewJob`]: kind, model, price, and the normalised input (with
//! defaults filled in) that the worker and the upstream see.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::JobKind;
use crate::domain::{Credits, Plan};
use crate::net::ssrf::SsrfGuard;
use crate::{Error, Result};

pub const IMAGE_MODELS: &[&str] = &["grok-imagine", "flux-2-dev", "flux-2-pro", "ideogram-v3", "flux-kontext-max"];
pub const VIDEO_MODELS: &[&str] = &["wan-2.6", "kling-2.6-pro", "kling-3.0-pro", "veo-3.1"];
/// The contract's three, plus the two local engines of the voice agents.
pub const VOICE_MODELS: &[&str] = &["piper", "espeak", "kokoro", "elevenlabs-v3", "fish-audio-s1"];
pub const AVATAR_MODELS: &[&str] = &["veed-fabric", "creatify-aurora", "kling-avatar-v2", "omnihuman-1.5"];
pub const BROLL_MODELS: &[&str] = &["wan-2.6", "kling-2.6-pro"];

/// Models of the top tiers ("multiple AI models per plan tier"): the Pro
/// plan or higher. Everything else is open to every plan.
const PRO_MODELS: &[&str] = &["flux-2-pro", "ideogram-v3", "flux-kontext-max", "kling-3.0-pro", "veo-3.1", "omnihuman-1.5", "elevenlabs-v3"];

/// A checked request, ready to be charged and queued.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub kind: JobKind,
    /// The model that serves it; for kinds without a model field, the kind
    /// itself (channels list `clip`, `translate`, ... among their models).
    pub model: String,
    pub cost: Credits,
    pub input: serde_json::Value,
    pub min_plan: Plan,
}

/// One route's request body.
pub trait Spec: Serialize + Sized {
    const KIND: JobKind;
    /// Checks bounds and enums and fills in defaults.
    fn check(&mut self) -> Result<()>;
    /// The user-supplied URLs, by field name, for the SSRF guard.
    fn urls(&self) -> Vec<(&'static str, &str)> {
        Vec::new()
    }
    fn model(&self) -> String {
        Self::KIND.as_str().to_string()
    }
    fn cost(&self) -> Credits {
        Self::KIND.base_cost()
    }
    fn min_plan(&self) -> Plan {
        Plan::Free
    }
}

/// Checks `spec` in full and prices it.
pub async fn prepare<S: Spec>(mut spec: S, ssrf: &SsrfGuard) -> Result<NewJob> {
    spec.check()?;
    for (field, url) in spec.urls() {
        ssrf.check_url(field, url).await?;
    }
    let model = spec.model();
    let min_plan = if PRO_MODELS.contains(&model.as_str()) { Plan::Pro.max(spec.min_plan()) } else { spec.min_plan() };
    let input = serde_json::to_value(&spec).map_err(|e| Error::Internal(e.into()))?;
    Ok(NewJob { kind: S::KIND, model, cost: spec.cost(), input, min_plan })
}

fn text(field: &str, v: &str, max: usize) -> Result<()> {
    let n = v.chars().count();
    if v.trim().is_empty() || n > max {
        return Err(Error::bad_request(format!("{field} must be 1-{max} characters (got {n})")));
    }
    Ok(())
}

fn opt_text(field: &str, v: &Option<String>, max: usize) -> Result<()> {
    v.as_deref().map_or(Ok(()), |v| text(field, v, max))
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(field: &str, v: T, lo: T, hi: T) -> Result<()> {
    // Written so that NaN fails too.
    if !(v >= lo && v <= hi) {
        return Err(Error::bad_request(format!("{field} must be {lo}-{hi} (got {v})")));
    }
    Ok(())
}

fn opt_range<T: PartialOrd + std::fmt::Display + Copy>(field: &str, v: Option<T>, lo: T, hi: T) -> Result<()> {
    v.map_or(Ok(()), |v| range(field, v, lo, hi))
}

fn one_of(field: &str, v: &str, allowed: &[&str]) -> Result<()> {
    if !allowed.contains(&v) {
        return Err(Error::bad_request(format!("{field} must be one of {} (got '{v}')", allowed.join(" | "))));
    }
    Ok(())
}

fn opt_one_of(field: &str, v: &Option<String>, allowed: &[&str]) -> Result<()> {
    v.as_deref().map_or(Ok(()), |v| one_of(field, v, allowed))
}

/// A voice id, brand profile id and the like: printable, no spaces.
fn opt_id(field: &str, v: &Option<String>) -> Result<()> {
    match v.as_deref() {
        Some(s) if s.is_empty() || s.len() > 100 || !s.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(Error::bad_request(format!("{field} must be 1-100 printable characters without spaces")))
        }
        _ => Ok(()),
    }
}

/// ISO 639 language, optionally with a region: `en`, `pt-BR`, `yue`.
pub fn language(field: &str, v: &str) -> Result<()> {
    let mut parts = v.splitn(2, '-');
    let lang = parts.next().unwrap_or_default();
    let region_ok = parts.next().is_none_or(|r| (2..=8).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    if !(2..=3).contains(&lang.len()) || !lang.bytes().all(|b| b.is_ascii_lowercase()) || !region_ok {
        return Err(Error::bad_request(format!("{field} must be an ISO 639 language code such as en or pt-BR (got '{v}')")));
    }
    Ok(())
}

fn set_default(v: &mut Option<String>, default: &str) -> String {
    v.get_or_insert_with(|| default.to_string()).clone()
}

/// `POST /api/generate/image` (10 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageRequest {
    /// Text prompt, 1-2,000 characters.
    pub prompt: String,
    /// 256-2048, default 1024.
    pub width: Option<u32>,
    /// 256-2048, default 1024.
    pub height: Option<u32>,
    /// Inference steps 1-50, default 4.
    pub steps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// photorealistic | illustration | 3d | flat
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    /// grok-imagine | flux-2-dev (default) | flux-2-pro | ideogram-v3 | flux-kontext-max
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
}

impl Spec for ImageRequest {
    const KIND: JobKind = JobKind::Image;
    fn check(&mut self) -> Result<()> {
        text("prompt", &self.prompt, 2000)?;
        range("width", *self.width.get_or_insert(1024), 256, 2048)?;
        range("height", *self.height.get_or_insert(1024), 256, 2048)?;
        range("steps", *self.steps.get_or_insert(4), 1, 50)?;
        opt_one_of("style", &self.style, &["photorealistic", "illustration", "3d", "flat"])?;
        one_of("model", &set_default(&mut self.model, "flux-2-dev"), IMAGE_MODELS)?;
        opt_text("negativePrompt", &self.negative_prompt, 2000)
    }
    fn model(&self) -> String {
        self.model.clone().unwrap_or_default()
    }
}

/// `POST /api/generate/video` (250 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VideoRequest {
    /// Video script, 1-5,000 characters.
    pub script: String,
    /// HTTPS URL of a face image for an avatar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice_id: Option<String>,
    /// Max seconds, 3-60.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u32>,
    /// 720p (default) | 1080p
    pub resolution: Option<String>,
    /// professional | casual | energetic
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    /// wan-2.6 (default) | kling-2.6-pro | kling-3.0-pro | veo-3.1
    pub model: Option<String>,
}

impl Spec for VideoRequest {
    const KIND: JobKind = JobKind::Video;
    fn check(&mut self) -> Result<()> {
        text("script", &self.script, 5000)?;
        opt_id("voiceId", &self.voice_id)?;
        opt_range("duration", self.duration, 3, 60)?;
        one_of("resolution", &set_default(&mut self.resolution, "720p"), &["720p", "1080p"])?;
        opt_one_of("style", &self.style, &["professional", "casual", "energetic"])?;
        one_of("model", &set_default(&mut self.model, "wan-2.6"), VIDEO_MODELS)
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        self.avatar_image.as_deref().map(|u| ("avatarImage", u)).into_iter().collect()
    }
    fn model(&self) -> String {
        self.model.clone().unwrap_or_default()
    }
}

/// `POST /api/generate/voice` (80 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VoiceRequest {
    /// Text to speak, 1-10,000 characters.
    pub text: String,
    /// A voice of the model (an espeak-ng voice such as `en-us`, a hosted
    /// voice id), or the model's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice_id: Option<String>,
    /// Playback speed 0.5-2.0, default 1.0.
    pub speed: Option<f64>,
    /// ISO language code, default en.
    pub language: Option<String>,
    /// piper (default, local) | espeak (local) | kokoro | elevenlabs-v3 | fish-audio-s1
    pub model: Option<String>,
}

impl Spec for VoiceRequest {
    const KIND: JobKind = JobKind::Voice;
    fn check(&mut self) -> Result<()> {
        text("text", &self.text, 10_000)?;
        opt_id("voiceId", &self.voice_id)?;
        range("speed", *self.speed.get_or_insert(1.0), 0.5, 2.0)?;
        language("language", &set_default(&mut self.language, "en"))?;
        one_of("model", &set_default(&mut self.model, "piper"), VOICE_MODELS)
    }
    fn model(&self) -> String {
        self.model.clone().unwrap_or_default()
    }
}

/// `POST /api/generate/voice-clone` (80 credits, Creator plan or higher).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VoiceCloneRequest {
    /// Voice name, 1-100 characters.
    pub name: String,
    /// HTTPS URL of a 15-30 s audio sample.
    pub sample_audio_url: String,
}

impl Spec for VoiceCloneRequest {
    const KIND: JobKind = JobKind::VoiceClone;
    fn check(&mut self) -> Result<()> {
        text("name", &self.name, 100)
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        vec![("sampleAudioUrl", &self.sample_audio_url)]
    }
    fn min_plan(&self) -> Plan {
        Plan::Creator
    }
}

/// `POST /api/generate/avatar` (750 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AvatarRequest {
    /// HTTPS URL of the spokesperson photo.
    pub image: String,
    /// 480p | 720p | 1080p
    pub resolution: String,
    /// veed-fabric | creatify-aurora | kling-avatar-v2 | omnihuman-1.5
    pub model: String,
    /// HTTPS URL of pre-recorded audio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio: Option<String>,
    /// Text to speak (if no audio), 1-5,000 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice_id: Option<String>,
}

impl Spec for AvatarRequest {
    const KIND: JobKind = JobKind::Avatar;
    fn check(&mut self) -> Result<()> {
        one_of("resolution", &self.resolution, &["480p", "720p", "1080p"])?;
        one_of("model", &self.model, AVATAR_MODELS)?;
        opt_text("text", &self.text, 5000)?;
        opt_id("voiceId", &self.voice_id)?;
        if self.audio.is_none() && self.text.is_none() {
            return Err(Error::bad_request("one of audio or text is required"));
        }
        if self.audio.is_some() && self.text.is_some() {
            return Err(Error::bad_request("give audio or text, not both"));
        }
        Ok(())
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        let mut v = vec![("image", self.image.as_str())];
        v.extend(self.audio.as_deref().map(|u| ("audio", u)));
        v
    }
    fn model(&self) -> String {
        self.model.clone()
    }
}

/// `POST /api/generate/clip` (30 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClipRequest {
    /// HTTPS URL of the source video.
    pub source_video_url: String,
    /// 1-20, default 5.
    pub max_clips: Option<u32>,
    /// Seconds, 1-600.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_duration: Option<u32>,
    /// Seconds, 1-600, not below minDuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<u32>,
    pub add_captions: Option<bool>,
    /// 9:16 (default) | 1:1 | 16:9
    pub aspect_ratio: Option<String>,
    /// 1-10.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viral_score_threshold: Option<f64>,
}

impl Spec for ClipRequest {
    const KIND: JobKind = JobKind::Clip;
    fn check(&mut self) -> Result<()> {
        range("maxClips", *self.max_clips.get_or_insert(5), 1, 20)?;
        opt_range("minDuration", self.min_duration, 1, 600)?;
        opt_range("maxDuration", self.max_duration, 1, 600)?;
        if let (Some(lo), Some(hi)) = (self.min_duration, self.max_duration) {
            if lo > hi {
                return Err(Error::bad_request(format!("minDuration ({lo}) must not exceed maxDuration ({hi})")));
            }
        }
        self.add_captions.get_or_insert(false);
        one_of("aspectRatio", &set_default(&mut self.aspect_ratio, "9:16"), &["9:16", "1:1", "16:9"])?;
        opt_range("viralScoreThreshold", self.viral_score_threshold, 1.0, 10.0)
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        vec![("sourceVideoUrl", &self.source_video_url)]
    }
}

/// `POST /api/generate/b-roll` (150 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BRollRequest {
    /// Scene description, 1-2,000 characters.
    pub prompt: String,
    /// 3-6 seconds, default 5.
    pub duration: Option<u32>,
    /// 480p | 720p (default)
    pub resolution: Option<String>,
    /// wan-2.6 (default) | kling-2.6-pro
    pub model: Option<String>,
}

impl Spec for BRollRequest {
    const KIND: JobKind = JobKind::BRoll;
    fn check(&mut self) -> Result<()> {
        text("prompt", &self.prompt, 2000)?;
        range("duration", *self.duration.get_or_insert(5), 3, 6)?;
        one_of("resolution", &set_default(&mut self.resolution, "720p"), &["480p", "720p"])?;
        one_of("model", &set_default(&mut self.model, "wan-2.6"), BROLL_MODELS)
    }
    fn model(&self) -> String {
        self.model.clone().unwrap_or_default()
    }
}

/// `POST /api/generate/text2video` (250 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TextToVideoRequest {
    /// Video script, 1-5,000 characters.
    pub script: String,
    /// Seconds, 3-60.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u32>,
    /// 720p (default) | 1080p
    pub resolution: Option<String>,
    /// cinematic | documentary | animation | aerial
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    /// wan-2.6 (default) | kling-2.6-pro | kling-3.0-pro | veo-3.1
    pub model: Option<String>,
}

impl Spec for TextToVideoRequest {
    const KIND: JobKind = JobKind::TextToVideo;
    fn check(&mut self) -> Result<()> {
        text("script", &self.script, 5000)?;
        opt_range("duration", self.duration, 3, 60)?;
        one_of("resolution", &set_default(&mut self.resolution, "720p"), &["720p", "1080p"])?;
        opt_one_of("style", &self.style, &["cinematic", "documentary", "animation", "aerial"])?;
        one_of("model", &set_default(&mut self.model, "wan-2.6"), VIDEO_MODELS)
    }
    fn model(&self) -> String {
        self.model.clone().unwrap_or_default()
    }
}

/// `POST /api/generate/commercial` (3,000 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CommercialRequest {
    /// Product name or description, 1-2,000 characters.
    pub product: String,
    /// tiktok | youtube | instagram | tv
    pub platform: String,
    /// 15 | 30 | 60 seconds.
    pub duration: u32,
    /// professional | energetic | casual | luxury | funny
    pub tone: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_audience: Option<String>,
    /// HTTPS URL of a photo for an AI spokesperson.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spokesperson_image: Option<String>,
    /// HTTPS URLs of product images, at most 10.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_images: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice_id: Option<String>,
    /// A voice model (see /api/generate/voice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub music_mood: Option<String>,
    /// A video model (see /api/generate/video).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_model: Option<String>,
}

impl Spec for CommercialRequest {
    const KIND: JobKind = JobKind::Commercial;
    fn check(&mut self) -> Result<()> {
        text("product", &self.product, 2000)?;
        one_of("platform", &self.platform, &["tiktok", "youtube", "instagram", "tv"])?;
        if ![15, 30, 60].contains(&self.duration) {
            return Err(Error::bad_request(format!("duration must be one of 15 | 30 | 60 (got {})", self.duration)));
        }
        one_of("tone", &self.tone, &["professional", "energetic", "casual", "luxury", "funny"])?;
        opt_text("targetAudience", &self.target_audience, 500)?;
        if self.product_images.as_ref().is_some_and(|v| v.len() > 10) {
            return Err(Error::bad_request("productImages must hold at most 10 URLs"));
        }
        opt_id("voiceId", &self.voice_id)?;
        opt_one_of("voiceModel", &self.voice_model, VOICE_MODELS)?;
        opt_text("musicMood", &self.music_mood, 100)?;
        opt_one_of("videoModel", &self.video_model, VIDEO_MODELS)
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        let mut v: Vec<(&'static str, &str)> = self.spokesperson_image.as_deref().map(|u| ("spokespersonImage", u)).into_iter().collect();
        v.extend(self.product_images.iter().flatten().map(|u| ("productImages", u.as_str())));
        v
    }
}

/// `POST /api/generate/translate` (1,800 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TranslateRequest {
    /// HTTPS URL of the source video.
    pub video_url: String,
    /// Target language, ISO code.
    pub output_language: String,
    pub preserve_original_voice: Option<bool>,
}

impl Spec for TranslateRequest {
    const KIND: JobKind = JobKind::Translate;
    fn check(&mut self) -> Result<()> {
        language("outputLanguage", &self.output_language)?;
        self.preserve_original_voice.get_or_insert(false);
        Ok(())
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        vec![("videoUrl", &self.video_url)]
    }
}

/// `POST /api/generate/instant-ad` (500 credits for one variation, 250
/// more for each further one: 500-1,250).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InstantAdRequest {
    /// HTTPS URL of the product or landing page.
    pub website_url: String,
    /// tiktok | youtube | instagram | facebook | linkedin
    pub platform: String,
    /// Variations, 1-4.
    pub count: u32,
    /// modern | bold | minimal | luxury | playful
    pub style: String,
    /// image (default) | video | both
    pub output_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brand_profile_id: Option<String>,
}

/// Credits per instant-ad variation after the first.
const INSTANT_AD_EXTRA: u64 = 250;

impl Spec for InstantAdRequest {
    const KIND: JobKind = JobKind::InstantAd;
    fn check(&mut self) -> Result<()> {
        one_of("platform", &self.platform, &["tiktok", "youtube", "instagram", "facebook", "linkedin"])?;
        range("count", self.count, 1, 4)?;
        one_of("style", &self.style, &["modern", "bold", "minimal", "luxury", "playful"])?;
        one_of("outputFormat", &set_default(&mut self.output_format, "image"), &["image", "video", "both"])?;
        opt_id("brandProfileId", &self.brand_profile_id)
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        vec![("websiteUrl", &self.website_url)]
    }
    fn cost(&self) -> Credits {
        Credits::new(JobKind::InstantAd.base_cost().get() + INSTANT_AD_EXTRA * u64::from(self.count.saturating_sub(1)))
    }
}

/// `POST /api/generate/photoshoot` (30 credits).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PhotoshootRequest {
    /// HTTPS URL of the product photo.
    pub product_image: String,
    /// studio-white | lifestyle | outdoor | flat-lay | custom
    pub background: String,
    /// front | hero | 45-degree | top-down | lifestyle
    pub angle: String,
    /// studio | natural | dramatic | soft | golden-hour
    pub lighting: String,
    /// Photos, 1-4.
    pub count: u32,
    /// Required when background is custom, 1-500 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_background: Option<String>,
    /// An image model (see /api/generate/image); default: the photoshoot pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Spec for PhotoshootRequest {
    const KIND: JobKind = JobKind::Photoshoot;
    fn check(&mut self) -> Result<()> {
        one_of("background", &self.background, &["studio-white", "lifestyle", "outdoor", "flat-lay", "custom"])?;
        one_of("angle", &self.angle, &["front", "hero", "45-degree", "top-down", "lifestyle"])?;
        one_of("lighting", &self.lighting, &["studio", "natural", "dramatic", "soft", "golden-hour"])?;
        range("count", self.count, 1, 4)?;
        match (&self.background[..], &self.custom_background) {
            ("custom", None) => return Err(Error::bad_request("customBackground is required when background is custom")),
            ("custom", Some(_)) => opt_text("customBackground", &self.custom_background, 500)?,
            (_, Some(_)) => return Err(Error::bad_request("customBackground is only for background custom")),
            _ => {}
        }
        opt_one_of("model", &self.model, IMAGE_MODELS)
    }
    fn urls(&self) -> Vec<(&'static str, &str)> {
        vec![("productImage", &self.product_image)]
    }
    fn model(&self) -> String {
        self.model.clone().unwrap_or_else(|| JobKind::Photoshoot.as_str().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(json: serde_json::Value) -> Result<ImageRequest> {
        let mut r: ImageRequest = serde_json::from_value(json).map_err(|e| Error::bad_request(e.to_string()))?;
        r.check()?;
        Ok(r)
    }

    #[test]
    fn image_defaults_follow_the_contract() {
        let r = image(serde_json::json!({"prompt": "a cat"})).unwrap();
        assert_eq!((r.width, r.height, r.steps, r.model.as_deref()), (Some(1024), Some(1024), Some(4), Some("flux-2-dev")));
    }

    #[test]
    fn image_bounds_are_inclusive() {
        let two_thousand = "x".repeat(2000);
        for ok in [
            serde_json::json!({"prompt": "a", "width": 256, "height": 2048, "steps": 1}),
            serde_json::json!({"prompt": two_thousand, "steps": 50}),
        ] {
            assert!(image(ok).is_ok());
        }
        for (bad, field) in [
            (serde_json::json!({"prompt": ""}), "prompt"),
            (serde_json::json!({"prompt": "x".repeat(2001)}), "prompt"),
            (serde_json::json!({"prompt": "a", "width": 255}), "width"),
            (serde_json::json!({"prompt": "a", "height": 2049}), "height"),
            (serde_json::json!({"prompt": "a", "steps": 51}), "steps"),
            (serde_json::json!({"prompt": "a", "style": "cubist"}), "style"),
            (serde_json::json!({"prompt": "a", "model": "dall-e"}), "model"),
        ] {
            let e = image(bad).unwrap_err().to_string();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn instant_ad_costs_500_plus_250_per_extra_variation() {
        let ad = |count| InstantAdRequest {
            website_url: "https://example.com".into(),
            platform: "tiktok".into(),
            count,
            style: "bold".into(),
            output_format: None,
            brand_profile_id: None,
        };
        assert_eq!([1, 2, 3, 4].map(|n| ad(n).cost().get()), [500, 750, 1000, 1250]);
    }

    #[test]
    fn languages_are_iso_codes() {
        for ok in ["en", "pt-BR", "yue", "zh-Hant"] {
            assert!(language("l", ok).is_ok(), "{ok}");
        }
        for bad in ["", "e", "english", "EN", "en-", "en_US", "en-Ü"] {
            assert!(language("l", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn photoshoot_custom_background_needs_its_description() {
        let mut r = PhotoshootRequest {
            product_image: "https://example.com/p.png".into(),
            background: "custom".into(),
            angle: "hero".into(),
            lighting: "soft".into(),
            count: 2,
            custom_background: None,
            model: None,
        };
        assert!(r.check().is_err());
        r.custom_background = Some("a marble table".into());
        assert!(r.check().is_ok());
        assert_eq!(r.model(), "photoshoot");
    }
}
