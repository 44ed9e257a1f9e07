//! CPU cost of one stream's audio coding, both directions, per 20 ms frame:
//! what a call pays besides networking. Single thread, release build.
//!
//! cargo run --release -p voxgate-media --example codec_cost [speech.raw [out_dir]]
//!
//! With a speech file (16 kHz mono s16le, raw) the cost is taken on it
//! instead of the built-in test signal, and with `out_dir` each Opus
//! complexity's decoded audio is written there as `opus-c<N>.raw`, for a
//! quality score against the input (`scripts/bench-opus` scores it with
//! PESQ, ITU-T P.862.2 wideband).

use std::time::Instant;

use voxgate_media::g711::Law;
use voxgate_media::resample::{frame_len, FrameResampler};

const FRAMES: usize = 20_000;

/// Speech-like test signal at 16 kHz: a few harmonics with a moving pitch plus noise.
fn signal(n: usize) -> Vec<i16> {
    let mut seed = 0x1234_5678u32;
    (0..n)
        .map(|i| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let t = i as f32 / 16_000.0;
            let f0 = 140.0 + 40.0 * (t * 3.0).sin();
            let v: f32 = (1..6).map(|h| (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin() / h as f32).sum();
            (v * 5000.0 + (seed >> 20) as f32 - 2048.0) as i16
        })
        .collect()
}

fn report(name: &str, per_frame: std::time::Duration) {
    let streams_per_core = 0.020 / per_frame.as_secs_f64();
    println!("{name}: {:.2} µs per 20 ms frame (encode + decode) -> {:.0} streams per core", per_frame.as_secs_f64() * 1e6, streams_per_core);
}

/// Raw 16 kHz mono s16le, repeated to at least `FRAMES` frames so every
/// measurement codes the same amount of audio.
fn speech(path: &str) -> Vec<i16> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let once: Vec<i16> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    assert!(!once.is_empty(), "{path} holds no audio");
    let want = frame_len(16_000) * FRAMES;
    once.iter().copied().cycle().take(want.max(once.len()).div_ceil(frame_len(16_000)) * frame_len(16_000)).collect()
}

fn write_raw(path: &std::path::Path, pcm: &[i16]) {
    let bytes: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pcm16 = match args.first() {
        Some(path) => speech(path),
        None => signal(frame_len(16_000) * FRAMES),
    };
    let out_dir = args.get(1).map(std::path::PathBuf::from);
    let frames = pcm16.len() / frame_len(16_000);

    // G.711 path: 16k -> 8k, encode, decode, 8k -> 16k.
    let mut down = FrameResampler::new(16_000, 8_000).unwrap();
    let mut up = FrameResampler::new(8_000, 16_000).unwrap();
    let (mut pcm8, mut coded, mut decoded, mut back) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut all_back = Vec::with_capacity(if out_dir.is_some() { pcm16.len() } else { 0 });
    let t = Instant::now();
    for frame in pcm16.chunks(frame_len(16_000)) {
        pcm8.clear();
        coded.clear();
        decoded.clear();
        back.clear();
        down.process(frame, &mut pcm8).unwrap();
        Law::Ulaw.encode(&pcm8, &mut coded);
        Law::Ulaw.decode(&coded, &mut decoded);
        up.process(&decoded, &mut back).unwrap();
        if out_dir.is_some() {
            all_back.extend_from_slice(&back);
        }
    }
    report("PCMU with resampling to and from 16 kHz", t.elapsed() / frames as u32);
    if let Some(dir) = &out_dir {
        write_raw(&dir.join("pcmu.raw"), &all_back);
    }

    // Opus at 16 kHz, 24 kb/s, FEC on, at several encoder complexities
    // (sessions use `opus_complexity` from their config, 1 by default).
    for complexity in [10, 8, 5, 3, 2, 1, 0] {
        let mut enc = opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        enc.set_bitrate(opus::Bitrate::Bits(24_000)).unwrap();
        enc.set_inband_fec(true).unwrap();
        enc.set_complexity(complexity).unwrap();
        let mut dec = opus::Decoder::new(16_000, opus::Channels::Mono).unwrap();
        let mut packet = [0u8; 400];
        let mut out = vec![0i16; pcm16.len()];
        let mut bytes = 0usize;
        let t = Instant::now();
        for (frame, decoded) in pcm16.chunks(frame_len(16_000)).zip(out.chunks_mut(frame_len(16_000))) {
            let n = enc.encode(frame, &mut packet).unwrap();
            bytes += n;
            dec.decode(&packet[..n], decoded, false).unwrap();
        }
        let elapsed = t.elapsed();
        let label = format!("Opus 16 kHz mono 24 kb/s, complexity {complexity:>2} (mean packet {:.1} bytes)", bytes as f64 / frames as f64);
        report(&label, elapsed / frames as u32);
        if let Some(dir) = &out_dir {
            write_raw(&dir.join(format!("opus-c{complexity}.raw")), &out);
        }
    }
}
