mod common;

use voxgate_agents::asr::Asr;

#[test]
fn converted_whisper_transcribes_espeak_speech() {
    let paths = common::models();
    let asr = Asr::load(&paths.whisper, 1).unwrap();
    for text in ["What are your opening hours?", "I would like to book a table for two people tomorrow evening."] {
        let pcm = common::speak(text);
        let started = std::time::Instant::now();
        let heard = asr.transcribe(&pcm, "en").unwrap();
        eprintln!("{text:?} -> {heard:?} in {:?} for {:.2} s of audio", started.elapsed(), pcm.len() as f64 / 16000.0);
        assert!(common::wer(text, &heard) <= 0.10, "{text:?} heard as {heard:?}");
    }
}

#[test]
fn a_q8_0_conversion_loads_and_hears_what_the_f16_one_hears() {
    use voxgate_agents::prepare::whisper::{convert, Weights};
    let paths = common::models();
    let dir = tempfile::tempdir().unwrap();
    let q8 = dir.path().join("ggml-tiny.en-q8_0.bin");
    convert(&paths.dir.join("asr/tiny.en-ct2"), &q8, Weights::Q8_0).unwrap();
    let (q8_size, f16_size) = (std::fs::metadata(&q8).unwrap().len(), std::fs::metadata(&paths.whisper).unwrap().len());
    assert!(q8_size * 10 < f16_size * 6, "Q8_0 {q8_size} bytes, f16 {f16_size}");
    let (q8, f16) = (Asr::load(&q8, 1).unwrap(), Asr::load(&paths.whisper, 1).unwrap());
    for text in ["What are your opening hours?", "I would like to book a table for two people tomorrow evening."] {
        let pcm = common::speak(text);
        let (a, b) = (q8.transcribe(&pcm, "en").unwrap(), f16.transcribe(&pcm, "en").unwrap());
        assert!(common::wer(text, &a) <= 0.10 && common::wer(text, &b) <= 0.10, "{text:?} heard as {a:?} (Q8_0) and {b:?} (f16)");
    }
}

#[test]
fn short_partial_audio_returns_quickly() {
    let paths = common::models();
    let asr = Asr::load(&paths.whisper, 1).unwrap();
    let pcm = common::speak("What are your opening hours?");
    for ms in [400usize, 600, 800, 1200] {
        let started = std::time::Instant::now();
        let heard = asr.transcribe(&pcm[..ms * 16], "en").unwrap();
        eprintln!("{ms} ms -> {heard:?} in {:?}", started.elapsed());
        assert!(started.elapsed().as_secs() < 10);
    }
}

#[test]
fn a_decode_runs_to_its_text_unless_its_abort_flag_is_set() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let paths = common::models();
    let asr = Asr::load(&paths.whisper, 1).unwrap();
    let text = "What are your opening hours?";
    let pcm = common::speak(text);
    let flag = Arc::new(AtomicBool::new(false));
    let (heard, _) = asr.transcribe_scored(&pcm, "en", 1, Some(flag.clone())).unwrap();
    assert!(common::wer(text, &heard) <= 0.10, "{text:?} heard as {heard:?}");
    flag.store(true, Ordering::Relaxed);
    assert!(asr.transcribe_scored(&pcm, "en", 1, Some(flag)).is_err(), "an aborted decode returns no text");
    // The aborted decode gave its thread back.
    assert!(common::wer(text, &asr.transcribe(&pcm, "en").unwrap()) <= 0.10);
}

#[test]
fn a_decoder_state_used_again_hears_what_a_new_one_hears() {
    let paths = common::models();
    let asr = Asr::load(&paths.whisper, 1).unwrap();
    let long = common::speak("I would like to book a table for two people tomorrow evening.");
    let short = common::speak("Do you take new patients?");
    // The first decode makes a state; the later ones run on it, after
    // audio of another length (another encoder window).
    let long_first = asr.transcribe(&long, "en").unwrap();
    let short_again = asr.transcribe(&short, "en").unwrap();
    let long_again = asr.transcribe(&long, "en").unwrap();
    let fresh = Asr::load(&paths.whisper, 1).unwrap();
    assert_eq!(short_again, fresh.transcribe(&short, "en").unwrap());
    assert_eq!(long_again, long_first);
}
