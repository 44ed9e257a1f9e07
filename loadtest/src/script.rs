//! The caller's side of one call: what it says, when, and what it measures
//! about what it hears.
//!
//! All times are taken at the wire: a packet's arrival (`AudioFrame::
//! arrived_at`, the kernel's receive time, before our jitter buffer's wait)
//! for what we hear, the first and last packet of a spurt leaving
//! (`MediaEvent::PlayoutStarted`/`PlayoutEnded`) for what we say.
//! Agent audio is told from silence by its level: voxgate sends digital
//! silence between spurts, so a frame is speech when its mean level is above
//! [`LOUD`].

use std::pin::Pin;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use voxgate_agents::tts::Piper;
use voxgate_media::session::{AudioFrame, MediaEvent, PIPELINE_RATE};
use voxgate_sip::{Call, CallEvent, Outcome};

use crate::options::{CallerVoice, Mode, Options};

/// Mean absolute sample value above which a 20 ms frame is speech (about
/// -38 dBFS; digital silence decodes to 0, speech runs in the thousands).
const LOUD: u32 = 400;
/// A gap this long in the agent's audio after we interrupt means it stopped.
const BARGE_GAP: Duration = Duration::from_millis(200);
/// Media mode: a tone burst this long, once per [`BURST_EVERY`].
const BURST: Duration = Duration::from_millis(200);
const BURST_EVERY: Duration = Duration::from_secs(1);

/// What every call's caller does (shared by all calls of a run).
pub struct Script {
    pub mode: Mode,
    /// 16 kHz PCM of each utterance (agent mode) or the tone burst (media mode).
    pub audio: Vec<Vec<i16>>,
    pub barge_in_after: Option<Duration>,
    pub quiet: Duration,
    pub reply_timeout: Duration,
    pub hold: Duration,
}

/// One exchange: in agent mode the caller's utterance and the agent's
/// answer; in media mode one tone burst and its echo.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    pub turn: u32,
    /// Agent mode: end of our utterance -> first packet of the answer.
    /// Media mode: first packet of the burst -> first packet of its echo.
    pub latency_ms: Option<f64>,
    /// We interrupted the previous answer with this utterance: our first
    /// packet -> the agent's last packet before it went quiet.
    pub barge_in_stop_ms: Option<f64>,
    /// Agent mode, an answer heard to its end: the longest silence between
    /// two of its loud packets (shorter than `--quiet`, which ends the
    /// answer). Words and sentence breaks leave a few hundred ms; more is
    /// the agent's next piece not being ready in time.
    pub longest_gap_ms: Option<f64>,
    /// When the turn's latency was measured, from the start of the run.
    pub at_ms: f64,
}

/// RTP as the caller received it (RFC 3550 counts, from our jitter buffer).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RtpQuality {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub lost: u64,
    pub loss_percent: f64,
    pub jitter_ms: f64,
    pub out_of_order: u64,
    pub late: u64,
    pub duplicates: u64,
}

/// What one answered call measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Heard {
    /// Answer -> first packet of agent audio.
    pub greeting_ms: Option<f64>,
    pub turns: Vec<Turn>,
    pub rtp: RtpQuality,
    /// `caller` when we hung up, else voxgate's reason (`remote-hangup`, ...).
    pub ended_by: String,
}

/// Why a call's script stopped before its end.
enum Stop {
    /// voxgate hung up (or the call failed).
    Ended(Option<Outcome>),
    /// The run is over (duration or Ctrl-C).
    Cancelled,
}

enum Input {
    Frame,
    Media(MediaEvent),
    Timer,
}

impl Script {
    /// Synthesizes the utterances once (in the caller's voice), or makes
    /// the tone.
    pub async fn prepare(o: &Options) -> anyhow::Result<Script> {
        let audio = match o.mode {
            Mode::Agent => {
                let texts: Vec<String> = o.utterances.iter().filter(|u| !u.trim().is_empty()).cloned().collect();
                let spoken = match o.caller_voice {
                    CallerVoice::Espeak => {
                        let mut spoken = Vec::new();
                        for text in &texts {
                            spoken.push(voxgate_agents::tts::espeak(text, "en-us", 1.0).await?);
                        }
                        spoken
                    }
                    CallerVoice::Piper => {
                        let dir = o.models_dir.clone();
                        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Vec<i16>>> {
                            let piper = Piper::load_installed(&dir, 1)?;
                            Ok(texts.iter().map(|t| piper.synthesize(t, 1.0, false)).collect::<Result<_, _>>()?)
                        })
                        .await??
                    }
                };
                // A turn is timed from the caller's last sound, not from
                // the end of the silence the voice adds after it.
                spoken.into_iter().map(voxgate_agents::tts::trim_to_sound).collect()
            }
            Mode::Media => vec![tone(BURST)],
        };
        Ok(Script {
            mode: o.mode,
            audio,
            barge_in_after: o.barge_in_after,
            quiet: o.quiet,
            reply_timeout: o.reply_timeout,
            hold: o.hold,
        })
    }

    /// Plays the caller of an inbound call until the script ends, voxgate
    /// hangs up, or `stop` fires; then hangs up (BYE) if the call is still up.
    /// `epoch` is the start of the run (for `at_ms`).
    pub async fn run(&self, call: Call, answered: Instant, epoch: Instant, stop: &CancellationToken) -> Heard {
        let mut line = Line::new(call, stop);
        let mut heard = Heard::default();
        let result = match self.mode {
            Mode::Agent => self.converse(&mut line, answered, epoch, &mut heard).await,
            Mode::Media => self.echo(&mut line, epoch, &mut heard).await,
        };
        heard.rtp = rtp_quality(&line.call);
        heard.ended_by = match result {
            Err(Stop::Ended(outcome)) => outcome.map_or("lost".into(), |o| o.reason.as_str().to_owned()),
            Ok(()) | Err(Stop::Cancelled) => {
                line.call.hangup().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), line.call.ended()).await;
                "caller".into()
            }
        };
        heard
    }

    async fn converse(&self, line: &mut Line, answered: Instant, epoch: Instant, heard: &mut Heard) -> Result<(), Stop> {
        if let Some(at) = line.wait_loud_since(answered, answered + self.reply_timeout).await? {
            heard.greeting_ms = Some(ms(at - answered));
        }
        line.wait_quiet(self.quiet, Instant::now() + self.reply_timeout).await?;
        let mut interrupting = false;
        for (i, utterance) in self.audio.iter().enumerate() {
            let (start, end) = line.speak(utterance).await?;
            let barge_in_stop_ms = interrupting.then(|| ms(line.ear.last_loud_between(start, end).map_or(Duration::ZERO, |t| t - start)));
            let reply = line.wait_loud_since(end, end + self.reply_timeout).await?;
            heard.turns.push(Turn {
                turn: i as u32 + 1,
                latency_ms: reply.map(|at| ms(at - end)),
                barge_in_stop_ms,
                longest_gap_ms: None,
                at_ms: ms(Instant::now() - epoch),
            });
            let Some(reply_at) = reply else { continue };
            if i + 1 == self.audio.len() {
                // Measured; the rest of the last answer tells nothing more.
                break;
            }
            interrupting = false;
            if let Some(after) = self.barge_in_after {
                line.listen_until(reply_at + after).await?;
                interrupting = line.ear.talking(Instant::now());
            }
            if !interrupting {
                line.wait_quiet(self.quiet, Instant::now() + self.reply_timeout * 3).await?;
                if let Some(t) = heard.turns.last_mut() {
                    t.longest_gap_ms = line.ear.longest_gap_since(reply_at).map(ms);
                }
            }
        }
        Ok(())
    }

    async fn echo(&self, line: &mut Line, epoch: Instant, heard: &mut Heard) -> Result<(), Stop> {
        let until = Instant::now() + self.hold;
        let mut turn = 0;
        while Instant::now() + BURST_EVERY <= until {
            let next = Instant::now() + BURST_EVERY;
            turn += 1;
            let (start, _) = line.speak(&self.audio[0]).await?;
            let echo = line.wait_loud_since(start, start + BURST_EVERY).await?;
            heard.turns.push(Turn {
                turn,
                latency_ms: echo.map(|at| ms(at - start)),
                barge_in_stop_ms: None,
                longest_gap_ms: None,
                at_ms: ms(Instant::now() - epoch),
            });
            line.listen_until(next).await?;
        }
        Ok(())
    }
}

/// A duration in milliseconds, as the report gives them.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A 1 kHz tone at about -12 dBFS.
fn tone(length: Duration) -> Vec<i16> {
    let n = (PIPELINE_RATE as f64 * length.as_secs_f64()) as usize;
    (0..n).map(|i| (8000.0 * (2.0 * std::f64::consts::PI * 1000.0 * i as f64 / f64::from(PIPELINE_RATE)).sin()) as i16).collect()
}

fn rtp_quality(call: &Call) -> RtpQuality {
    let s = call.media.control.stats();
    RtpQuality {
        packets_sent: s.packets_sent,
        packets_received: s.packets_received,
        lost: s.jitter.lost,
        loss_percent: s.jitter.loss_percent,
        jitter_ms: s.jitter.jitter_ms,
        out_of_order: s.jitter.out_of_order,
        late: s.jitter.late,
        duplicates: s.jitter.duplicates,
    }
}

/// Arrival times of the agent's speech.
#[derive(Default)]
struct Ear {
    /// Arrivals of loud frames, newest last (only the recent ones are kept).
    loud: Vec<Instant>,
}

impl Ear {
    fn hear(&mut self, frame: &AudioFrame) -> Option<Instant> {
        let at = frame.arrived_at?;
        let level = frame.pcm.iter().map(|s| u64::from(s.unsigned_abs())).sum::<u64>() / frame.pcm.len().max(1) as u64;
        if level <= u64::from(LOUD) {
            return None;
        }
        if self.loud.len() >= 4096 {
            self.loud.drain(..2048);
        }
        self.loud.push(at);
        Some(at)
    }

    fn last_loud(&self) -> Option<Instant> {
        self.loud.last().copied()
    }

    /// The agent was heard within the last [`BARGE_GAP`].
    fn talking(&self, now: Instant) -> bool {
        self.last_loud().is_some_and(|t| now.saturating_duration_since(t) < BARGE_GAP)
    }

    /// The longest time between two loud arrivals since `from` (None with
    /// fewer than two).
    fn longest_gap_since(&self, from: Instant) -> Option<Duration> {
        let heard = self.loud.iter().skip_while(|t| **t < from);
        heard.clone().zip(heard.skip(1)).map(|(a, b)| *b - *a).max()
    }

    /// The last loud arrival in `[from, to]` that starts a gap of at least
    /// [`BARGE_GAP`] (the agent stopping), or the last one in the window.
    fn last_loud_between(&self, from: Instant, to: Instant) -> Option<Instant> {
        let window: Vec<Instant> = self.loud.iter().copied().filter(|t| *t >= from && *t <= to).collect();
        window.windows(2).find(|w| w[1] - w[0] >= BARGE_GAP).map(|w| w[0]).or(window.last().copied())
    }
}

/// One call's media and signalling, read together.
struct Line {
    call: Call,
    ear: Ear,
    /// The stop signal and the timer live as long as the line: made anew
    /// for each frame, they would join and leave the token's waiters (one
    /// lock shared by every call) and the runtime's timers 50 times a second
    /// per call.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Line {
    fn new(call: Call, stop: &CancellationToken) -> Self {
        Line {
            call,
            ear: Ear::default(),
            stopped: Box::pin(stop.clone().cancelled_owned()),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    /// The next frame (heard by the ear), media event or the timer at `until`.
    async fn next(&mut self, until: Instant) -> Result<Input, Stop> {
        let until = tokio::time::Instant::from_std(until);
        if self.timer.deadline() != until {
            self.timer.as_mut().reset(until);
        }
        loop {
            tokio::select! {
                biased;
                _ = self.stopped.as_mut() => return Err(Stop::Cancelled),
                ev = self.call.events.recv() => match ev {
                    Some(CallEvent::Ended(outcome)) => return Err(Stop::Ended(Some(outcome))),
                    None => return Err(Stop::Ended(None)),
                    Some(_) => {}
                },
                Some(ev) = self.call.media.events.recv() => return Ok(Input::Media(ev)),
                frame = self.call.media.incoming.recv() => match frame {
                    Some(f) => {
                        self.ear.hear(&f);
                        return Ok(Input::Frame);
                    }
                    None => return Err(Stop::Ended(None)),
                },
                _ = self.timer.as_mut() => return Ok(Input::Timer),
            }
        }
    }

    /// The first loud arrival at or after `since` (possibly heard already).
    async fn wait_loud_since(&mut self, since: Instant, deadline: Instant) -> Result<Option<Instant>, Stop> {
        loop {
            if let Some(t) = self.ear.loud.iter().copied().find(|t| *t >= since) {
                return Ok(Some(t));
            }
            if let Input::Timer = self.next(deadline).await? {
                return Ok(None);
            }
        }
    }

    /// Until nothing loud arrived for `quiet` (or `deadline`).
    async fn wait_quiet(&mut self, quiet: Duration, deadline: Instant) -> Result<(), Stop> {
        let from = Instant::now();
        loop {
            let last = self.ear.last_loud().map_or(from, |t| t.max(from));
            let quiet_at = last + quiet;
            if Instant::now() >= quiet_at || Instant::now() >= deadline {
                return Ok(());
            }
            self.next(quiet_at.min(deadline)).await?;
        }
    }

    /// Listens (the ear keeps track) until `until`.
    async fn listen_until(&mut self, until: Instant) -> Result<(), Stop> {
        while Instant::now() < until {
            self.next(until).await?;
        }
        Ok(())
    }

    /// Says `pcm`; the wire times of its first and last packet.
    async fn speak(&mut self, pcm: &[i16]) -> Result<(Instant, Instant), Stop> {
        self.call.media.control.play(pcm.to_vec()).await;
        let limit = Instant::now() + Duration::from_secs_f64(pcm.len() as f64 / f64::from(PIPELINE_RATE)) + Duration::from_secs(2);
        let mut start = None;
        loop {
            match self.next(limit).await? {
                Input::Media(MediaEvent::PlayoutStarted { at }) => start = Some(at),
                Input::Media(MediaEvent::PlayoutEnded { at }) if start.is_some() => return Ok((start.unwrap_or(at), at)),
                Input::Timer => {
                    // The session never reported the spurt (its event queue was full): estimate.
                    let now = Instant::now();
                    return Ok((start.unwrap_or(now), now));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::tests::parse;

    fn frame(at: Instant, level: i16) -> AudioFrame {
        AudioFrame { pcm: vec![level; 320], received_at: Some(at), arrived_at: Some(at) }
    }

    #[test]
    fn the_ear_tells_speech_from_silence() {
        let mut ear = Ear::default();
        let t0 = Instant::now();
        assert_eq!(ear.hear(&frame(t0, 0)), None);
        assert_eq!(ear.hear(&frame(t0, 300)), None);
        assert_eq!(ear.hear(&frame(t0, -3000)), Some(t0));
        assert_eq!(ear.hear(&AudioFrame { pcm: vec![3000; 320], received_at: None, arrived_at: None }), None, "concealment is not heard");
        assert!(ear.talking(t0 + Duration::from_millis(100)));
        assert!(!ear.talking(t0 + Duration::from_millis(300)));
    }

    #[test]
    fn barge_in_stop_is_the_last_packet_before_the_agent_goes_quiet() {
        let mut ear = Ear::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The agent talks until 560 ms (we start at 500 ms), then answers again at 900 ms.
        for t in (0..=560).step_by(20).chain((900..=1000).step_by(20)) {
            ear.hear(&frame(at(t), 5000));
        }
        assert_eq!(ear.last_loud_between(at(500), at(1200)), Some(at(560)));
        assert_eq!(ear.last_loud_between(at(600), at(800)), None, "it had stopped already");
    }

    #[test]
    fn the_longest_gap_is_measured_inside_the_answer_only() {
        let mut ear = Ear::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Our utterance's echo ends at 100; the answer plays 1000-1400, stalls, goes on 2100-2500.
        for t in (0..=100).step_by(20).chain((1000..=1400).step_by(20)).chain((2100..=2500).step_by(20)) {
            ear.hear(&frame(at(t), 5000));
        }
        assert_eq!(ear.longest_gap_since(at(1000)), Some(Duration::from_millis(700)));
        assert_eq!(ear.longest_gap_since(at(2100)), Some(Duration::from_millis(20)));
        assert_eq!(ear.longest_gap_since(at(2500)), None, "one packet has no gap");
    }

    #[test]
    fn the_tone_is_loud_and_as_long_as_asked() {
        let t = tone(BURST);
        assert_eq!(t.len(), 3200);
        let mut ear = Ear::default();
        assert!(ear.hear(&AudioFrame { pcm: t[..320].to_vec(), received_at: Some(Instant::now()), arrived_at: Some(Instant::now()) }).is_some());
    }

    #[tokio::test]
    async fn the_caller_can_speak_in_the_piper_voice_of_the_models_dir() {
        let models = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");
        let o = parse(&["--caller-voice", "piper", "--models-dir", models, "--utterance", "What are your opening hours?"]);
        let script = Script::prepare(&o).await.expect("the Piper voice (scripts/setup)");
        assert_eq!(script.audio.len(), 1);
        let speech = &script.audio[0];
        let secs = speech.len() as f64 / f64::from(PIPELINE_RATE);
        assert!((0.8..3.0).contains(&secs), "{secs:.2} s for five words");
        // Trimmed to its sound: a turn is timed from the last of it.
        assert!(speech[speech.len() - 160..].iter().any(|s| *s != 0), "ends in silence");

        let o = parse(&["--caller-voice", "piper", "--models-dir", "/nonexistent/models"]);
        let err = Script::prepare(&o).await.err().expect("no voice there").to_string();
        assert!(err.contains("scripts/setup"), "{err}");
    }
}
