//! The conversation engine end to end on the installed models: espeak-ng
//! speech in, agent audio out, checked by transcribing it again.

mod common;

use std::time::Duration;

use common::{engines, speak, wer, Caller};
use voxgate_agents::asr::Asr;
use voxgate_agents::{AgentConfig, AgentEvent, Speaker, Transcript, FRAME};

const PROMPT: &str = "You are the receptionist of Luigi's, an Italian restaurant. We are open every day from nine in the morning to ten at night. Always answer in English, in one short sentence.";
const GREETING: &str = "Hello, thank you for calling Luigi's restaurant. We are open every day from nine in the morning until ten at night. How can I help you today?";

/// A fixed sampling seed: the 135M model sometimes drifts into another
/// language, which Whisper tiny.en cannot hear back; a fixed seed keeps
/// these tests about the pipeline, not about the model's luck.
const SEED: u64 = 1;

fn config() -> AgentConfig {
    AgentConfig { system_prompt: PROMPT.into(), greeting: GREETING.into(), seed: Some(SEED), ..AgentConfig::default() }
}

fn is_final(e: &AgentEvent, who: Speaker) -> Option<&Transcript> {
    match e {
        AgentEvent::Transcript(t) if t.speaker == who && t.is_final => Some(t),
        _ => None,
    }
}

fn audio_frames(log: &[(usize, AgentEvent)]) -> Vec<usize> {
    log.iter().filter(|(_, e)| matches!(e, AgentEvent::AgentAudio(_))).map(|(f, _)| *f).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_question_is_transcribed_answered_and_spoken() {
    let engines = engines();
    let mut caller = Caller::answer(engines.clone(), config()).await;
    // The greeting is the first thing the caller hears.
    caller.silence_until(20_000, |e| is_final(e, Speaker::Agent).is_some()).await;
    assert!(matches!(caller.log.first(), Some((_, AgentEvent::AgentAudio(_)))), "{:?}", caller.summary());

    // Whisper tiny.en's call on espeak-ng's "What are your opening hours?"
    // is marginal ("What are" at p ~0.55 against "What's up", which won on
    // a loaded machine, for a reason not found): a question it hears with
    // margin, so that the test checks the pipeline.
    let question = "I would like to book a table for two people tomorrow evening.";
    let greeting_end = caller.log.len();
    let spoken = speak(question);
    let sound_end_ms = caller.frames_pushed * 20 + spoken.iter().rposition(|s| s.abs() > 0.01).unwrap_or(0) / 16;
    caller.push(&spoken).await;
    let reply_at = caller.silence_until(30_000, |e| is_final(e, Speaker::Agent).is_some_and(|t| t.text != GREETING.trim())).await;

    let line = caller.log.iter().find_map(|(_, e)| is_final(e, Speaker::Caller)).expect("caller transcript").clone();
    let heard = line.text.clone();
    assert!(wer(question, &heard) <= 0.10, "caller heard as {heard:?}: {:?}", caller.summary());
    // The line ends where the caller's sound does, not where the VAD
    // stops hearing voice (40-60 ms later).
    let off = line.end_ms as i64 - sound_end_ms as i64;
    assert!((-20..=20).contains(&off), "line ends at {} ms, the sound at {sound_end_ms} ms", line.end_ms);
    let reply = is_final(&caller.log[reply_at].1, Speaker::Agent).unwrap().clone();
    assert!(!reply.interrupted && !reply.text.is_empty());
    let metrics = caller.log.iter().find_map(|(_, e)| match e {
        AgentEvent::TurnMetrics(m) => Some(m.clone()),
        _ => None,
    });
    let metrics = metrics.expect("turn metrics");
    assert_eq!(metrics.turn, 1);
    assert!(metrics.voice_to_voice_ms > 0 && metrics.llm_first_token_ms > 0 && metrics.tts_first_audio_ms > 0, "{metrics:?}");
    // The stages follow one another: the reply starts, its first phrase is
    // written (after its first token), voiced, and then heard.
    assert!(metrics.llm_first_token_ms <= metrics.llm_first_piece_ms, "{metrics:?}");
    let stages = metrics.reply_start_ms + metrics.llm_first_piece_ms + metrics.tts_first_audio_ms;
    assert!(metrics.reply_start_ms > 0 && stages <= metrics.voice_to_voice_ms + 3, "{metrics:?}");

    // What the agent said, transcribed again, is what it meant to say.
    let pcm: Vec<f32> = caller.log[greeting_end..reply_at]
        .iter()
        .filter_map(|(_, e)| match e {
            AgentEvent::AgentAudio(f) => Some(f.iter().map(|s| f32::from(*s) / 32768.0).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    let asr = Asr::load(&common::models().whisper, 1).unwrap();
    let round_trip = asr.transcribe(&pcm, "en").unwrap();
    let w = common::word_wer(&reply.text, &round_trip);
    eprintln!("agent said {:?}, heard back {round_trip:?} (WER {w:.2}); {metrics:?}", reply.text);
    assert!(w <= 0.15, "agent said {:?}, heard back {round_trip:?}", reply.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_frame_of_an_answer_does_not_wait_for_the_callers_next_frame() {
    let mut caller = Caller::answer(engines(), config()).await;
    // The caller's frames pace the agent's, but the first frame of what the
    // agent says goes out once its audio is ready: the caller's next frame
    // is up to 20 ms away, and the media leg sends on its tick after that.
    assert!(caller.wait_without_audio(Duration::from_secs(20)).await, "no greeting within 20 s");
    assert!(matches!(caller.log.first(), Some((0, AgentEvent::AgentAudio(_)))), "{:?}", caller.summary());
    assert!(!caller.wait_without_audio(Duration::from_millis(300)).await, "the rest ran ahead of the caller: {:?}", caller.summary());
    // The rest: one frame for each of the caller's.
    caller.silence(100).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    caller.drain();
    assert_eq!(audio_frames(&caller.log).len(), 6, "{:?}", caller.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_speech_over_the_agent_stops_it_within_two_frames() {
    let mut caller = Caller::answer(engines(), config()).await;
    // Let the greeting play for a second.
    caller.silence_until(10_000, |e| matches!(e, AgentEvent::AgentAudio(_))).await;
    caller.silence(1_000).await;
    let interruption = speak("Sorry to interrupt, can I book a table for four people tonight?");
    // The frame in which the caller's voice starts (espeak leads with silence).
    let first_voiced = interruption.chunks(FRAME).position(|f| f.iter().map(|s| s * s).sum::<f32>() / f.len() as f32 > 1e-4).expect("speech");
    let onset = caller.frames_pushed + first_voiced + 1;
    caller.push(&interruption).await;
    let cleared = caller.log.iter().find(|(f, e)| *f >= onset && matches!(e, AgentEvent::ClearAudio)).map(|(f, _)| *f).expect("agent audio cleared");
    // Agent frames sent from the caller's first voiced frame on: at most two.
    let spoken_over = audio_frames(&caller.log).into_iter().filter(|f| *f >= onset && *f <= cleared).count();
    assert!(spoken_over <= 2, "{spoken_over} agent frames after the caller started: {:?}", caller.summary());
    assert!(!audio_frames(&caller.log).iter().any(|f| *f > cleared && *f < onset + 25), "agent resumed over the caller: {:?}", caller.summary());
    let cut = caller.silence_until(10_000, |e| matches!(e, AgentEvent::Transcript(t) if t.speaker == Speaker::Agent && t.interrupted)).await;
    let cut = is_final(&caller.log[cut].1, Speaker::Agent).unwrap().clone();
    assert!(GREETING.starts_with(cut.text.trim_end_matches('.')) && cut.text.len() < GREETING.len(), "{cut:?}");
    // And the agent answers the interruption rather than falling silent.
    caller.silence_until(30_000, |e| is_final(e, Speaker::Agent).is_some_and(|t| !t.interrupted)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_backchannel_does_not_interrupt() {
    let mut caller = Caller::answer(engines(), config()).await;
    caller.silence_until(10_000, |e| matches!(e, AgentEvent::AgentAudio(_))).await;
    caller.silence(1_500).await;
    let mut uh_huh = speak_fast("uh-huh");
    uh_huh.truncate(16 * 300);
    caller.push(&uh_huh).await;
    let done = caller.silence_until(20_000, |e| is_final(e, Speaker::Agent).is_some()).await;
    let greeting = is_final(&caller.log[done].1, Speaker::Agent).unwrap();
    assert!(!greeting.interrupted, "{:?}", caller.summary());
    assert_eq!(greeting.text, GREETING);
    assert!(!caller.log.iter().any(|(_, e)| is_final(e, Speaker::Caller).is_some()), "backchannel taken as a turn: {:?}", caller.summary());
}

fn speak_fast(text: &str) -> Vec<f32> {
    common::speak_with(text, "en-us", 260)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_languages_are_refused_by_name() {
    let engines = engines();
    for (cfg, needle) in [
        (AgentConfig { tts_model: "nope-tts".into(), ..config() }, "nope-tts"),
        (AgentConfig { llm_model: "gpt-x".into(), ..config() }, "gpt-x"),
        (AgentConfig { tts_model: "elevenlabs-v3".into(), ..config() }, "[agents.elevenlabs]"),
        (AgentConfig { language: "fr".into(), ..config() }, "'fr'"),
    ] {
        let err = voxgate_agents::Session::start(engines.clone(), cfg).err().expect("refused").to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_very_long_system_prompts_still_get_answers() {
    let engines = engines();
    let long = format!("{PROMPT} {}", "Our menu has pizza, pasta, salads and desserts. ".repeat(400));
    assert!(long.len() > 19_000);
    for prompt in [String::new(), long] {
        let mut caller = Caller::answer(engines.clone(), AgentConfig { system_prompt: prompt, greeting: String::new(), ..config() }).await;
        caller.push(&speak("Do you have pizza?")).await;
        caller.silence_until(60_000, |e| is_final(e, Speaker::Agent).is_some()).await;
        // No greeting configured: the first agent line is the answer.
        assert!(caller.log.iter().any(|(_, e)| is_final(e, Speaker::Caller).is_some()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_pause_still_hears_the_last_word() {
    let engines = engines();
    // The pause's decode, which becomes the final transcript, hears 60 ms
    // after the last word instead of 100.
    let mut config = AgentConfig { greeting: String::new(), ..config() };
    config.turn.pause_ms = 60;
    let mut caller = Caller::answer(engines, config).await;
    let question = "I would like to book a table for two people tomorrow evening.";
    caller.push(&speak(question)).await;
    caller.silence_until(30_000, |e| is_final(e, Speaker::Agent).is_some()).await;
    let heard = caller.log.iter().find_map(|(_, e)| is_final(e, Speaker::Caller)).expect("caller transcript").text.clone();
    assert!(wer(question, &heard) <= 0.10, "caller heard as {heard:?}: {:?}", caller.summary());
    assert!(!audio_frames(&caller.log).is_empty(), "{:?}", caller.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_inside_a_request_is_not_answered_before_the_request_ends() {
    let engines = engines();
    // Only a long silence ends this turn, so the pause is long enough for a
    // reply to be started on the first half (and it must then be dropped).
    let mut config = AgentConfig { greeting: String::new(), ..config() };
    config.turn.early_end_silence_ms = 5_000;
    config.turn.end_silence_ms = 1_500;
    let mut caller = Caller::answer(engines, config).await;
    caller.push(&speak("I would like to book a table")).await;
    caller.silence(900).await;
    let resumed_at_ms = caller.frames_pushed as u64 * 20;
    caller.push(&speak("for two people tonight, please.")).await;
    let request_end = caller.frames_pushed;
    caller.silence_until(30_000, |e| is_final(e, Speaker::Agent).is_some()).await;

    let first_audio = audio_frames(&caller.log).first().copied().expect("the agent answered");
    assert!(first_audio > request_end, "agent audio at frame {first_audio}, before the request ended at {request_end}");
    let heard: Vec<&Transcript> = caller.log.iter().filter_map(|(_, e)| is_final(e, Speaker::Caller)).collect();
    assert_eq!(heard.len(), 1, "{:?}", caller.summary());
    // One turn, taking in the words after the pause (Whisper tiny may not
    // transcribe them all after so long a gap: where the turn ends is
    // what is checked here).
    assert!(heard[0].end_ms > resumed_at_ms + 500, "the turn ended at {} ms, the caller went on at {resumed_at_ms} ms: {:?}", heard[0].end_ms, caller.summary());
    let replies = caller.log.iter().filter(|(_, e)| is_final(e, Speaker::Agent).is_some()).count();
    let turns: Vec<u32> = caller.log.iter().filter_map(|(_, e)| match e {
        AgentEvent::TurnMetrics(m) => Some(m.turn),
        _ => None,
    }).collect();
    assert_eq!((replies, turns), (1, vec![1]), "{:?}", caller.summary());
}
