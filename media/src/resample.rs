//! Sample-rate conversion between the rates a call meets: 8 kHz (G.711),
//! 16 kHz (the speech pipeline), 22.05 and 24 kHz (TTS voices) and 48 kHz
//! (Opus, WebRTC).
//!
//! Exact 2:1 pairs (8 ↔ 16 kHz, 24 ↔ 48 kHz, the hot path of every G.711
//! call) use a polyphase half-band FIR ([`HalfBand`]): 63 taps of which 33
//! multiply, Blackman window, 1.9 ms of delay, cheaper than the FFT.
//! Other pairs: a [`FrameResampler`] converts one 20 ms frame at a time with `rubato`'s
//! FFT-based synchronous resampler (band-limited, no drift): every 20 ms in
//! gives exactly 20 ms out. The frame is cut into 4 FFT sub-chunks, which
//! keeps the added delay at 2.5 ms for the common pairs (10 ms from
//! 22.05 kHz) while still removing aliases by more than 40 dB. State carries
//! over between frames, so a stream is converted without clicks at frame
//! edges. [`FrameResampler::delay_ms`] reports the delay.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler, WindowFunction};

use crate::error::MediaError;

/// The frame length every stage of voxgate works in.
pub const FRAME_MS: u32 = 20;

/// Samples in one 20 ms frame at `rate`.
pub fn frame_len(rate: u32) -> usize {
    (rate * FRAME_MS / 1000) as usize
}

/// FFT sub-chunks per 20 ms frame: more means less delay and a gentler filter.
const SUB_CHUNKS: usize = 4;

pub struct FrameResampler {
    from: u32,
    to: u32,
    inner: Option<Fft<f32>>,
    half_band: Option<HalfBand>,
    input: Vec<f32>,
    output: Vec<f32>,
}

/// Taps of the 2:1 filter: 4·16 − 1, so that with the cut-off at exactly a
/// quarter of the higher rate every other tap but the centre is zero (a
/// half-band filter) and only 33 of the 63 cost a multiplication.
const HALF_BAND_TAPS: usize = 63;
const CENTRE: usize = (HALF_BAND_TAPS - 1) / 2;
/// The taps at even positions, the only non-zero ones but the centre.
const BRANCH: usize = HALF_BAND_TAPS.div_ceil(2);

/// A 2:1 polyphase half-band FIR: low-pass at a quarter of the higher rate
/// (4 kHz for 8 ↔ 16 kHz), Blackman window (stop band below -70 dB from
/// about 4.7 kHz), 31 samples of delay at the higher rate.
pub struct HalfBand {
    up: bool,
    /// h[0], h[2], ..., h[62] (times 2 when upsampling); symmetric.
    branch: [f32; BRANCH],
    /// h[31] (times 2 when upsampling).
    centre: f32,
    /// The last inputs, newest last.
    history: Vec<f32>,
    /// Scratch: downsampling splits the buffered input by parity into
    /// these; upsampling keeps its even outputs in `even`.
    even: Vec<f32>,
    odd: Vec<f32>,
    /// The filtered frame, before it is converted to samples.
    y: Vec<f32>,
}

impl HalfBand {
    fn new(up: bool) -> Self {
        let mid = CENTRE as f64;
        let taps: Vec<f64> = (0..HALF_BAND_TAPS)
            .map(|k| {
                let x = k as f64 - mid;
                let sinc = if x == 0.0 { 1.0 } else { (std::f64::consts::FRAC_PI_2 * x).sin() / (std::f64::consts::FRAC_PI_2 * x) };
                let t = 2.0 * std::f64::consts::PI * k as f64 / (HALF_BAND_TAPS - 1) as f64;
                let window = 0.42 - 0.5 * t.cos() + 0.08 * (2.0 * t).cos();
                0.5 * sinc * window
            })
            .collect();
        let sum: f64 = taps.iter().sum();
        // Unity gain at DC; upsampling by zero-stuffing halves it, so double.
        let gain = if up { 2.0 } else { 1.0 } / sum;
        let mut branch = [0.0f32; BRANCH];
        for (j, b) in branch.iter_mut().enumerate() {
            *b = (taps[2 * j] * gain) as f32;
        }
        let centre = (taps[CENTRE] * gain) as f32;
        // Upsampling reaches 31 inputs back; downsampling 62.
        let history = vec![0.0; if up { BRANCH - 1 } else { 2 * (BRANCH - 1) }];
        HalfBand { up, branch, centre, history, even: Vec::new(), odd: Vec::new(), y: Vec::new() }
    }

    /// Converts one frame of `n` samples (`frame` cut to it or padded with
    /// silence; downsampling needs `n` even) and appends the result to
    /// `out`. With fused multiply-adds where the CPU has them (AVX2 and FMA,
    /// detected at run time: the portable build targets SSE2 only).
    fn frame(&mut self, frame: &[i16], n: usize, out: &mut Vec<i16>) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features it is compiled for were just detected.
            unsafe { self.frame_fma(frame, n, out) };
            return;
        }
        self.frame_with::<false>(frame, n, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn frame_fma(&mut self, frame: &[i16], n: usize, out: &mut Vec<i16>) {
        self.frame_with::<true>(frame, n, out);
    }

    /// The frame's whole work in one function, so that the conversions to
    /// and from samples are vectorised for the same CPU as the filter.
    #[inline(always)]
    fn frame_with<const FMA: bool>(&mut self, frame: &[i16], n: usize, out: &mut Vec<i16>) {
        self.filter::<FMA>(frame, n);
        // Converted apart from the filter's interleaving, which would keep
        // the conversion from being vectorised.
        out.extend(self.y.iter().map(|&v| to_sample(v)));
    }

    /// Filters one frame into `y`, as floats.
    #[inline(always)]
    fn filter<const FMA: bool>(&mut self, frame: &[i16], n: usize) {
        let keep = self.history.len();
        let used = frame.len().min(n);
        self.history.extend(frame[..used].iter().map(|&s| f32::from(s) * (1.0 / 32768.0)));
        self.history.resize(keep + n, 0.0);
        let buf = &self.history;
        if self.up {
            // y[2n] = Σ_j 2h[2j]·x[n−j]; y[2n+1] = 2h[31]·x[n−15].
            self.even.resize(n, 0.0);
            Self::convolve::<FMA>(&self.branch, buf, &mut self.even);
            // x[k−15] of the frame's k-th input is buf[k + 16].
            let odd = &buf[BRANCH - 1 - CENTRE / 2..][..n];
            self.y.resize(2 * n, 0.0);
            for ((pair, &e), &o) in self.y.chunks_exact_mut(2).zip(&self.even).zip(odd) {
                pair[0] = e;
                pair[1] = self.centre * o;
            }
        } else {
            // y[t] = Σ_j h[2j]·x[t−2j] + h[31]·x[t−31], for every even t.
            let pairs = buf.len() / 2;
            self.even.resize(pairs, 0.0);
            self.odd.resize(pairs, 0.0);
            for ((e, o), pair) in self.even.iter_mut().zip(self.odd.iter_mut()).zip(buf.chunks_exact(2)) {
                (*e, *o) = (pair[0], pair[1]);
            }
            self.y.resize(n / 2, 0.0);
            Self::convolve::<FMA>(&self.branch, &self.even, &mut self.y);
            // x[t−31] is odd[q + 15].
            for (v, &o) in self.y.iter_mut().zip(&self.odd[CENTRE / 2..]) {
                *v += self.centre * o;
            }
        }
        let len = self.history.len();
        self.history.drain(..len - keep);
    }

    /// y[i] = Σ_j branch[j]·x[i + j] for every i < y.len(), `LANES`
    /// outputs at a time, each in its own lane: every tap is one
    /// multiply-add over `LANES` neighbouring inputs, which the compiler
    /// turns into vector instructions with the sums held in registers, and
    /// no output needs a horizontal sum at the end (a dot product per output
    /// spent more on those sums and the loop around it than on the 32
    /// taps). Thirty-two outputs at once keep several independent sums in
    /// flight: with eight (one or two vector registers) each tap waited for
    /// the previous tap's addition to finish.
    #[inline(always)]
    fn convolve<const FMA: bool>(branch: &[f32; BRANCH], x: &[f32], y: &mut [f32]) {
        const LANES: usize = 32;
        let n = y.len();
        let blocks = n - n % LANES;
        for (i, out) in (0..blocks).step_by(LANES).zip(y.chunks_exact_mut(LANES)) {
            let mut acc = [0.0f32; LANES];
            for (j, &b) in branch.iter().enumerate() {
                for (a, &s) in acc.iter_mut().zip(&x[i + j..i + j + LANES]) {
                    *a = madd::<FMA>(b, s, *a);
                }
            }
            out.copy_from_slice(&acc);
        }
        for (i, out) in y.iter_mut().enumerate().skip(blocks) {
            *out = branch.iter().zip(&x[i..i + BRANCH]).fold(0.0, |a, (&b, &s)| madd::<FMA>(b, s, a));
        }
    }
}

/// b·s + a, in one rounding where the caller is compiled for FMA (without
/// it `mul_add` would be a library call).
#[inline(always)]
fn madd<const FMA: bool>(b: f32, s: f32, a: f32) -> f32 {
    if FMA { b.mul_add(s, a) } else { a + b * s }
}

/// A float sample in [-1, 1) as 16 bits; `as` saturates, and truncation
/// costs under one LSB and avoids libm's roundf.
#[inline(always)]
fn to_sample(v: f32) -> i16 {
    (v * 32768.0) as i16
}

impl FrameResampler {
    /// A converter from `from` Hz to `to` Hz; both must hold a whole number
    /// of samples in 20 ms.
    pub fn new(from: u32, to: u32) -> Result<Self, MediaError> {
        for rate in [from, to] {
            if rate == 0 || !(rate * FRAME_MS).is_multiple_of(1000) {
                return Err(MediaError::Resample(format!("{rate} Hz has no whole number of samples in 20 ms")));
            }
        }
        let half_band = if to == 2 * from {
            Some(HalfBand::new(true))
        } else if from == 2 * to {
            Some(HalfBand::new(false))
        } else {
            None
        };
        let inner = if from == to || half_band.is_some() {
            None
        } else {
            Some(
                Fft::<f32>::new_custom(
                    from as usize,
                    to as usize,
                    frame_len(from),
                    SUB_CHUNKS,
                    1,
                    WindowFunction::BlackmanHarris2,
                    FixedSync::Input,
                )
                .map_err(|e| MediaError::Resample(e.to_string()))?,
            )
        };
        // Buffers of the FFT resampler only.
        let input = vec![0.0; inner.as_ref().map_or(0, |_| frame_len(from))];
        let output = vec![0.0; inner.as_ref().map_or(0, |r| r.output_frames_max())];
        Ok(FrameResampler { from, to, inner, half_band, input, output })
    }

    pub fn rates(&self) -> (u32, u32) {
        (self.from, self.to)
    }

    /// The delay the conversion adds, in milliseconds.
    pub fn delay_ms(&self) -> f64 {
        if self.half_band.is_some() {
            // (taps - 1) / 2 samples at the higher rate.
            return CENTRE as f64 * 1000.0 / f64::from(self.from.max(self.to));
        }
        self.inner
            .as_ref()
            .map_or(0.0, |r| r.output_delay() as f64 * 1000.0 / f64::from(self.to))
    }

    /// Converts one 20 ms frame (shorter input is padded with silence);
    /// appends exactly 20 ms at the output rate to `out`.
    pub fn process(&mut self, frame: &[i16], out: &mut Vec<i16>) -> Result<(), MediaError> {
        let n_in = frame_len(self.from);
        let n_out = frame_len(self.to);
        if let Some(hb) = self.half_band.as_mut() {
            hb.frame(frame, n_in, out);
            return Ok(());
        }
        let Some(inner) = self.inner.as_mut() else {
            out.extend(frame.iter().take(n_in));
            out.extend(std::iter::repeat_n(0, n_in.saturating_sub(frame.len())));
            return Ok(());
        };
        let used = frame.len().min(n_in);
        for (slot, s) in self.input[..used].iter_mut().zip(frame) {
            *slot = f32::from(*s) * (1.0 / 32768.0);
        }
        self.input[used..].fill(0.0);
        let input = InterleavedSlice::new(&self.input, 1, n_in).map_err(|e| MediaError::Resample(e.to_string()))?;
        let capacity = self.output.len();
        let mut output =
            InterleavedSlice::new_mut(&mut self.output, 1, capacity).map_err(|e| MediaError::Resample(e.to_string()))?;
        let (_, written) =
            inner.process_into_buffer(&input, &mut output, None).map_err(|e| MediaError::Resample(e.to_string()))?;
        // With SUB_CHUNKS dividing the frame the FFT yields exactly one frame
        // per frame; should it ever not, pad or trim rather than drift.
        let ready = written.min(n_out);
        // `as` saturates; truncation costs under one LSB and avoids libm's roundf.
        out.extend(self.output[..ready].iter().map(|s| (s * 32768.0) as i16));
        out.resize(out.len() + (n_out - ready), 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::PI;

    fn sine(freq: f32, rate: u32, ms: u32, amplitude: f32) -> Vec<i16> {
        (0..rate * ms / 1000).map(|n| (amplitude * (2.0 * PI * freq * n as f32 / rate as f32).sin()) as i16).collect()
    }

    fn run(r: &mut FrameResampler, input: &[i16]) -> Vec<i16> {
        let mut out = Vec::new();
        for frame in input.chunks(frame_len(r.rates().0)) {
            r.process(frame, &mut out).unwrap();
        }
        out
    }

    /// The 2:1 filters compute, frame after frame, exactly the 63-tap FIR
    /// they stand for: y[t] = Σ_k h[k]·z[t−k] over the zero-stuffed input
    /// (up), y[q] = Σ_k h[k]·x[2q−k] (down), by the definition.
    #[test]
    fn two_to_one_filters_are_the_fir_they_stand_for() {
        let mut seed = 1u32;
        let x: Vec<i16> = (0..5 * 320)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 16) as u16 as i16 / 2
            })
            .collect();
        // Both builds of the filter: with fused multiply-adds and without.
        for (up, fma) in [(true, false), (true, true), (false, false), (false, true)] {
            let mut hb = HalfBand::new(up);
            let mut h = [0.0f32; HALF_BAND_TAPS];
            for (j, b) in hb.branch.iter().enumerate() {
                h[2 * j] = *b;
            }
            h[CENTRE] = hb.centre;
            let frame = if up { 160 } else { 320 };
            let mut y = Vec::new();
            for f in x.chunks(frame) {
                if fma {
                    hb.filter::<true>(f, frame);
                } else {
                    hb.filter::<false>(f, frame);
                }
                y.extend_from_slice(&hb.y);
            }
            let at = |i: isize| if i < 0 { 0.0 } else { f32::from(x[i as usize]) / 32768.0 };
            let expected: Vec<f32> = if up {
                (0..2 * x.len() as isize).map(|t| (0..HALF_BAND_TAPS as isize).filter(|k| (t - k) % 2 == 0).map(|k| h[k as usize] * at((t - k).div_euclid(2))).sum()).collect()
            } else {
                (0..x.len() as isize / 2).map(|q| (0..HALF_BAND_TAPS as isize).map(|k| h[k as usize] * at(2 * q - k)).sum()).collect()
            };
            assert_eq!(y.len(), expected.len());
            for (i, (a, b)) in y.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() < 1e-5, "up {up}, fma {fma}: sample {i} is {a}, the FIR gives {b}");
            }
        }
    }

    /// Frequency by counting rising zero crossings over the steady part.
    fn frequency(x: &[i16], rate: u32) -> f32 {
        let x = &x[x.len() / 4..];
        let crossings = x.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
        crossings as f32 * rate as f32 / x.len() as f32
    }

    fn rms(x: &[i16]) -> f32 {
        let x = &x[x.len() / 4..];
        (x.iter().map(|s| f32::from(*s).powi(2)).sum::<f32>() / x.len() as f32).sqrt()
    }

    #[test]
    fn every_pair_of_call_rates_keeps_20_ms_frames() {
        let rates = [8000, 16000, 22050, 24000, 48000];
        for from in rates {
            for to in rates {
                let mut r = FrameResampler::new(from, to).unwrap();
                let out = run(&mut r, &sine(440.0, from, 200, 8000.0));
                assert_eq!(out.len(), frame_len(to) * 10, "{from} -> {to}");
            }
        }
        assert!(FrameResampler::new(44_100, 8000).is_ok());
        assert!(FrameResampler::new(11_025, 8000).is_err(), "220.5 samples per frame");
    }

    #[test]
    fn a_sine_keeps_its_frequency_and_level_through_8k_16k_48k_8k() {
        let input = sine(1000.0, 8000, 1000, 10_000.0);
        let mut up = FrameResampler::new(8000, 16000).unwrap();
        let mut up2 = FrameResampler::new(16000, 48000).unwrap();
        let mut down = FrameResampler::new(48000, 8000).unwrap();
        let s16 = run(&mut up, &input);
        let s48 = run(&mut up2, &s16);
        let back = run(&mut down, &s48);
        for (signal, rate) in [(&s16, 16000), (&s48, 48000), (&back, 8000)] {
            let f = frequency(signal, rate);
            assert!((f - 1000.0).abs() < 5.0, "{f} Hz at {rate}");
            let level_db = 20.0 * (rms(signal) / rms(&input)).log10();
            assert!(level_db.abs() < 0.5, "level changed by {level_db} dB at {rate}");
        }
        let total_delay = up.delay_ms() + up2.delay_ms() + down.delay_ms();
        assert!(total_delay <= 7.5, "delay {total_delay} ms");
    }

    /// Power of `freq` in `x` (Goertzel), per sample.
    fn power(x: &[i16], freq: f32, rate: u32) -> f32 {
        let coeff = 2.0 * (2.0 * PI * freq / rate as f32).cos();
        let (mut s1, mut s2) = (0.0f32, 0.0f32);
        for v in x {
            let s0 = f32::from(*v) + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        (s1 * s1 + s2 * s2 - coeff * s1 * s2) / x.len() as f32
    }

    #[test]
    fn two_to_one_filters_remove_images_and_aliases() {
        // 8 -> 16 kHz: a 3 kHz tone must not leave an image at 5 kHz.
        let mut up = FrameResampler::new(8000, 16000).unwrap();
        let out = run(&mut up, &sine(3000.0, 8000, 500, 10_000.0));
        let steady = &out[out.len() / 4..];
        let image_db = 10.0 * (power(steady, 5000.0, 16000) / power(steady, 3000.0, 16000)).log10();
        assert!(image_db < -50.0, "image at {image_db} dB");
        // 16 -> 8 kHz: a 6 kHz tone must not fold to 2 kHz.
        let mut down = FrameResampler::new(16000, 8000).unwrap();
        let input = sine(6000.0, 16000, 500, 10_000.0);
        let out = run(&mut down, &input);
        let alias_db = 20.0 * (rms(&out).max(1.0) / rms(&input)).log10();
        assert!(alias_db < -50.0, "alias only {alias_db} dB down");
        // The telephone band passes flat: 300 Hz and 3.1 kHz within 0.5 dB.
        for f in [300.0, 3100.0] {
            let x = sine(f, 8000, 500, 10_000.0);
            let y = run(&mut FrameResampler::new(8000, 16000).unwrap(), &x);
            let db = 20.0 * (rms(&y) / rms(&x)).log10();
            assert!(db.abs() < 0.5, "{f} Hz changed by {db} dB");
        }
    }

    #[test]
    fn content_above_the_new_nyquist_is_filtered_out() {
        // 6 kHz cannot exist at 8 kHz: it must be removed, not folded to 2 kHz.
        let input = sine(6000.0, 48000, 500, 10_000.0);
        let mut down = FrameResampler::new(48000, 8000).unwrap();
        let out = run(&mut down, &input);
        let attenuation_db = 20.0 * (rms(&out).max(1.0) / rms(&input)).log10();
        assert!(attenuation_db < -40.0, "alias only {attenuation_db} dB down");
    }
}
