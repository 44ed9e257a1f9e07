//! G.711 µ-law (PCMU, payload type 0) and A-law (PCMA, 8): 8-bit companded
//! samples at 8 kHz, as ITU-T G.711 defines them (the algorithm of the Sun
//! reference implementation). Decoding is a 256-entry table built at compile
//! time; encoding is a few shifts per sample.

const BIAS: i32 = 0x84;
/// Largest 14-bit magnitude µ-law encodes before clipping.
const CLIP: i32 = 8159;

/// One linear 16-bit sample to µ-law (on the 14-bit value, as G.711).
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let v = i32::from(sample) >> 2;
    let (mask, v) = if v < 0 { (0x7F, -v) } else { (0xFF, v) };
    let v = v.min(CLIP) + (BIAS >> 2);
    // Segment ends are 0x3F, 0x7F, ... 0x1FFF.
    let Some(seg) = (0..8).find(|i| v < (0x40 << i)) else { return (0x7F ^ mask) as u8 };
    (((seg << 4) | ((v >> (seg + 1)) & 0x0F)) ^ mask) as u8
}

const fn ulaw_decode(code: u8) -> i16 {
    let u = !code;
    let t = ((((u & 0x0F) as i32) << 3) + BIAS) << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { BIAS - t } else { t - BIAS }) as i16
}

/// One linear 16-bit sample to A-law (on the 13-bit magnitude, as G.711).
pub fn linear_to_alaw(sample: i16) -> u8 {
    let v = i32::from(sample) >> 3;
    let (mask, v) = if v >= 0 { (0xD5, v) } else { (0x55, -v - 1) };
    // Segment ends are 0x1F, 0x3F, ... 0xFFF.
    let Some(seg) = (0..8).find(|i| v < (0x20 << i)) else { return (0x7F ^ mask) as u8 };
    let quantized = if seg < 2 { (v >> 1) & 0x0F } else { (v >> seg) & 0x0F };
    (((seg << 4) | quantized) ^ mask) as u8
}

const fn alaw_decode(code: u8) -> i16 {
    let a = (code ^ 0x55) as i32;
    let mut t = (a & 0x0F) << 4;
    let seg = (a & 0x70) >> 4;
    t = match seg {
        0 => t + 8,
        1 => t + 0x108,
        _ => (t + 0x108) << (seg - 1),
    };
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

macro_rules! decode_table {
    ($decode:ident) => {{
        let mut t = [0i16; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = $decode(i as u8);
            i += 1;
        }
        t
    }};
}

static ULAW_TO_LINEAR: [i16; 256] = decode_table!(ulaw_decode);
static ALAW_TO_LINEAR: [i16; 256] = decode_table!(alaw_decode);

pub fn ulaw_to_linear(code: u8) -> i16 {
    ULAW_TO_LINEAR[usize::from(code)]
}

pub fn alaw_to_linear(code: u8) -> i16 {
    ALAW_TO_LINEAR[usize::from(code)]
}

/// The two G.711 laws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Law {
    Ulaw,
    Alaw,
}

impl Law {
    /// Appends the encoding of `pcm` (8 kHz) to `out`.
    pub fn encode(self, pcm: &[i16], out: &mut Vec<u8>) {
        match self {
            Law::Ulaw => out.extend(pcm.iter().map(|s| linear_to_ulaw(*s))),
            Law::Alaw => out.extend(pcm.iter().map(|s| linear_to_alaw(*s))),
        }
    }

    /// Appends the decoding of `payload` to `out`.
    pub fn decode(self, payload: &[u8], out: &mut Vec<i16>) {
        let table = match self {
            Law::Ulaw => &ULAW_TO_LINEAR,
            Law::Alaw => &ALAW_TO_LINEAR,
        };
        out.extend(payload.iter().map(|c| table[usize::from(*c)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_code_points() {
        // Silence and full scale, from the G.711 tables.
        assert_eq!(linear_to_ulaw(0), 0xFF);
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(ulaw_to_linear(0x7F), 0);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(linear_to_ulaw(i16::MAX), 0x80);
        assert_eq!(linear_to_ulaw(i16::MIN), 0x00);
        assert_eq!(linear_to_alaw(0), 0xD5);
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xAA), 32256);
        assert_eq!(alaw_to_linear(0x2A), -32256);
        assert_eq!(linear_to_alaw(i16::MAX), 0xAA);
        assert_eq!(linear_to_alaw(i16::MIN), 0x2A);
    }

    #[test]
    fn every_code_survives_decode_then_encode() {
        for code in 0..=255u8 {
            assert_eq!(linear_to_alaw(alaw_to_linear(code)), code, "A-law {code:#x}");
            // µ-law has two zeros (0x7F and 0xFF); both decode to 0, which encodes to 0xFF.
            let back = linear_to_ulaw(ulaw_to_linear(code));
            if code == 0x7F {
                assert_eq!(back, 0xFF);
            } else {
                assert_eq!(back, code, "µ-law {code:#x}");
            }
        }
    }

    #[test]
    fn decoding_is_monotonic() {
        let ulaw: Vec<i16> = (0..128u8).map(|c| ulaw_to_linear(0xFF - c)).collect();
        assert!(ulaw.windows(2).all(|w| w[0] <= w[1]));
        let alaw: Vec<i16> = (0..128u8).map(|c| alaw_to_linear((0x80 | c) ^ 0x55)).collect();
        assert!(alaw.windows(2).all(|w| w[0] < w[1]), "{alaw:?}");
    }

    fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
        bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// Fingerprints of CPython's `audioop` (an ITU-conformant G.711) over
    /// every 16-bit sample and every code, computed once with:
    /// `audioop.lin2ulaw(all_samples_le, 2)` etc., FNV-1a 64 of the bytes.
    #[test]
    fn matches_an_independent_implementation_bit_for_bit() {
        let all = || i16::MIN..=i16::MAX;
        assert_eq!(fnv1a(all().map(linear_to_ulaw)), 0xd5ee_23f7_d0ff_ae91);
        assert_eq!(fnv1a(all().map(linear_to_alaw)), 0xf030_666e_b780_cf25);
        assert_eq!(fnv1a((0..=255u8).flat_map(|c| ulaw_to_linear(c).to_le_bytes())), 0xb91e_65d6_8481_a1a8);
        assert_eq!(fnv1a((0..=255u8).flat_map(|c| alaw_to_linear(c).to_le_bytes())), 0x693a_40ca_62a3_d2a5);
    }

    proptest! {
        /// Companding error is bounded by the step size of the sample's segment
        /// (about 1/16 of its magnitude, at least a few LSBs near zero).
        #[test]
        fn round_trip_error_is_within_one_step(s in any::<i16>()) {
            let bound = |x: i16| (i32::from(x).abs() / 16).max(16) + 1;
            // µ-law clips at ±32124.
            let clipped = (i32::from(s.unsigned_abs()) - 32124).max(0);
            let u = ulaw_to_linear(linear_to_ulaw(s));
            prop_assert!((i32::from(u) - i32::from(s)).abs() <= bound(s) + clipped, "µ {s} -> {u}");
            let a = alaw_to_linear(linear_to_alaw(s));
            prop_assert!((i32::from(a) - i32::from(s)).abs() <= bound(s), "A {s} -> {a}");
        }
    }
}
