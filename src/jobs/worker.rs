//! The job workers: `[jobs] workers` loops per process, each claiming one
//! job at a time from the queue, running it (voice on the local speech
//! engines, everything else on a provider channel), storing the outputs and
//! ending the job. A heartbeat keeps the lease while the job runs; losing
//! it (another worker took the job over) stops the work without writing.
//!
//! A retryable failure (every channel answered 5xx or timed out) puts the
//! job back with a backoff while attempts remain; anything else, or the
//! last attempt, fails the job and refunds it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use voxgate_agents::pool::Urgency;
use tracing::Instrument;

use super::channels::{Channels, Fetch, Poll, Submitted, UpstreamError};
use super::queue::{self, Finished, Job};
use super::storage::{extension_for, Storage};
use super::JobKind;
use crate::clock::now_ms;
use crate::db::Db;
use crate::voice::engines::SpeechEngines;
use crate::webhooks::Webhooks;

/// `[jobs]` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs this process runs at once.
    pub workers: usize,
    /// A job whose worker has not renewed its lease for this long is taken
    /// over by another worker.
    pub lease_secs: u64,
    /// Runs of one job (first run and retries) before it fails.
    pub max_attempts: u32,
    /// Waits before the second, third, ... run after a retryable failure.
    pub retry_backoff_secs: Vec<u64>,
    /// How often an idle worker looks for jobs queued by other processes.
    pub poll_interval_ms: u64,
    /// A job whose outputs are larger fails.
    pub max_output_bytes: u64,
    /// Polls of an upstream task that may fail in a row before the run
    /// counts as a retryable failure.
    pub poll_error_limit: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            workers: 4,
            lease_secs: 30,
            max_attempts: 3,
            retry_backoff_secs: vec![10, 60],
            poll_interval_ms: 500,
            max_output_bytes: 2 << 30,
            poll_error_limit: 5,
        }
    }
}

impl JobsConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.workers > 0, "jobs.workers must be at least 1");
        anyhow::ensure!(self.lease_secs > 0, "jobs.lease_secs must be at least 1");
        anyhow::ensure!(self.max_attempts > 0, "jobs.max_attempts must be at least 1");
        anyhow::ensure!(self.poll_interval_ms > 0, "jobs.poll_interval_ms must be at least 1");
        Ok(())
    }
}

/// Everything a worker needs, shared by the handlers that submit jobs.
#[derive(Clone)]
pub struct Jobs {
    pub db: Db,
    pub hooks: Webhooks,
    pub channels: Channels,
    pub storage: Storage,
    pub engines: Arc<SpeechEngines>,
    pub config: JobsConfig,
    pub node: String,
    wake: Arc<Notify>,
}

/// Why a run did not produce outputs.
enum RunError {
    Upstream(UpstreamError),
    /// The lease is gone; someone else owns the job now.
    LeaseLost,
    /// The process is stopping; the job goes back to the queue.
    Stopping,
}

impl From<UpstreamError> for RunError {
    fn from(e: UpstreamError) -> Self {
        RunError::Upstream(e)
    }
}

fn permanent(msg: impl Into<String>) -> RunError {
    RunError::Upstream(UpstreamError::Permanent(msg.into()))
}

impl Jobs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(db: Db, hooks: Webhooks, channels: Channels, storage: Storage, engines: Arc<SpeechEngines>, config: JobsConfig, node: String) -> Self {
        Jobs { db, hooks, channels, storage, engines, config, node, wake: Arc::new(Notify::new()) }
    }

    /// Wakes an idle worker (a job was just queued).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    fn lease_ms(&self) -> i64 {
        self.config.lease_secs as i64 * 1000
    }

    /// Starts the workers; they stop when `shutdown` is cancelled, putting
    /// the jobs they hold back in the queue.
    pub fn start(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let handles: Vec<_> = (0..self.config.workers).map(|i| tokio::spawn(self.clone().worker(i, shutdown.clone()))).collect();
        tokio::spawn(async move {
            for h in handles {
                let _ = h.await;
            }
        })
    }

    async fn worker(self, index: usize, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        while !shutdown.is_cancelled() {
            match queue::claim(&self.db, &self.node, self.lease_ms()).await {
                Ok(Some(job)) => {
                    let span = tracing::info_span!("job", job_id = %job.id, kind = %job.kind, model = %job.model, attempt = job.attempts, worker = index);
                    self.run(job, &shutdown).instrument(span).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "job queue unavailable"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// Runs one claimed job to its end (or back to the queue).
    async fn run(&self, job: Job, shutdown: &CancellationToken) {
        if job.attempts > job.max_attempts {
            tracing::warn!("no attempts left (its workers died); failing the job");
            self.finish_failed(&job).await;
            return;
        }
        let started = Instant::now();
        let progress = Arc::new(AtomicU8::new(job.progress));
        let lost = CancellationToken::new();
        let beat = tokio::spawn(self.clone().heartbeat(job.id.clone(), progress.clone(), lost.clone()));
        let result = tokio::select! {
            r = self.execute(&job, &progress) => r,
            _ = lost.cancelled() => Err(RunError::LeaseLost),
            _ = shutdown.cancelled() => Err(RunError::Stopping),
        };
        beat.abort();
        match result {
            Ok(mut done) => {
                if let Some(m) = done.metadata.as_object_mut() {
                    m.insert("durationMs".into(), json!(started.elapsed().as_millis() as u64));
                }
                match queue::complete(&self.db, &self.hooks, &job, &self.node, done).await {
                    Ok(true) => tracing::info!(ms = started.elapsed().as_millis() as u64, "job completed"),
                    Ok(false) => tracing::warn!("job completed here but its lease had passed to another worker; that worker's result stands"),
                    Err(e) => tracing::error!(error = %e, "job result not saved; the job runs again when its lease ends"),
                }
            }
            Err(RunError::LeaseLost) => tracing::warn!("lease lost; another worker has the job"),
            Err(RunError::Stopping) => match queue::requeue(&self.db, &job.id, &self.node, 0, false).await {
                Ok(_) => tracing::info!("process stopping; job returned to the queue"),
                Err(e) => tracing::warn!(error = %e, "job not returned to the queue; it runs again when its lease ends"),
            },
            Err(RunError::Upstream(UpstreamError::Retryable(reason))) if job.attempts < job.max_attempts => {
                let delay = self.config.retry_backoff_secs.get(job.attempts as usize - 1).or(self.config.retry_backoff_secs.last()).copied().unwrap_or(0);
                tracing::warn!(%reason, retry_in_secs = delay, "job run failed; it will run again");
                if let Err(e) = queue::requeue(&self.db, &job.id, &self.node, delay as i64 * 1000, true).await {
                    tracing::error!(error = %e, "job not requeued; it runs again when its lease ends");
                }
            }
            Err(RunError::Upstream(e)) => {
                tracing::warn!(reason = %e, "job failed");
                self.finish_failed(&job).await;
            }
        }
    }

    async fn finish_failed(&self, job: &Job) {
        match queue::fail(&self.db, &self.hooks, job, &self.node).await {
            Ok(true) => tracing::info!(credits = job.cost.get(), "job failed and refunded"),
            Ok(false) => tracing::warn!("job failed here but its lease had passed to another worker"),
            Err(e) => tracing::error!(error = %e, "job failure not saved; the job runs again when its lease ends"),
        }
    }

    async fn heartbeat(self, id: String, progress: Arc<AtomicU8>, lost: CancellationToken) {
        let every = Duration::from_millis((self.lease_ms() as u64 / 3).clamp(100, 2000));
        loop {
            tokio::time::sleep(every).await;
            let p = progress.load(Ordering::Relaxed);
            match queue::heartbeat(&self.db, &id, &self.node, self.lease_ms(), Some(p)).await {
                Ok(true) => {}
                Ok(false) => {
                    lost.cancel();
                    return;
                }
                // The database is away: keep working; the next beat may get through.
                Err(e) => tracing::warn!(error = %e, "lease not renewed"),
            }
        }
    }

    async fn execute(&self, job: &Job, progress: &AtomicU8) -> Result<Finished, RunError> {
        if job.kind == JobKind::Voice && self.engines.has_tts(&job.model) {
            if let Ok(engines) = self.engines.get().await {
                if engines.tts_models().contains(&job.model.as_str()) {
                    return self.local_voice(job, &engines, progress).await;
                }
            }
        }
        let (submitted, immediate) = match &job.upstream {
            Some(s) => {
                tracing::info!(channel = %s.channel, "resuming the upstream task of an earlier run");
                (s.clone(), None)
            }
            None => self.submit(job).await?,
        };
        let (fetches, upstream) = match immediate {
            Some(Poll::Done(f, v)) => (f, v),
            _ => self.wait(&submitted, progress).await?,
        };
        self.store(job, &submitted.channel, fetches, &upstream).await
    }

    /// Submits to the first channel that takes the job.
    async fn submit(&self, job: &Job) -> Result<(Submitted, Option<Poll>), RunError> {
        let route = self.channels.route(job.kind, &job.model);
        if route.is_empty() {
            return Err(permanent(format!("no channel serves model '{}' any more", job.model)));
        }
        // One key for every run of the job: after a crash between the
        // upstream's answer and `set_upstream`, the next run gets the same task.
        let key = format!("voxgate-job-{}", job.id);
        let mut last = UpstreamError::Retryable("no channel was tried".into());
        for channel in route {
            for attempt in 0..=channel.retries {
                match self.channels.submit(channel, job.kind, &job.model, &job.input, &key).await {
                    Ok((s, immediate)) => {
                        tracing::info!(channel = %channel.name, task = %s.task_id, "submitted upstream");
                        if !s.task_id.is_empty() && !queue::set_upstream(&self.db, &job.id, &self.node, &s).await.unwrap_or(false) {
                            return Err(RunError::LeaseLost);
                        }
                        return Ok((s, immediate));
                    }
                    Err(UpstreamError::Permanent(m)) => return Err(permanent(format!("{}: {m}", channel.name))),
                    Err(UpstreamError::Retryable(m)) => {
                        tracing::warn!(channel = %channel.name, attempt, error = %m, "channel failed; trying the next");
                        last = UpstreamError::Retryable(format!("{}: {m}", channel.name));
                    }
                }
            }
        }
        Err(RunError::Upstream(last))
    }

    /// Polls the task until it ends.
    async fn wait(&self, s: &Submitted, progress: &AtomicU8) -> Result<(Vec<Fetch>, Value), RunError> {
        let every = Duration::from_millis(self.channels.by_name(&s.channel).map_or(2000, |c| c.poll_interval_ms));
        let mut errors = 0;
        loop {
            match self.channels.poll(s).await {
                Ok(Poll::Running { progress: p }) => {
                    errors = 0;
                    if let Some(p) = p {
                        progress.store(p.min(99), Ordering::Relaxed);
                    }
                }
                Ok(Poll::Done(f, v)) => return Ok((f, v)),
                Ok(Poll::Failed(m)) => return Err(permanent(format!("upstream task failed: {m}"))),
                Err(UpstreamError::Retryable(m)) if errors + 1 < self.config.poll_error_limit => {
                    errors += 1;
                    tracing::warn!(error = %m, errors, "poll failed");
                }
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Downloads the outputs into storage and describes them.
    async fn store(&self, job: &Job, channel: &str, fetches: Vec<Fetch>, upstream: &Value) -> Result<Finished, RunError> {
        let many = fetches.len() > 1;
        let mut outputs = Vec::new();
        let mut output_type = default_type(job);
        let mut total = 0u64;
        for (i, fetch) in fetches.into_iter().enumerate() {
            let (content_type, key) = match fetch {
                Fetch::Bytes { bytes, content_type } => {
                    let key = output_key(job, i, many, &content_type);
                    total += bytes.len() as u64;
                    if total > self.config.max_output_bytes {
                        return Err(permanent("outputs exceed jobs.max_output_bytes"));
                    }
                    self.storage.put(&key, &bytes).await.map_err(|e| permanent(e.to_string()))?;
                    (content_type, key)
                }
                Fetch::Url { url, authorized } => {
                    let mut resp = self.channels.download(channel, &url, authorized).await?;
                    let content_type = resp
                        .headers()
                        .get(reqwest::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
                        .filter(|t| t.starts_with("image/") || t.starts_with("video/") || t.starts_with("audio/"))
                        .unwrap_or_else(|| default_type(job));
                    let key = output_key(job, i, many, &content_type);
                    let mut w = self.storage.writer(&key).await.map_err(|e| permanent(e.to_string()))?;
                    while let Some(chunk) = resp.chunk().await.map_err(|e| UpstreamError::Retryable(format!("download: {}", e.without_url())))? {
                        total += chunk.len() as u64;
                        if total > self.config.max_output_bytes {
                            return Err(permanent("outputs exceed jobs.max_output_bytes"));
                        }
                        w.write(&chunk).await.map_err(|e| permanent(e.to_string()))?;
                    }
                    w.finish().await.map_err(|e| permanent(e.to_string()))?;
                    (content_type, key)
                }
            };
            if i == 0 {
                output_type = content_type;
            }
            outputs.push(key);
        }
        if outputs.is_empty() && job.kind != JobKind::VoiceClone {
            return Err(permanent("the upstream finished without an output"));
        }
        let metadata = metadata(job, outputs.len(), upstream, None);
        if job.kind == JobKind::VoiceClone && metadata["voiceId"].is_null() {
            return Err(permanent("the upstream finished without a voice id"));
        }
        let output_url = outputs.first().map(|k| self.storage.signed_url(k, now_ms() / 1000));
        Ok(Finished { outputs, output_type, metadata, output_url })
    }

    /// Speech from the voice agents' engines, as a 16 kHz mono WAV.
    async fn local_voice(&self, job: &Job, engines: &voxgate_agents::Engines, progress: &AtomicU8) -> Result<Finished, RunError> {
        let text = job.input["text"].as_str().unwrap_or_default();
        let speed = job.input["speed"].as_f64().unwrap_or(1.0) as f32;
        let language = job.input["language"].as_str().unwrap_or("en");
        let voice = job.input["voiceId"].as_str().unwrap_or(language);
        let pieces = sentences(text);
        let mut pcm: Vec<i16> = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let mut part = engines.synthesize(Urgency::Later, &job.model, Some(voice), speed, piece).await.map_err(|e| permanent(format!("synthesis: {e}")))?;
            pcm.append(&mut part);
            progress.store(((i + 1) * 95 / pieces.len()) as u8, Ordering::Relaxed);
        }
        if pcm.is_empty() {
            return Err(permanent("synthesis produced no audio"));
        }
        let key = output_key(job, 0, false, "audio/wav");
        self.storage.put(&key, &wav(&pcm, voxgate_agents::tts::SAMPLE_RATE)).await.map_err(|e| permanent(e.to_string()))?;
        let seconds = pcm.len() as f64 / f64::from(voxgate_agents::tts::SAMPLE_RATE);
        let metadata = metadata(job, 1, &Value::Null, Some(seconds));
        let output_url = Some(self.storage.signed_url(&key, now_ms() / 1000));
        Ok(Finished { outputs: vec![key], output_type: "audio/wav".into(), metadata, output_url })
    }
}

/// The text cut after sentence ends, so a long text is spoken piece by
/// piece with progress, and no single synthesis is huge.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if matches!(c, '.' | '!' | '?' | '\n') && cur.chars().any(char::is_alphanumeric) {
            out.push(std::mem::take(&mut cur).trim().to_string());
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// A 16-bit mono PCM WAV file.
fn wav(pcm: &[i16], rate: u32) -> Vec<u8> {
    let data_len = (pcm.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + pcm.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in pcm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// The contract's output type of a kind ("Example Payloads by Job Type").
fn default_type(job: &Job) -> String {
    match job.kind {
        JobKind::Image | JobKind::Photoshoot => "image/png",
        JobKind::Voice => "audio/wav",
        JobKind::VoiceClone => "application/json",
        JobKind::InstantAd if job.input["outputFormat"] == "image" => "image/png",
        _ => "video/mp4",
    }
    .into()
}

fn output_key(job: &Job, i: usize, many: bool, content_type: &str) -> String {
    let ext = extension_for(content_type);
    let name = if many { format!("output-{}.{ext}", i + 1) } else { format!("output.{ext}") };
    Storage::job_key(&job.id, &name)
}

/// The contract's metadata of a kind, from the input, what the upstream
/// reported (`metadata` of its answer) and the measured audio length.
fn metadata(job: &Job, outputs: usize, upstream: &Value, seconds: Option<f64>) -> Value {
    let input = &job.input;
    let up = &upstream["metadata"];
    let duration = seconds.map(|s| json!((s * 100.0).round() / 100.0)).or_else(|| {
        [&up["durationSeconds"], &upstream["seconds"], &input["duration"]].into_iter().find(|v| !v.is_null()).map(|v| match v {
            Value::String(s) => s.parse::<f64>().map(|f| json!(f)).unwrap_or(Value::Null),
            v => v.clone(),
        })
    });
    let mut m = match job.kind {
        JobKind::Image => json!({ "model": job.model, "width": input["width"], "height": input["height"] }),
        JobKind::Video | JobKind::Avatar | JobKind::BRoll | JobKind::TextToVideo => {
            json!({ "model": job.model, "durationSeconds": duration, "resolution": input["resolution"] })
        }
        JobKind::Voice => json!({ "model": job.model, "durationSeconds": duration, "language": input["language"] }),
        JobKind::Clip => json!({ "clipCount": outputs, "viralScores": up.get("viralScores").cloned().unwrap_or(json!([])) }),
        JobKind::Commercial => json!({
            "sceneClips": up.get("sceneClips").cloned().unwrap_or(json!([])),
            "platform": input["platform"],
            "duration": input["duration"],
        }),
        JobKind::Translate => json!({ "outputLanguage": input["outputLanguage"], "durationSeconds": duration }),
        JobKind::InstantAd => json!({ "variationCount": input["count"], "platform": input["platform"], "format": input["outputFormat"] }),
        JobKind::Photoshoot => json!({ "photoCount": outputs, "background": input["background"], "lighting": input["lighting"] }),
        JobKind::VoiceClone => {
            let id = match &upstream["output"] {
                Value::String(s) if !s.starts_with("http") => json!(s),
                Value::Object(o) => o.get("voice_id").or_else(|| o.get("voiceId")).cloned().unwrap_or(Value::Null),
                _ => Value::Null,
            };
            json!({ "voiceId": id, "name": input["name"] })
        }
    };
    // What else the upstream reported, without overriding ours.
    if let (Some(ours), Some(theirs)) = (m.as_object_mut(), up.as_object()) {
        for (k, v) in theirs {
            ours.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_header_describes_the_samples() {
        let w = wav(&[0, 1, -1], 16_000);
        assert_eq!(&w[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(w[4..8].try_into().unwrap()), 36 + 6);
        assert_eq!(u32::from_le_bytes(w[24..28].try_into().unwrap()), 16_000);
        assert_eq!(u32::from_le_bytes(w[40..44].try_into().unwrap()), 6);
        assert_eq!(w.len(), 50);
    }

    #[test]
    fn long_text_is_cut_at_sentence_ends() {
        assert_eq!(sentences("Hello there. How are you?\nFine"), ["Hello there.", "How are you?", "Fine"]);
        assert_eq!(sentences("..."), ["..."]);
        assert!(sentences("  ").is_empty());
    }
}
