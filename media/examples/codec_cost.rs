//! CPU cost of one stream's audio coding, both directions, per 20 ms frame:
//! what a call pays besides networking. Single thread, release build.
//!
//! cargo run --release -p voxgate-media --example codec_cost

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

fn main() {
    let pcm16 = signal(frame_len(16_000) * FRAMES);

    // G.711 path: 16k -> 8k, encode, decode, 8k -> 16k.
    let mut down = FrameResampler::new(16_000, 8_000).unwrap();
    let mut up = FrameResampler::new(8_000, 16_000).unwrap();
    let (mut pcm8, mut coded, mut decoded, mut back) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
    }
    report("PCMU with resampling to and from 16 kHz", t.elapsed() / FRAMES as u32);

    // Opus at 16 kHz, 24 kb/s, FEC on, at several encoder complexities
    // (the session uses voxgate_media::session::OPUS_COMPLEXITY).
    for complexity in [10, 8, 5, 3, 1] {
        let mut enc = opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        enc.set_bitrate(opus::Bitrate::Bits(24_000)).unwrap();
        enc.set_inband_fec(true).unwrap();
        enc.set_complexity(complexity).unwrap();
        let mut dec = opus::Decoder::new(16_000, opus::Channels::Mono).unwrap();
        let mut packet = [0u8; 400];
        let mut out = vec![0i16; frame_len(16_000)];
        let mut bytes = 0usize;
        let t = Instant::now();
        for frame in pcm16.chunks(frame_len(16_000)) {
            let n = enc.encode(frame, &mut packet).unwrap();
            bytes += n;
            dec.decode(&packet[..n], &mut out, false).unwrap();
        }
        let label = format!("Opus 16 kHz mono 24 kb/s, complexity {complexity:>2} (mean packet {:.1} bytes)", bytes as f64 / FRAMES as f64);
        report(&label, t.elapsed() / FRAMES as u32);
    }
}
