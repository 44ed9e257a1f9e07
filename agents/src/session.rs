//! One call's conversation: caller frames in, agent frames and events out.
//!
//! A session is one task. It runs the VAD inline on each 20 ms frame (a
//! Silero window costs well under a millisecond), decides turns, and sends
//! ASR, LLM and TTS work to the inference pool; results come back as
//! messages, so the task never waits on a model. Agent audio leaves one
//! 20 ms frame per caller frame: the caller's RTP clock paces the agent, and
//! stopping the agent (barge-in) takes effect on the very next frame.
//!
//! Barge-in: caller speech while the agent talks (or is about to) pauses the
//! agent at once. If the caller goes on for longer than a backchannel
//! (600 ms) or says a content word, the reply is cut: queued audio dropped,
//! LLM and TTS cancelled, the reply recorded as interrupted with only what
//! was heard, and the caller's words answered. A short "uh-huh" resumes the
//! agent where it paused.
//!
//! Speculation: when the caller pauses and the partial transcript covers
//! all their words, the reply starts at once on those words, its audio held
//! back. If the turn then ends on the same words, the reply is promoted and
//! what it has synthesized plays on the next frame; if the caller goes on,
//! it is dropped (and the local model goes back to its state before it).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::chunker::{Piece, SentenceChunker};
use crate::engines::{Engines, GreetingCache, LOCAL_LLM, PIPER};
use crate::error::AgentError;
use crate::llm::{generate_sliced, prefill, ChatMessage, Generation, LocalConversation, Role};
use crate::pool::Urgency;
use crate::tts::{rms, trim_for_reply};
use crate::turn::{ends_sentence, is_backchannel, TurnConfig};
use crate::vad::VadStream;

/// Samples in one 20 ms frame at 16 kHz, the unit in and out.
pub const FRAME: usize = 320;
const FRAME_MS: u32 = 20;
/// A partial transcript is refreshed after this much new speech, and not
/// before this much speech (Whisper hallucinates on fragments).
const PARTIAL_EVERY_MS: u32 = 400;
const PARTIAL_MIN_MS: usize = 800;
/// Silence kept after the last voiced frame for the final transcription:
/// Whisper places the last word better with a little room after it.
const TAIL_SAMPLES: usize = 16 * 200;
/// Most trailing audio given to a partial decode after the last voiced
/// frame (a pause's decode gets the pause, `TurnConfig::pause_ms`).
const PARTIAL_TAIL_SAMPLES: usize = 16 * 100;
/// A frame this loud (about -36 dBFS) over the agent pauses it before the
/// VAD has decided; the pause lifts after this many frames without speech.
const ONSET_RMS: f32 = 500.0;
const TENTATIVE_PAUSE_FRAMES: u32 = 8;
/// A frame the VAD calls voiced that is 26 dB below the loudest of its
/// utterance is the detector's tail after the speech, not speech.
const TAIL_LEVEL: f32 = 0.05;
/// Longest wait for the local model's token in progress to end (one token
/// takes ~20-30 ms on two cores).
const TOKEN_IN_PROGRESS: Duration = Duration::from_millis(40);

/// An agent as the engine needs it.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub system_prompt: String,
    pub greeting: String,
    pub tts_model: String,
    pub llm_model: String,
    pub language: String,
    pub voice: Option<String>,
    /// Speaking rate, 1.0 = the voice's own.
    pub speed: f32,
    pub max_duration: Option<Duration>,
    /// Phrases that end the call once the agent has said them.
    pub end_call_phrases: Vec<String>,
    pub turn: TurnConfig,
    /// Sampling seed of the local LLM: random per session when `None`; a
    /// fixed one makes a conversation reproducible (tests, debugging).
    pub seed: Option<u64>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            system_prompt: String::new(),
            greeting: String::new(),
            tts_model: PIPER.into(),
            llm_model: LOCAL_LLM.into(),
            language: "en".into(),
            voice: None,
            speed: 1.0,
            max_duration: None,
            end_call_phrases: Vec::new(),
            turn: TurnConfig::default(),
            seed: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    Caller,
    Agent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub speaker: Speaker,
    pub text: String,
    /// Partial transcripts of the caller come before the final one.
    pub is_final: bool,
    /// The agent was cut off: `text` is what the caller heard.
    pub interrupted: bool,
    /// Offset of the first audio of this line from the session start.
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Where the time of one turn went, end of caller speech to first agent
/// audio frame; stage times overlap with waiting (pool queueing included).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnMetrics {
    pub turn: u32,
    /// End of speech (last voiced frame received) to end of turn decided.
    pub endpoint_ms: u32,
    /// Final transcription (0 when the last partial already covered it; the
    /// wait for it when it was still being decoded).
    pub asr_ms: u32,
    /// End of speech to the reply's start on the transcript it answers (a
    /// speculative reply starts on the pause's, before the turn is decided).
    pub reply_start_ms: u32,
    /// The reply's start to its first token.
    pub llm_first_token_ms: u32,
    /// The reply's start to the text of its first piece (the tokens up to
    /// the first phrase).
    pub llm_first_piece_ms: u32,
    /// Synthesis of the first piece of the reply.
    pub tts_first_audio_ms: u32,
    /// End of caller speech to the first agent frame leaving the session.
    pub voice_to_voice_ms: u32,
    /// The reply was started on the pause's partial transcript, before the
    /// turn was decided (LLM and TTS times count from that start).
    pub speculative: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangupReason {
    /// The agent said one of its end-call phrases.
    AgentEnded,
    /// The agent's maximum call duration was reached.
    MaxDuration,
    /// The carrier asked for a closing line ([`Session::close_with`]), now said.
    Requested,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// 20 ms of agent speech, 16 kHz.
    AgentAudio(Vec<i16>),
    /// Drop agent audio queued downstream (barge-in).
    ClearAudio,
    Transcript(Transcript),
    TurnMetrics(TurnMetrics),
    Hangup(HangupReason),
}

enum Input {
    Audio(Vec<i16>, Instant),
    Answered,
    Close(String),
}

/// The handle the carrier (SIP or WebSocket leg) holds. Dropping it ends
/// the session and cancels its work.
pub struct Session {
    input: mpsc::Sender<Input>,
    cancel: CancellationToken,
}

impl Session {
    /// Starts a session. The greeting is synthesized at once (while the
    /// phone rings) and spoken on [`Session::answered`].
    pub fn start(engines: Arc<Engines>, config: AgentConfig) -> Result<(Session, mpsc::Receiver<AgentEvent>), AgentError> {
        engines.check(&config.llm_model, &config.tts_model, &config.language)?;
        let (input_tx, input_rx) = mpsc::channel(64);
        let (events_tx, events_rx) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let core = Core::new(engines, config, events_tx, cancel.clone())?;
        tokio::spawn(core.run(input_rx));
        Ok((Session { input: input_tx, cancel }, events_rx))
    }

    /// The far end answered: the greeting plays, the max-duration clock runs.
    pub async fn answered(&self) {
        let _ = self.input.send(Input::Answered).await;
    }

    /// One 20 ms frame of caller audio (16 kHz), with the time it arrived on
    /// the wire (latency is measured from there).
    pub async fn push_audio(&self, pcm: Vec<i16>, received_at: Instant) {
        let _ = self.input.send(Input::Audio(pcm, received_at)).await;
    }

    /// Stops the conversation: whatever the agent is saying is cut, it says
    /// `line` (not interruptible), then the session reports
    /// `Hangup(Requested)`. Used when the call must end (credits ran out).
    pub async fn close_with(&self, line: &str) {
        let _ = self.input.send(Input::Close(line.to_owned())).await;
    }

    pub fn close(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Results of work sent to the pool, back to the session task.
enum Work {
    Partial { utterance: u64, covered: usize, text: String, confidence: f32 },
    Final { utterance: u64, text: String, confidence: f32, asr_ms: u32 },
    Greeting(Vec<i16>),
    Closing { text: String, pcm: Vec<i16> },
    FirstToken { reply: u64, ms: u32 },
    FirstPiece { reply: u64, ms: u32 },
    Piece { reply: u64, text: String, pcm: Vec<i16>, tts_ms: u32 },
    /// `end_call`: the model asked to hang up after this reply.
    Done { reply: u64, text: String, end_call: bool },
}

/// The latest partial transcript: of which utterance, up to which sample.
struct Partial {
    utterance: u64,
    covered: usize,
    text: String,
    confidence: f32,
}

struct Utterance {
    id: u64,
    pcm: Vec<i16>,
    /// Samples up to the end of the last voiced frame.
    voiced_end: usize,
    /// The loudest frame so far (RMS).
    peak_rms: f32,
    preroll: usize,
    silence_ms: u32,
    last_voice_at: Instant,
    started_ms: u64,
    /// Started while the agent was speaking (or about to).
    over_agent: bool,
    /// Samples when the last partial was started.
    partial_len: usize,
    /// Voiced samples the last partial started covers.
    partial_covered: usize,
}

struct Reply {
    id: u64,
    cancel: CancellationToken,
    pieces: Vec<(String, usize)>,
    played: usize,
    done: bool,
    text: String,
    end_of_speech: Option<Instant>,
    /// When its work began (`started_ms` is when it began to play).
    spawned_at: Instant,
    metrics: TurnMetrics,
    /// When its first frame was sent (on the session's sample clock).
    started_ms: Option<u64>,
    /// Not yet in the history (greetings are added when they start).
    record: bool,
    /// The call ends once this reply has been heard.
    ends_call: bool,
    /// Since when the caller has waited in silence for this reply's work,
    /// while they do (its first piece is not synthesized yet, and it is not
    /// a guess).
    waiting: Arc<Waiting>,
}

impl Reply {
    fn new(id: u64, cancel: CancellationToken, end_of_speech: Option<Instant>, metrics: TurnMetrics) -> Self {
        Reply {
            id,
            cancel,
            pieces: Vec::new(),
            played: 0,
            done: false,
            text: String::new(),
            end_of_speech,
            spawned_at: Instant::now(),
            metrics,
            started_ms: None,
            record: true,
            ends_call: false,
            waiting: Arc::new(Waiting(Mutex::new(end_of_speech))),
        }
    }
}

/// A reply started on the words of a pause, before the turn is decided.
/// Dropping it cancels the reply's work.
struct Speculation {
    utterance: u64,
    /// Voiced samples of the utterance the words cover.
    covered: usize,
    text: String,
    reply: Reply,
    /// Audio synthesized so far, held back until the turn is decided.
    audio: VecDeque<i16>,
    cancel_on_drop: DropGuard,
}

struct Core {
    engines: Arc<Engines>,
    config: AgentConfig,
    events: mpsc::Sender<AgentEvent>,
    cancel: CancellationToken,
    work_tx: mpsc::UnboundedSender<Work>,
    work_rx: mpsc::UnboundedReceiver<Work>,
    vad: VadStream,
    history: Vec<ChatMessage>,
    local: Option<Arc<Mutex<LocalConversation>>>,
    preroll: VecDeque<i16>,
    utterance: Option<Utterance>,
    next_id: u64,
    partial: Option<Partial>,
    /// The partial decode in flight, by its abort flag.
    partial_job: Option<Arc<AtomicBool>>,
    /// The utterance whose final transcript is awaited, and how it ended.
    finishing: Option<(Utterance, Instant)>,
    queue: VecDeque<i16>,
    paused: bool,
    /// Frames since a loud frame paused the agent without the VAD's word.
    tentative_pause: Option<u32>,
    reply: Option<Reply>,
    speculation: Option<Speculation>,
    greeting: Option<Vec<i16>>,
    answered: bool,
    hangup_after_reply: Option<HangupReason>,
    /// Saying the closing line: the caller is no longer listened to.
    closing: bool,
    turns: u32,
    samples_in: u64,
}

impl Core {
    fn new(engines: Arc<Engines>, config: AgentConfig, events: mpsc::Sender<AgentEvent>, cancel: CancellationToken) -> Result<Self, AgentError> {
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let mut history = Vec::new();
        let local = if config.llm_model == LOCAL_LLM { engines.llm.as_ref() } else { None };
        if !config.system_prompt.trim().is_empty() {
            let prompt = match local {
                Some(llm) => llm.fit_system_prompt(config.system_prompt.trim())?,
                None => config.system_prompt.trim().to_string(),
            };
            history.push(ChatMessage::new(Role::System, prompt));
        }
        let local = local.map(|llm| Arc::new(Mutex::new(llm.conversation(config.seed.unwrap_or_else(rand_seed)))));
        Ok(Core {
            vad: engines.vad_stream(),
            engines,
            config,
            events,
            cancel,
            work_tx,
            work_rx,
            history,
            local,
            preroll: VecDeque::new(),
            utterance: None,
            next_id: 1,
            partial: None,
            partial_job: None,
            finishing: None,
            queue: VecDeque::new(),
            paused: false,
            tentative_pause: None,
            reply: None,
            speculation: None,
            greeting: None,
            answered: false,
            hangup_after_reply: None,
            closing: false,
            turns: 0,
            samples_in: 0,
        })
    }

    async fn run(mut self, mut input: mpsc::Receiver<Input>) {
        if let (Some(conv), Some(llm)) = (self.local.clone(), self.engines.llm.clone()) {
            let messages = self.history.clone();
            if !messages.is_empty() {
                let pool = self.engines.pool.clone();
                tokio::spawn(async move {
                    if let Err(e) = prefill(&pool, &llm, &conv, messages).await {
                        tracing::warn!(error = %e, "prefill failed");
                    }
                });
            }
        }
        if let Some(text) = crate::chunker::speakable(&self.config.greeting) {
            let (engines, config, tx) = (self.engines.clone(), self.config.clone(), self.work_tx.clone());
            let key = GreetingCache::key(&config.tts_model, config.voice.as_deref(), config.speed, &text);
            match engines.greetings.get(&key) {
                Some(pcm) => {
                    let _ = tx.send(Work::Greeting(pcm.as_ref().clone()));
                }
                None => {
                    tokio::spawn(async move {
                        match synthesize(&engines, &config, Urgency::now(), &Piece::whole(&text)).await {
                            Ok(pcm) => {
                                engines.greetings.put(key, Arc::new(pcm.clone()));
                                let _ = tx.send(Work::Greeting(pcm));
                            }
                            Err(e) => tracing::warn!(error = %e, "greeting synthesis failed"),
                        }
                    });
                }
            }
        }
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let max_duration = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let ok = tokio::select! {
                _ = self.cancel.cancelled() => break,
                i = input.recv() => match i {
                    Some(Input::Audio(pcm, at)) => self.on_frame(pcm, at).await,
                    Some(Input::Answered) => {
                        self.answered = true;
                        deadline = self.config.max_duration.map(|d| tokio::time::Instant::now() + d);
                        self.start_greeting();
                        self.play_first_frame().await
                    }
                    Some(Input::Close(line)) => {
                        self.begin_closing(line).await;
                        true
                    }
                    None => break,
                },
                Some(w) = self.work_rx.recv() => self.on_work(w).await && self.play_first_frame().await,
                _ = max_duration => {
                    let _ = self.events.send(AgentEvent::Hangup(HangupReason::MaxDuration)).await;
                    false
                }
            };
            if !ok {
                break;
            }
        }
        // A reply the end of the call cut short is still part of the call.
        // The holder may have stopped reading: never wait on it for long.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), self.cut_reply()).await;
    }

    fn now_ms(&self) -> u64 {
        self.samples_in * 1000 / 16_000
    }

    fn agent_busy(&self) -> bool {
        self.reply.is_some() || !self.queue.is_empty()
    }

    /// Returns false when the session is over.
    async fn on_frame(&mut self, pcm: Vec<i16>, at: Instant) -> bool {
        self.samples_in += pcm.len() as u64;
        if self.closing {
            return self.play_frame().await;
        }
        let probs = match self.vad.push(&pcm) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "vad failed");
                Vec::new()
            }
        };
        let voiced = probs.iter().any(|p| *p >= self.config.turn.threshold);
        // The VAD needs a window or two to be sure; a loud frame over the
        // agent pauses it at once, and it resumes if no speech follows.
        if self.utterance.is_none() && !self.paused && !self.queue.is_empty() && rms(&pcm) > ONSET_RMS {
            self.paused = true;
            self.tentative_pause = Some(0);
            self.emit(AgentEvent::ClearAudio).await;
        }
        if let Some(n) = self.tentative_pause {
            if self.utterance.is_some() || voiced {
                self.tentative_pause = None;
            } else if n + 1 >= TENTATIVE_PAUSE_FRAMES {
                self.tentative_pause = None;
                self.paused = false;
            } else {
                self.tentative_pause = Some(n + 1);
            }
        }
        match self.utterance.as_mut() {
            None if voiced => {
                let preroll: Vec<i16> = self.preroll.drain(..).collect();
                let over_agent = self.agent_busy() && self.finishing.is_none();
                let id = self.next_id;
                self.next_id += 1;
                let mut u = Utterance {
                    id,
                    preroll: preroll.len(),
                    pcm: preroll,
                    voiced_end: 0,
                    peak_rms: rms(&pcm),
                    silence_ms: 0,
                    last_voice_at: at,
                    started_ms: self.now_ms().saturating_sub(FRAME_MS as u64),
                    over_agent,
                    partial_len: 0,
                    partial_covered: 0,
                };
                u.pcm.extend_from_slice(&pcm);
                u.voiced_end = u.pcm.len();
                self.utterance = Some(u);
                if over_agent && (!self.paused || self.tentative_pause.is_some()) {
                    self.tentative_pause = None;
                    if !self.paused {
                        self.paused = true;
                        self.emit(AgentEvent::ClearAudio).await;
                    }
                }
            }
            None => {
                self.preroll.extend(pcm.iter().copied());
                let keep = self.config.turn.preroll_ms as usize * 16;
                while self.preroll.len() > keep {
                    self.preroll.pop_front();
                }
            }
            Some(u) => {
                u.pcm.extend_from_slice(&pcm);
                let level = rms(&pcm);
                u.peak_rms = u.peak_rms.max(level);
                // Silero goes on hearing voice for 40-60 ms after the sound
                // stops: a voiced frame this far below the utterance's
                // loudest is that tail, and the pause is timed from before it.
                let sounding = voiced && level >= u.peak_rms * TAIL_LEVEL;
                if sounding {
                    u.silence_ms = 0;
                    u.voiced_end = u.pcm.len();
                    u.last_voice_at = at;
                    // The caller goes on: the reply started on the pause answers too little.
                    self.speculation.take_if(|s| s.covered < u.voiced_end);
                } else {
                    u.silence_ms += FRAME_MS;
                }
                let speech_ms = ((u.voiced_end - u.preroll) / 16) as u32;
                if u.over_agent && speech_ms > self.config.turn.backchannel_max_ms {
                    u.over_agent = false;
                    self.barge_in().await;
                }
                self.maybe_partial();
                self.maybe_speculate();
                if self.turn_ended() {
                    let u = self.utterance.take().expect("utterance");
                    self.end_turn(u).await;
                }
            }
        }
        self.play_frame().await
    }

    fn turn_ended(&self) -> bool {
        let Some(u) = &self.utterance else { return false };
        if u.silence_ms >= self.config.turn.end_silence_ms {
            return true;
        }
        if u.silence_ms >= self.config.turn.early_end_silence_ms {
            if let Some(p) = &self.partial {
                return p.utterance == u.id && p.covered >= u.voiced_end && ends_sentence(&p.text);
            }
        }
        false
    }

    fn maybe_partial(&mut self) {
        let Some(u) = self.utterance.as_mut() else { return };
        // Only speech the last partial did not hear is worth a decode: the
        // same words again during a pause would only hold up the pool the
        // reply is about to need.
        let new_speech = u.partial_covered < u.voiced_end;
        // A step falls while the caller speaks: in a silence the pause's
        // decode is due within `pause_ms`, and a step's would hold it up.
        let step = u.silence_ms == 0 && u.pcm.len() >= u.partial_len + PARTIAL_EVERY_MS as usize * 16;
        let pause_ms = self.config.turn.pause_ms;
        let paused = u.silence_ms >= pause_ms;
        if paused {
            // A step's decode that cannot cover the speech would hold the
            // thread the pause's decode needs for ~200 ms.
            abort_stale_partial(&self.partial_job, u);
        }
        if self.partial_job.is_some() || !new_speech || !(step || paused) || u.voiced_end - u.preroll < PARTIAL_MIN_MS * 16 {
            return;
        }
        // Another call's decode holds every ASR thread: a step's decode
        // would take a pool slot only to wait (the next frame tries again).
        if !paused && self.engines.asr.busy() {
            return;
        }
        // Up to the pause (at most 100 ms) past the last voiced frame when it
        // has arrived: a window cut right at the end of speech clips the last
        // phoneme, and the decode of a sentence's end changes with where the
        // cut falls.
        let tail = (pause_ms as usize * 16).min(PARTIAL_TAIL_SAMPLES);
        let end = (u.voiced_end + tail).min(u.pcm.len()).max(u.partial_len.min(u.pcm.len()));
        let audio = to_f32(&u.pcm[..end]);
        // Only speech heard with its tail counts as covered: a partial cut
        // on the last voiced frame may have lost the last word, and must not
        // become the final transcript (the pause brings a decode with it).
        let covered = if end >= u.voiced_end + tail { u.voiced_end } else { end.saturating_sub(tail) };
        let (engines, lang, tx, id) = (self.engines.clone(), self.config.language.clone(), self.work_tx.clone(), u.id);
        let abort = Arc::new(AtomicBool::new(false));
        let flag = abort.clone();
        let job = move || {
            // Queued, it may have gone stale before it started.
            if flag.load(Ordering::Relaxed) {
                return Default::default();
            }
            engines.transcribe(&audio, &lang, Some(flag)).unwrap_or_default()
        };
        let pool = self.engines.pool.clone();
        // Sent once the decode's pool slot is free again: whoever reads it
        // sees the pool as it is without it.
        let send = move |(text, confidence): (String, f32)| {
            let _ = tx.send(Work::Partial { utterance: id, covered, text, confidence });
        };
        // The pause's decode is queued with the work callers wait for: the
        // caller is silent, and whether the turn ends early and what the
        // reply starts on depend on it (under load, a slot is never free
        // while others queue). A step's is optional and only taken free.
        if paused {
            let urgency = Urgency::Now(u.last_voice_at);
            tokio::spawn(async move { send(pool.run(urgency, job).await.unwrap_or_default()) });
        } else {
            let Some(decode) = pool.try_run(job) else { return };
            tokio::spawn(async move { send(decode.await.unwrap_or_default()) });
        }
        self.partial_job = Some(abort);
        u.partial_len = u.pcm.len();
        u.partial_covered = covered;
    }

    async fn end_turn(&mut self, u: Utterance) {
        let decided = Instant::now();
        if let Some(p) = self.partial.take() {
            if p.utterance == u.id && p.covered >= u.voiced_end {
                self.on_final(u, decided, p.text, p.confidence, 0).await;
                return;
            }
        }
        // A partial of all the speech is already being decoded: it will be
        // the final transcript (decoding the same words again would cost as
        // long once more).
        if self.partial_job.is_some() && u.partial_covered >= u.voiced_end {
            self.finishing = Some((u, decided));
            return;
        }
        abort_stale_partial(&self.partial_job, &u);
        let audio = to_f32(&u.pcm[..(u.voiced_end + TAIL_SAMPLES).min(u.pcm.len())]);
        let (engines, lang, tx, id) = (self.engines.clone(), self.config.language.clone(), self.work_tx.clone(), u.id);
        let urgency = Urgency::Now(u.last_voice_at);
        self.finishing = Some((u, decided));
        tokio::spawn(async move {
            let started = Instant::now();
            let pool = engines.pool.clone();
            let result = pool.run(urgency, move || engines.transcribe(&audio, &lang, None)).await;
            let (text, confidence) = match result {
                Ok(Ok(t)) => t,
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!(error = %e, "transcription failed");
                    (String::new(), 0.0)
                }
            };
            let _ = tx.send(Work::Final { utterance: id, text, confidence, asr_ms: started.elapsed().as_millis() as u32 });
        });
    }

    async fn on_final(&mut self, u: Utterance, decided: Instant, text: String, confidence: f32, asr_ms: u32) {
        self.partial = None;
        // Anything but a reply to exactly these words is dropped (and so cancelled).
        let speculation = self.speculation.take().filter(|s| s.utterance == u.id && s.text == text);
        if u.over_agent {
            if is_backchannel(&text, confidence) {
                // An acknowledgement: the agent goes on where it paused.
                self.paused = false;
                return;
            }
            self.barge_in().await;
        }
        if text.is_empty() {
            if self.paused {
                // Noise, not speech: do not leave the agent silent.
                self.paused = false;
            }
            return;
        }
        let end_ms = u.started_ms + ((u.voiced_end - u.preroll) as u64 / 16);
        self.emit(AgentEvent::Transcript(Transcript { speaker: Speaker::Caller, text: text.clone(), is_final: true, interrupted: false, start_ms: u.started_ms, end_ms }))
            .await;
        if let Some(r) = self.reply.take() {
            // The caller spoke again before the reply was heard: answer the
            // latest words, not both.
            r.cancel.cancel();
            self.queue.clear();
        }
        self.paused = false;
        self.history.push(ChatMessage::new(Role::User, text));
        self.turns += 1;
        let metrics = TurnMetrics { turn: self.turns, endpoint_ms: ms_between(u.last_voice_at, decided), asr_ms, ..TurnMetrics::default() };
        match speculation {
            Some(s) => self.promote(s, u.last_voice_at, metrics),
            None => {
                let messages = self.history.clone();
                let reply = self.spawn_reply(messages, Some(u.last_voice_at), metrics);
                self.reply = Some(reply);
            }
        }
    }

    /// The turn ended on the words the speculative reply answers: it becomes
    /// the reply, and what it has synthesized plays from the next frame.
    fn promote(&mut self, s: Speculation, end_of_speech: Instant, metrics: TurnMetrics) {
        s.cancel_on_drop.disarm();
        let mut reply = s.reply;
        if reply.pieces.is_empty() {
            // The caller now waits for it, and has since their words ended.
            reply.waiting.set(Some(end_of_speech));
        }
        reply.end_of_speech = Some(end_of_speech);
        let made = &reply.metrics;
        reply.metrics = TurnMetrics {
            llm_first_token_ms: made.llm_first_token_ms,
            llm_first_piece_ms: made.llm_first_piece_ms,
            tts_first_audio_ms: made.tts_first_audio_ms,
            speculative: true,
            ..metrics
        };
        if reply.done && reply.ends_call {
            self.hangup_after_reply.get_or_insert(HangupReason::AgentEnded);
        }
        self.queue.extend(s.audio);
        self.reply = Some(reply);
    }

    /// Starts a reply on the latest partial if it covers every word said so
    /// far and the caller has paused: by the time the turn is decided, the
    /// first words of the answer may be synthesized already.
    fn maybe_speculate(&mut self) {
        if !self.config.turn.speculate || self.closing || self.reply.is_some() || !self.queue.is_empty() || self.finishing.is_some() {
            return;
        }
        let (Some(u), Some(p)) = (self.utterance.as_ref(), self.partial.as_ref()) else { return };
        if p.utterance != u.id || p.covered < u.voiced_end || u.silence_ms < self.config.turn.pause_ms || u.over_agent || p.text.trim().is_empty() {
            return;
        }
        if self.speculation.as_ref().is_some_and(|s| s.utterance == u.id && s.text == p.text) {
            return;
        }
        // A guess is worth it only on spare capacity: under load a wrong one
        // would delay other calls' replies that are certain.
        if self.engines.pool.idle_slots() == 0 {
            return;
        }
        let (utterance, covered, text) = (u.id, p.covered, p.text.clone());
        // A guess on fewer words is replaced (and so cancelled).
        self.speculation = None;
        let mut messages = self.history.clone();
        messages.push(ChatMessage::new(Role::User, text.clone()));
        let reply = self.spawn_reply(messages, None, TurnMetrics::default());
        let cancel_on_drop = reply.cancel.clone().drop_guard();
        self.speculation = Some(Speculation { utterance, covered, text, reply, audio: VecDeque::new(), cancel_on_drop });
    }

    /// Reads the caller's words so far into the local model while they are
    /// still speaking, when the pool is idle: the reply then only has the last
    /// words to read when the turn ends. Not in a pause (the pause's decode
    /// and the reply it starts need the cores and the model next).
    fn listen_ahead(&mut self) {
        let (Some(conv), Some(llm)) = (self.local.clone(), self.engines.llm.clone()) else { return };
        if self.closing || self.reply.is_some() || self.speculation.is_some() || self.finishing.is_some() || !self.queue.is_empty() {
            return;
        }
        let (Some(u), Some(p)) = (self.utterance.as_ref(), self.partial.as_ref()) else { return };
        if p.utterance != u.id || u.over_agent || u.silence_ms >= self.config.turn.pause_ms {
            return;
        }
        // Only on a pool with nothing else to do: under load the slot is
        // better left to a decode or a reply a caller waits for.
        if !self.engines.pool.idle() {
            return;
        }
        // The last word may be cut off, or heard otherwise with more audio.
        let Some((words, _)) = p.text.trim_end().rsplit_once(char::is_whitespace) else { return };
        let (words, history) = (words.to_string(), self.history.clone());
        let job = move || {
            // Busy with a reply being dropped: not worth waiting for.
            let Ok(mut conv) = conv.try_lock() else { return };
            // The model lets go of the same oldest lines as for the reply.
            if let Err(e) = llm.listen_ahead(&mut conv, &history, &words) {
                tracing::debug!(error = %e, "listen-ahead failed");
            }
        };
        let _ = self.engines.pool.try_run(job);
    }

    /// The caller took the turn: stop the agent now and keep what was heard.
    async fn barge_in(&mut self) {
        self.paused = false;
        self.queue.clear();
        self.emit(AgentEvent::ClearAudio).await;
        self.cut_reply().await;
    }

    /// Cancels the reply in flight; what the caller heard of it goes into
    /// the transcript (interrupted) and the conversation's memory.
    async fn cut_reply(&mut self) {
        if let Some(r) = self.reply.take() {
            r.cancel.cancel();
            let heard = heard_text(&r.pieces, r.played);
            if r.started_ms.is_some() {
                self.emit(AgentEvent::Transcript(Transcript {
                    speaker: Speaker::Agent,
                    text: heard.clone(),
                    is_final: true,
                    interrupted: true,
                    start_ms: r.started_ms.unwrap_or_default(),
                    end_ms: self.now_ms(),
                }))
                .await;
            }
            if !heard.is_empty() {
                self.history.push(ChatMessage::new(Role::Assistant, heard));
            }
        }
    }

    fn start_greeting(&mut self) {
        let Some(pcm) = self.greeting.take() else { return };
        let text = crate::chunker::speakable(&self.config.greeting).unwrap_or_default();
        self.history.push(ChatMessage::new(Role::Assistant, text.clone()));
        self.start_prepared(text, pcm);
    }

    /// Cuts the conversation short: the reply in flight is cancelled, the
    /// caller's turn dropped, and the closing line synthesized.
    async fn begin_closing(&mut self, line: String) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.hangup_after_reply = Some(HangupReason::Requested);
        self.utterance = None;
        self.finishing = None;
        self.speculation = None;
        self.barge_in().await;
        let (engines, config, tx) = (self.engines.clone(), self.config.clone(), self.work_tx.clone());
        tokio::spawn(async move {
            let text = crate::chunker::speakable(&line).unwrap_or_default();
            let pcm = if text.is_empty() {
                Vec::new()
            } else {
                synthesize(&engines, &config, Urgency::now(), &Piece::whole(&text)).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "closing line synthesis failed");
                    Vec::new()
                })
            };
            let _ = tx.send(Work::Closing { text, pcm });
        });
    }

    /// Speaks audio synthesized ahead (greeting, closing line) as a reply.
    fn start_prepared(&mut self, text: String, pcm: Vec<i16>) {
        let id = self.next_id;
        self.next_id += 1;
        self.queue.extend(pcm.iter().copied());
        let mut reply = Reply::new(id, CancellationToken::new(), None, TurnMetrics::default());
        reply.pieces.push((text.clone(), pcm.len()));
        reply.done = true;
        reply.text = text;
        reply.record = false;
        self.reply = Some(reply);
    }

    /// Starts the LLM → TTS job answering `messages`; its work comes back
    /// tagged with the returned reply's id.
    fn spawn_reply(&mut self, messages: Vec<ChatMessage>, end_of_speech: Option<Instant>, metrics: TurnMetrics) -> Reply {
        let id = self.next_id;
        self.next_id += 1;
        let cancel = self.cancel.child_token();
        let reply = Reply::new(id, cancel.clone(), end_of_speech, metrics);
        let job = ReplyJob {
            engines: self.engines.clone(),
            config: self.config.clone(),
            messages,
            local: self.local.clone(),
            id,
            cancel,
            waiting: reply.waiting.clone(),
            tx: self.work_tx.clone(),
        };
        tokio::spawn(job.run());
        reply
    }

    async fn on_work(&mut self, w: Work) -> bool {
        match w {
            Work::Partial { utterance, covered, text, confidence } => {
                self.partial_job = None;
                if let Some((u, decided)) = self.finishing.take() {
                    if u.id == utterance && covered >= u.voiced_end {
                        let waited = ms_between(decided, Instant::now());
                        self.on_final(u, decided, text, confidence, waited).await;
                        return true;
                    }
                    self.finishing = Some((u, decided));
                }
                let current = self.utterance.as_ref().map(|u| u.id) == Some(utterance);
                if current && !text.is_empty() {
                    let start_ms = self.utterance.as_ref().map_or(0, |u| u.started_ms);
                    self.emit(AgentEvent::Transcript(Transcript { speaker: Speaker::Caller, text: text.clone(), is_final: false, interrupted: false, start_ms, end_ms: self.now_ms() }))
                        .await;
                    self.partial = Some(Partial { utterance, covered, text, confidence });
                    self.maybe_speculate();
                    self.listen_ahead();
                }
            }
            Work::Final { utterance, text, confidence, asr_ms } => {
                if let Some((u, decided)) = self.finishing.take() {
                    if u.id == utterance {
                        self.on_final(u, decided, text, confidence, asr_ms).await;
                    } else {
                        self.finishing = Some((u, decided));
                    }
                }
            }
            Work::Greeting(pcm) => {
                self.greeting = Some(pcm);
                if self.answered && !self.closing && self.reply.is_none() && self.turns == 0 {
                    self.start_greeting();
                }
            }
            Work::Closing { text, pcm } => {
                if pcm.is_empty() {
                    self.emit(AgentEvent::Hangup(HangupReason::Requested)).await;
                    return false;
                }
                self.start_prepared(text, pcm);
            }
            Work::FirstToken { reply, ms } => {
                if let Some((r, _)) = self.reply_by_id(reply) {
                    r.metrics.llm_first_token_ms = ms;
                }
            }
            Work::FirstPiece { reply, ms } => {
                if let Some((r, _)) = self.reply_by_id(reply) {
                    r.metrics.llm_first_piece_ms = ms;
                }
            }
            Work::Piece { reply, text, pcm, tts_ms } => {
                if let Some((r, audio)) = self.reply_by_id(reply) {
                    if r.pieces.is_empty() {
                        r.metrics.tts_first_audio_ms = tts_ms;
                    }
                    r.pieces.push((text, pcm.len()));
                    audio.extend(pcm);
                }
            }
            Work::Done { reply, text, end_call } => {
                let lower = text.to_lowercase();
                let said_end = self.config.end_call_phrases.iter().any(|p| !p.trim().is_empty() && lower.contains(&p.trim().to_lowercase()));
                let is_current = self.reply.as_ref().is_some_and(|r| r.id == reply);
                if let Some((r, _)) = self.reply_by_id(reply) {
                    r.done = true;
                    r.ends_call = end_call || said_end;
                    r.text = text;
                    if is_current && r.ends_call {
                        self.hangup_after_reply.get_or_insert(HangupReason::AgentEnded);
                    }
                }
            }
        }
        true
    }

    /// The reply `id` (the current one or the speculative one) and where its
    /// audio goes: the outgoing queue, or held back with the speculation.
    fn reply_by_id(&mut self, id: u64) -> Option<(&mut Reply, &mut VecDeque<i16>)> {
        if let Some(r) = self.reply.as_mut().filter(|r| r.id == id) {
            return Some((r, &mut self.queue));
        }
        self.speculation.as_mut().filter(|s| s.reply.id == id).map(|s| (&mut s.reply, &mut s.audio))
    }

    /// Sends one agent frame if the agent has something to say and is not
    /// paused; finishes the reply once all of it was played.
    async fn play_frame(&mut self) -> bool {
        if self.paused || self.queue.is_empty() {
            return self.maybe_finish_reply().await;
        }
        let n = self.queue.len().min(FRAME);
        let mut frame: Vec<i16> = self.queue.drain(..n).collect();
        frame.resize(FRAME, 0);
        let now_ms = self.now_ms();
        let mut first = None;
        if let Some(r) = self.reply.as_mut() {
            r.played += n;
            if r.started_ms.is_none() {
                r.started_ms = Some(now_ms);
                if let Some(eos) = r.end_of_speech {
                    r.metrics.voice_to_voice_ms = ms_between(eos, Instant::now());
                    r.metrics.reply_start_ms = ms_between(eos, r.spawned_at);
                    first = Some(r.metrics.clone());
                }
            }
        }
        self.emit(AgentEvent::AgentAudio(frame)).await;
        if let Some(m) = first {
            self.emit(AgentEvent::TurnMetrics(m)).await;
        }
        self.maybe_finish_reply().await
    }

    /// Sends the first frame of what the agent says as soon as its audio is
    /// here. The caller's frames pace the rest, but the next of them is up to
    /// 20 ms away, and the media leg then holds the frame for its next tick:
    /// sent now, it is on the wire ~20 ms sooner, and the frames after it
    /// still go one per caller frame.
    async fn play_first_frame(&mut self) -> bool {
        let due = !self.paused && !self.queue.is_empty() && self.reply.as_ref().is_some_and(|r| r.started_ms.is_none());
        if due {
            return self.play_frame().await;
        }
        true
    }

    async fn maybe_finish_reply(&mut self) -> bool {
        let finished = self.reply.as_ref().is_some_and(|r| r.done && self.queue.is_empty() && !self.paused);
        if !finished {
            return true;
        }
        let r = self.reply.take().expect("reply");
        let text = if r.record { r.text.trim().to_string() } else { r.pieces.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join(" ") };
        if !text.is_empty() {
            self.emit(AgentEvent::Transcript(Transcript {
                speaker: Speaker::Agent,
                text: text.clone(),
                is_final: true,
                interrupted: false,
                start_ms: r.started_ms.unwrap_or_else(|| self.now_ms()),
                end_ms: self.now_ms(),
            }))
            .await;
            if r.record {
                self.history.push(ChatMessage::new(Role::Assistant, text));
            }
        }
        if let Some(reason) = self.hangup_after_reply {
            self.emit(AgentEvent::Hangup(reason)).await;
            return false;
        }
        true
    }

    async fn emit(&self, e: AgentEvent) {
        let _ = self.events.send(e).await;
    }
}

/// One reply: LLM text streamed through the chunker into TTS, each piece
/// sent back to the session as soon as it is synthesized.
struct ReplyJob {
    engines: Arc<Engines>,
    config: AgentConfig,
    messages: Vec<ChatMessage>,
    local: Option<Arc<Mutex<LocalConversation>>>,
    id: u64,
    cancel: CancellationToken,
    /// Shared with the session's [`Reply`]: how its pool work is queued.
    waiting: Arc<Waiting>,
    tx: mpsc::UnboundedSender<Work>,
}

impl ReplyJob {
    async fn run(self) {
        let (text_tx, mut text_rx) = mpsc::channel::<String>(256);
        // The local model pauses while the first piece is voiced: that audio
        // is what the caller waits for, the rest of the text is not needed
        // before it has played (a second or more), and on two cores the
        // model's next tokens would slow the synthesis down.
        let (hold_tx, hold_rx) = watch::channel(false);
        let started = Instant::now();
        let generation = self.generate(text_tx, hold_rx);
        let speak = async {
            let mut chunker = SentenceChunker::new(self.config.turn.first_piece_words as usize);
            let mut first = true;
            let mut cut_one = false;
            let mut spoken = false;
            let piece_cut = |cut_one: &mut bool| {
                if !std::mem::replace(cut_one, true) {
                    let _ = self.tx.send(Work::FirstPiece { reply: self.id, ms: started.elapsed().as_millis() as u32 });
                }
            };
            while let Some(text) = text_rx.recv().await {
                if first {
                    first = false;
                    let _ = self.tx.send(Work::FirstToken { reply: self.id, ms: started.elapsed().as_millis() as u32 });
                }
                for piece in chunker.push(&text) {
                    piece_cut(&mut cut_one);
                    spoken |= self.speak(&piece, (!spoken).then_some(&hold_tx)).await;
                }
            }
            if let Some(piece) = chunker.finish() {
                piece_cut(&mut cut_one);
                spoken |= self.speak(&piece, None).await;
            }
            spoken
        };
        let (result, spoken) = tokio::join!(generation, speak);
        let (text, end_call) = match result {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(error = %e, "language model failed; saying the fallback line");
                let line = self.engines.config.fallback_line.clone();
                if !self.cancel.is_cancelled() {
                    self.speak(&Piece::whole(&line), None).await;
                }
                (line, false)
            }
        };
        let _ = spoken;
        let _ = self.tx.send(Work::Done { reply: self.id, text, end_call });
    }

    /// The reply's text, and whether the model asked to end the call (only
    /// remote models get the `end_call` tool; the local 135M model cannot
    /// call tools reliably and ends calls through end-call phrases).
    async fn generate(&self, out: mpsc::Sender<String>, hold: watch::Receiver<bool>) -> Result<(String, bool), AgentError> {
        match (&self.local, &self.engines.llm) {
            (Some(conv), Some(llm)) => {
                let on_text = move |t: &str| {
                    let _ = out.blocking_send(t.to_string());
                };
                let waiting = self.waiting.clone();
                let urgency = move || waiting.urgency();
                let reply = generate_sliced(&self.engines.pool, llm, conv, self.messages.clone(), Generation::AGENT, &self.cancel, urgency, Some(hold), on_text).await?;
                Ok((reply.text, false))
            }
            _ => {
                let remote = self
                    .engines
                    .remote_llms
                    .iter()
                    .find(|r| r.serves(&self.config.llm_model))
                    .ok_or_else(|| AgentError::Unavailable(format!("llmModel '{}' is not configured", self.config.llm_model)))?;
                let reply = remote.generate(&self.config.llm_model, &self.messages, &out, &self.cancel).await?;
                Ok((reply.text, reply.end_call))
            }
        }
    }

    /// Voices `piece` and queues its audio; `hold` is set meanwhile.
    async fn speak(&self, piece: &Piece, hold: Option<&watch::Sender<bool>>) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        let started = Instant::now();
        if let Some(h) = hold {
            h.send_replace(true);
            // With this agent's Piper on every core (`tts_threads`): when
            // the only other work is this reply's model (it holds its
            // conversation while it runs), its token in progress ends
            // first, so the piece gets every core.
            let pool = &self.engines.pool;
            let model_running = self.local.as_ref().is_some_and(|c| c.try_lock().is_err());
            if self.engines.wide_tts(&self.config.tts_model) && model_running && pool.size() > 1 && pool.idle_but_one() {
                pool.idle_within(TOKEN_IN_PROGRESS).await;
            }
        }
        let synthesized = synthesize(&self.engines, &self.config, self.waiting.urgency(), piece).await;
        if let Some(h) = hold {
            h.send_replace(false);
        }
        match synthesized {
            Ok(pcm) if !pcm.is_empty() && !self.cancel.is_cancelled() => {
                let tts_ms = started.elapsed().as_millis() as u32;
                // Audio to play: the rest of this reply has slack.
                self.waiting.set(None);
                self.tx.send(Work::Piece { reply: self.id, text: piece.text.clone(), pcm, tts_ms }).is_ok()
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "synthesis failed");
                false
            }
        }
    }
}

/// `piece` in the agent's voice, 16 kHz, ready to play: sound from the
/// first frame on. A piece cut inside its sentence is voiced as going on
/// (a comma's intonation and a short pause, not a full stop's).
async fn synthesize(engines: &Arc<Engines>, config: &AgentConfig, urgency: Urgency, piece: &Piece) -> Result<Vec<i16>, AgentError> {
    let voiced = if piece.continues { Cow::Owned(format!("{},", piece.text)) } else { Cow::Borrowed(piece.text.as_str()) };
    let pcm = engines.synthesize(urgency, &config.tts_model, config.voice.as_deref(), config.speed, &voiced).await?;
    Ok(trim_for_reply(pcm, piece.continues))
}

/// Since when a caller has waited for a reply's work, while they do: its
/// pool jobs go before those of callers who have waited less.
struct Waiting(Mutex<Option<Instant>>);

impl Waiting {
    fn set(&self, since: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }

    fn urgency(&self) -> Urgency {
        match *self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(since) => Urgency::Now(since),
            None => Urgency::Later,
        }
    }
}

/// What the caller heard of a reply cut after `played` samples: the pieces
/// played in full, and the share of words of the piece that was playing.
fn heard_text(pieces: &[(String, usize)], played: usize) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut at = 0;
    for (text, len) in pieces {
        if played >= at + len {
            out.extend(text.split_whitespace());
        } else if played > at {
            let words: Vec<&str> = text.split_whitespace().collect();
            let n = (words.len() * (played - at)) / (*len).max(1);
            out.extend(&words[..n]);
            break;
        } else {
            break;
        }
        at += len;
    }
    out.join(" ")
}

fn to_f32(pcm: &[i16]) -> Vec<f32> {
    pcm.iter().map(|s| f32::from(*s) / 32768.0).collect()
}

fn ms_between(a: Instant, b: Instant) -> u32 {
    b.saturating_duration_since(a).as_millis() as u32
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

/// Stops the partial decode in flight if it cannot cover `u`'s speech (it
/// was started before the last voiced frame): its text is of no use to the
/// turn's end, and it holds the ASR thread a decode that can is waiting for.
fn abort_stale_partial(job: &Option<Arc<AtomicBool>>, u: &Utterance) {
    if let Some(abort) = job {
        if u.partial_covered < u.voiced_end {
            abort.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::heard_text;

    #[test]
    fn heard_text_cuts_inside_the_playing_piece() {
        let pieces = vec![("We open at nine.".to_string(), 1000), ("We close at five today.".to_string(), 1000)];
        assert_eq!(heard_text(&pieces, 500), "We open");
        assert_eq!(heard_text(&pieces, 1000), "We open at nine.");
        assert_eq!(heard_text(&pieces, 1600), "We open at nine. We close at");
        assert_eq!(heard_text(&pieces, 5000), "We open at nine. We close at five today.");
    }
}
