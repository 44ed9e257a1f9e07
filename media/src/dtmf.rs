//! DTMF: RFC 4733 telephone-events in RTP (send and receive), and an
//! in-band Goertzel detector for far ends that send tones as audio.

use std::f32::consts::PI;

/// The 16 DTMF keys, in RFC 4733 §3.2 event order (0-9, *, #, A-D).
const KEYS: [char; 16] = ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '*', '#', 'A', 'B', 'C', 'D'];

pub fn event_of(digit: char) -> Option<u8> {
    let d = digit.to_ascii_uppercase();
    KEYS.iter().position(|k| *k == d).map(|i| i as u8)
}

pub fn digit_of(event: u8) -> Option<char> {
    KEYS.get(usize::from(event)).copied()
}

/// One RFC 4733 §2.3 event payload: event, end bit, volume, duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPayload {
    pub event: u8,
    pub end: bool,
    /// Power level in -dBm0 (0-63).
    pub volume: u8,
    /// In RTP timestamp units since the event began.
    pub duration: u16,
}

impl EventPayload {
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 4 {
            return None;
        }
        Some(EventPayload {
            event: b[0],
            end: b[1] & 0x80 != 0,
            volume: b[1] & 0x3F,
            duration: u16::from_be_bytes([b[2], b[3]]),
        })
    }

    pub fn to_bytes(self) -> [u8; 4] {
        let d = self.duration.to_be_bytes();
        [self.event, (u8::from(self.end) << 7) | (self.volume & 0x3F), d[0], d[1]]
    }
}

/// A key press that was received.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Digit {
    pub digit: char,
    pub duration_ms: u32,
}

/// Turns a stream of telephone-event packets into key presses: one per
/// event (all packets of an event share its RTP timestamp), reported at its
/// end packet, which is sent three times (§2.5.1.4) and reported once. An
/// event whose end packets were all lost is reported when the next begins.
#[derive(Debug, Default)]
pub struct DtmfReceiver {
    clock_rate: u32,
    current: Option<(u32, EventPayload)>,
    last_reported: Option<u32>,
}

impl DtmfReceiver {
    pub fn new(clock_rate: u32) -> Self {
        DtmfReceiver { clock_rate, ..Default::default() }
    }

    fn report(&self, p: EventPayload) -> Option<Digit> {
        Some(Digit { digit: digit_of(p.event)?, duration_ms: u32::from(p.duration) * 1000 / self.clock_rate.max(1) })
    }

    /// Feeds one packet (its RTP timestamp and payload).
    pub fn push(&mut self, timestamp: u32, payload: &[u8]) -> Option<Digit> {
        let p = EventPayload::parse(payload)?;
        if self.last_reported == Some(timestamp) {
            return None;
        }
        let mut unfinished = None;
        if let Some((ts, prev)) = self.current {
            if ts != timestamp {
                self.last_reported = Some(ts);
                unfinished = self.report(prev);
            }
        }
        if p.end {
            self.current = None;
            self.last_reported = Some(timestamp);
            return unfinished.or_else(|| self.report(p));
        }
        self.current = Some((timestamp, p));
        unfinished
    }
}

/// The packets that send one key press: updates every `packet_ms` with the
/// growing duration (the first with the RTP marker), then the end packet
/// three times. All carry the same RTP timestamp.
pub fn event_packets(digit: char, duration_ms: u32, packet_ms: u32, clock_rate: u32) -> Option<Vec<(bool, [u8; 4])>> {
    let event = event_of(digit)?;
    let unit = |ms: u32| -> u16 { (ms * clock_rate / 1000).min(u32::from(u16::MAX)) as u16 };
    let packet_ms = packet_ms.max(1);
    let mut out = Vec::new();
    let mut elapsed = packet_ms;
    while elapsed < duration_ms {
        let p = EventPayload { event, end: false, volume: 10, duration: unit(elapsed) };
        out.push((out.is_empty(), p.to_bytes()));
        elapsed += packet_ms;
    }
    let end = EventPayload { event, end: true, volume: 10, duration: unit(duration_ms) };
    for _ in 0..3 {
        out.push((out.is_empty(), end.to_bytes()));
    }
    Some(out)
}

const ROWS: [f32; 4] = [697.0, 770.0, 852.0, 941.0];
const COLS: [f32; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
const PAD: [[char; 4]; 4] = [['1', '2', '3', 'A'], ['4', '5', '6', 'B'], ['7', '8', '9', 'C'], ['*', '0', '#', 'D']];

/// `duration_ms` of the key's two tones at `rate` (about -7 dBFS each,
/// with a short ramp at both ends), followed by 50 ms of silence: in-band
/// DTMF for a far end that takes key presses only as audio.
pub fn key_tone(digit: char, duration_ms: u32, rate: u32) -> Option<Vec<i16>> {
    let d = digit.to_ascii_uppercase();
    let (r, c) = (0..4).flat_map(|r| (0..4).map(move |c| (r, c))).find(|&(r, c)| PAD[r][c] == d)?;
    let n = (rate * duration_ms / 1000) as usize;
    let ramp = (rate / 200) as usize;
    let mut out: Vec<i16> = (0..n)
        .map(|i| {
            let t = i as f32 / rate as f32;
            let env = (i.min(n - 1 - i) as f32 / ramp.max(1) as f32).min(1.0);
            let s = (2.0 * PI * ROWS[r] * t).sin() + (2.0 * PI * COLS[c] * t).sin();
            (s * 0.45 * env * 32767.0 / 2.0) as i16
        })
        .collect();
    out.resize(n + (rate / 20) as usize, 0);
    Some(out)
}

/// Power of `freq` in `block` (the Goertzel algorithm).
fn goertzel(block: &[f32], freq: f32, rate: f32) -> f32 {
    let coeff = 2.0 * (2.0 * PI * freq / rate).cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for x in block {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// In-band DTMF: analyses ~25 ms blocks and reports a key once it has been
/// present in two consecutive blocks, again only after a gap.
pub struct ToneDetector {
    rate: f32,
    block: Vec<f32>,
    block_len: usize,
    candidate: Option<char>,
    reported: Option<char>,
}

impl ToneDetector {
    pub fn new(sample_rate: u32) -> Self {
        let block_len = (sample_rate as usize * 205) / 8000;
        ToneDetector { rate: sample_rate as f32, block: Vec::with_capacity(block_len), block_len, candidate: None, reported: None }
    }

    fn classify(&self) -> Option<char> {
        let energy: f32 = self.block.iter().map(|x| x * x).sum::<f32>() * self.block.len() as f32 / 2.0;
        if energy < 1e-3 * self.block.len() as f32 * self.block.len() as f32 {
            return None;
        }
        let best = |freqs: &[f32; 4]| {
            let powers: Vec<f32> = freqs.iter().map(|f| goertzel(&self.block, *f, self.rate)).collect();
            let (i, p) = powers.iter().enumerate().fold((0, 0.0f32), |b, (i, p)| if *p > b.1 { (i, *p) } else { b });
            // The winner must stand well above the others of its group.
            let clear = powers.iter().enumerate().all(|(j, q)| j == i || *q * 6.0 < p);
            (i, p, clear)
        };
        let (r, rp, rclear) = best(&ROWS);
        let (c, cp, cclear) = best(&COLS);
        // Both tones carry most of the energy, and neither is > 8 dB above the other (twist).
        let twist_ok = rp < cp * 6.3 && cp < rp * 6.3;
        let dominant = (rp + cp) > 0.5 * energy;
        (rclear && cclear && twist_ok && dominant).then_some(PAD[r][c])
    }

    /// Feeds normalised samples (-1.0..1.0); returns newly detected keys.
    pub fn push(&mut self, samples: &[f32]) -> Vec<char> {
        let mut found = Vec::new();
        for s in samples {
            self.block.push(*s);
            if self.block.len() == self.block_len {
                let key = self.classify();
                if key.is_some() && key == self.candidate && self.reported != key {
                    found.extend(key);
                    self.reported = key;
                }
                if key.is_none() {
                    self.reported = None;
                }
                self.candidate = key;
                self.block.clear();
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(digit: char, ms: u32, rate: u32) -> Vec<f32> {
        let (r, c) = (0..4)
            .flat_map(|r| (0..4).map(move |c| (r, c)))
            .find(|(r, c)| PAD[*r][*c] == digit)
            .unwrap();
        (0..rate * ms / 1000)
            .map(|n| {
                let t = n as f32 / rate as f32;
                0.3 * (2.0 * PI * ROWS[r] * t).sin() + 0.3 * (2.0 * PI * COLS[c] * t).sin()
            })
            .collect()
    }

    #[test]
    fn sent_events_are_received_once_with_their_duration() {
        let mut rx = DtmfReceiver::new(8000);
        let mut got = Vec::new();
        for (i, digit) in "159#*D".chars().enumerate() {
            let packets = event_packets(digit, 120, 20, 8000).unwrap();
            assert!(packets[0].0, "first packet has the marker");
            assert_eq!(packets.iter().filter(|p| EventPayload::parse(&p.1).unwrap().end).count(), 3);
            for (_, payload) in packets {
                got.extend(rx.push(1000 + i as u32 * 8000, &payload));
            }
        }
        assert_eq!(got.iter().map(|d| d.digit).collect::<String>(), "159#*D");
        assert!(got.iter().all(|d| d.duration_ms == 120));
    }

    #[test]
    fn an_event_without_end_packets_is_reported_when_the_next_starts() {
        let mut rx = DtmfReceiver::new(8000);
        let p = EventPayload { event: 7, end: false, volume: 10, duration: 800 };
        assert_eq!(rx.push(100, &p.to_bytes()), None);
        let next = EventPayload { event: 3, end: false, volume: 10, duration: 160 };
        assert_eq!(rx.push(5000, &next.to_bytes()), Some(Digit { digit: '7', duration_ms: 100 }));
        assert_eq!(rx.push(5000, &[1, 2]), None, "short payloads are ignored");
    }

    #[test]
    fn in_band_tones_are_detected_at_8_and_16_khz() {
        for rate in [8000, 16000] {
            let mut det = ToneDetector::new(rate);
            let mut audio = Vec::new();
            for d in "0123456789*#ABCD".chars() {
                audio.extend(tone(d, 80, rate));
                audio.extend(std::iter::repeat_n(0.0, (rate / 20) as usize));
            }
            let found: String = audio.chunks(rate as usize / 50).flat_map(|c| det.push(c)).collect();
            assert_eq!(found, "0123456789*#ABCD", "at {rate} Hz");
        }
    }

    #[test]
    fn speech_like_noise_is_not_a_key() {
        let mut det = ToneDetector::new(8000);
        // A single 1 kHz tone and a chord outside the DTMF grid.
        let single: Vec<f32> = (0..8000).map(|n| 0.5 * (2.0 * PI * 1000.0 * n as f32 / 8000.0).sin()).collect();
        assert!(det.push(&single).is_empty());
        let chord: Vec<f32> = (0..8000)
            .map(|n| {
                let t = n as f32 / 8000.0;
                0.3 * (2.0 * PI * 440.0 * t).sin() + 0.3 * (2.0 * PI * 2200.0 * t).sin()
            })
            .collect();
        assert!(det.push(&chord).is_empty());
    }

    #[test]
    fn generated_tones_are_detected_in_band() {
        for key in ['1', '5', '9', '#', '*', '0', 'D'] {
            let pcm = key_tone(key, 100, 16_000).expect("a key");
            let floats: Vec<f32> = pcm.iter().map(|s| f32::from(*s) / 32768.0).collect();
            assert_eq!(ToneDetector::new(16_000).push(&floats), vec![key]);
        }
        assert!(key_tone('x', 100, 8000).is_none());
    }
}
