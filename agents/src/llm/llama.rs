//! The local model's forward pass: a dense llama-architecture GGUF model
//! (SmolLM2 and its kin) with a KV cache that is written in place.
//!
//! candle-transformers' `quantized_llama` appends each token's keys and
//! values by copying the whole cache (`Tensor::cat`), then copies it again
//! once per query head sharing a key head (`repeat_kv`): for SmolLM2-135M
//! (9 query heads on 3 key heads, 30 layers) that is ~180 KB copied per
//! cached token for every token generated, so a call's replies slowed from
//! 58 to 31 tokens/s over 500 cached tokens. Here the cache is allocated
//! ahead (growing by doubling), a token's keys and values are written into
//! it, and the query heads of a group attend to their shared key head over
//! a view of the cache (one matrix product when a prompt is read, a loop
//! over the cache's memory for one new token): nothing is copied per
//! token. The weights are loaded by candle.
//!
//! Because the cache is overwritten in place, a state to go back to is a
//! token count, valid while the cache still holds those tokens
//! ([`KvCache::holds`]).
//!
//! The products with Q8_0 weights are [`super::q8`]'s, which may share
//! them with a spare thread while the other core is idle; candle's serve
//! other weights.

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, IndexOp, Module, Result, Storage, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

use super::q8::{self, Q8Matrix, Spare};

/// Positions the rotary tables cover: the most tokens a cache can hold.
const MAX_POSITIONS: usize = 4096;
/// Positions a cache holds when first written (it doubles when full).
const FIRST_CAPACITY: usize = 256;

/// A weight matrix: candle's, and, when it is Q8_0 in CPU memory, the
/// same memory read in place for [`q8::products`].
struct Weight {
    candle: QMatMul,
    q8: Option<Q8Matrix>,
}

impl Weight {
    fn new(tensor: candle_core::quantized::QTensor) -> Result<Self> {
        let candle = QMatMul::from_qtensor(tensor)?;
        let q8 = Q8Matrix::of(&candle);
        Ok(Weight { candle, q8 })
    }
}

struct Layer {
    wq: Weight,
    wk: Weight,
    wv: Weight,
    wo: Weight,
    attention_norm: RmsNorm,
    gate: Weight,
    down: Weight,
    up: Weight,
    ffn_norm: RmsNorm,
}

/// The weights, loaded once and shared by every conversation.
pub struct Llama {
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Weight,
    /// Shares the products while the other core is idle (CPU only).
    spare: Option<Spare>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// RoPE tables, (positions, head_dim / 2), for llama's interleaved
    /// pairs (2i, 2i+1).
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One conversation's keys and values, per layer (1, kv_heads, capacity,
/// head_dim), and the tokens they were computed from.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
    /// The tokens whose keys and values the cache holds, in position order.
    /// A write at position p drops those from p on first, so every entry
    /// was computed after exactly the tokens before it here.
    written: Vec<u32>,
}

/// One conversation's next token for [`Llama::forward_batch`]: `token` at
/// position `pos` of `cache` (which must hold the `pos` tokens before it).
pub struct Read<'a> {
    pub cache: &'a mut KvCache,
    pub pos: usize,
    pub token: u32,
}

impl KvCache {
    /// The tokens whose keys and values the cache holds, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.written
    }

    /// The cache holds the keys and values of `tokens` (read from the
    /// start): a state that had read them can be gone back to.
    pub fn holds(&self, tokens: &[u32]) -> bool {
        self.written.starts_with(tokens)
    }
}

impl Llama {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(content: &gguf_file::Content, reader: &mut R, device: &Device) -> Result<Self> {
        let md = |key: &str| content.metadata.get(key).ok_or_else(|| candle_core::Error::Msg(format!("gguf metadata has no {key}")));
        let arch = md("general.architecture").and_then(|v| v.to_string().cloned()).unwrap_or_default();
        // Other architectures name their metadata after themselves and
        // differ in more than names (RoPE pairing, biases, norms).
        if arch != "llama" {
            candle_core::bail!("architecture {arch:?} is not supported (llama only)");
        }
        if md("llama.expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        let heads = md("llama.attention.head_count")?.to_u32()? as usize;
        let kv_heads = md("llama.attention.head_count_kv")?.to_u32()? as usize;
        let blocks = md("llama.block_count")?.to_u32()? as usize;
        let hidden = md("llama.embedding_length")?.to_u32()? as usize;
        let rope_dim = md("llama.rope.dimension_count")?.to_u32()? as usize;
        let eps = md("llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let freq_base = md("llama.rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !hidden.is_multiple_of(heads) {
            candle_core::bail!("unsupported head layout: {heads} heads on {kv_heads} key heads, width {hidden}");
        }
        let head_dim = hidden / heads;
        if rope_dim != head_dim {
            candle_core::bail!("partial rotary embeddings are not supported ({rope_dim} of {head_dim})");
        }
        let (cos, sin) = rope_tables(head_dim, freq_base, device)?;
        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let embeddings_q = tensor("token_embd.weight")?;
        let embeddings = Embedding::new(embeddings_q.dequantize(device)?, hidden);
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, eps)?;
        // Models with tied embeddings (SmolLM2) have no output matrix.
        let output = Weight::new(match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embeddings_q,
        })?;
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            layers.push(Layer {
                wq: Weight::new(tensor(&name("attn_q"))?)?,
                wk: Weight::new(tensor(&name("attn_k"))?)?,
                wv: Weight::new(tensor(&name("attn_v"))?)?,
                wo: Weight::new(tensor(&name("attn_output"))?)?,
                attention_norm: RmsNorm::from_qtensor(tensor(&name("attn_norm"))?, eps)?,
                gate: Weight::new(tensor(&name("ffn_gate"))?)?,
                down: Weight::new(tensor(&name("ffn_down"))?)?,
                up: Weight::new(tensor(&name("ffn_up"))?)?,
                ffn_norm: RmsNorm::from_qtensor(tensor(&name("ffn_norm"))?, eps)?,
            });
        }
        let spare = if device.is_cpu() { Some(Spare::new().map_err(|e| candle_core::Error::Msg(format!("the LLM's spare thread: {e}")))?) } else { None };
        Ok(Llama { embeddings, layers, norm, output, spare, heads, kv_heads, head_dim, cos, sin, device: device.clone() })
    }

    /// Reads `tokens` at positions `pos..` (the cache must hold the `pos`
    /// tokens before them) and returns the logits after the last one.
    /// `wide`, asked before each product: it may use the spare thread too
    /// (the other core is idle). Asked per product rather than per pass, a
    /// job that starts on the other core meets the spare thread for one
    /// product at most, not for the rest of a prompt slice.
    pub fn forward(&self, cache: &mut KvCache, pos: usize, tokens: &[u32], wide: &dyn Fn() -> bool) -> Result<Tensor> {
        let seq = tokens.len();
        self.begin(cache, pos, seq)?;
        let end = pos + seq;
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mask = if seq > 1 { Some(causal_mask(seq, pos, &self.device)?) } else { None };
        let (cos, sin) = (self.cos.narrow(0, pos, seq)?, self.sin.narrow(0, pos, seq)?);
        let mut x = self.embeddings.forward(&input)?;
        for (layer, (k_cache, v_cache)) in self.layers.iter().zip(&cache.layers) {
            let (q, k, v) = self.queries_keys_values(wide, layer, &x, &cos, &sin)?;
            k_cache.slice_set(&k, 2, pos)?;
            v_cache.slice_set(&v, 2, pos)?;
            let attended = if seq == 1 && self.device.is_cpu() {
                self.attend_one(&q, k_cache, v_cache, end, cache.capacity)?
            } else {
                self.attend(&q, k_cache, v_cache, end, seq, mask.as_ref())?
            };
            x = self.after_attention(wide, layer, &x, &attended)?;
        }
        let last = self.norm.forward(&x)?.i((.., seq - 1..seq, ..))?;
        let [logits] = self.products(wide, &last, [&self.output])?;
        let logits = logits.flatten_all()?;
        cache.written.extend_from_slice(tokens);
        Ok(logits)
    }

    /// One new token for each of several conversations, read in one pass:
    /// the products take the tokens as the rows of one input, so each weight
    /// row is read from memory once for all of them (as a prompt's tokens
    /// are), and each token attends to its own cache at its own position.
    /// Returns the logits after each token, in the order of `reads`.
    pub fn forward_batch(&self, reads: &mut [Read<'_>], wide: &dyn Fn() -> bool) -> Result<Vec<Tensor>> {
        if reads.len() == 1 || !self.device.is_cpu() {
            return reads.iter_mut().map(|r| self.forward(r.cache, r.pos, &[r.token], wide)).collect();
        }
        for r in reads.iter_mut() {
            self.begin(r.cache, r.pos, 1)?;
        }
        let n = reads.len();
        let tokens: Vec<u32> = reads.iter().map(|r| r.token).collect();
        let positions = Tensor::new(reads.iter().map(|r| r.pos as u32).collect::<Vec<_>>(), &self.device)?;
        // The tokens stand where a prompt's positions would: rotated each by
        // its own position's angles.
        let (cos, sin) = (self.cos.index_select(&positions, 0)?, self.sin.index_select(&positions, 0)?);
        let mut x = self.embeddings.forward(&Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(0)?)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.queries_keys_values(wide, layer, &x, &cos, &sin)?;
            let mut attended = Vec::with_capacity(n);
            for (i, r) in reads.iter().enumerate() {
                let (k_cache, v_cache) = &r.cache.layers[l];
                k_cache.slice_set(&k.narrow(2, i, 1)?.contiguous()?, 2, r.pos)?;
                v_cache.slice_set(&v.narrow(2, i, 1)?.contiguous()?, 2, r.pos)?;
                attended.push(self.attend_one(&q.narrow(2, i, 1)?, k_cache, v_cache, r.pos + 1, r.cache.capacity)?);
            }
            x = self.after_attention(wide, layer, &x, &Tensor::cat(&attended, 1)?)?;
        }
        let [logits] = self.products(wide, &self.norm.forward(&x)?, [&self.output])?;
        let mut out = Vec::with_capacity(n);
        for (i, r) in reads.iter_mut().enumerate() {
            out.push(logits.i((0, i))?);
            r.cache.written.push(r.token);
        }
        Ok(out)
    }

    /// Drops positions `from..to` from `cache`: the keys and values after
    /// them move down as many places, the keys turned back by as many
    /// positions' angles (RoPE turns a key by its position, so a key moved
    /// d places earlier is the same key turned by -d), as llama.cpp's
    /// context shift does. The entries that move keep what their tokens
    /// made of the dropped ones in the layers above the first: a
    /// conversation loses those words without reading the rest again.
    pub fn forget(&self, cache: &mut KvCache, from: usize, to: usize) -> Result<()> {
        let held = cache.written.len();
        if from > to || to > held {
            candle_core::bail!("cannot forget positions {from}..{to} of a cache holding {held}");
        }
        let (gap, moved) = (to - from, held - to);
        if gap > 0 && moved > 0 {
            let cos = self.cos.narrow(0, gap, 1)?.repeat((moved, 1))?;
            let sin = self.sin.narrow(0, gap, 1)?.neg()?.repeat((moved, 1))?;
            for (k_cache, v_cache) in &cache.layers {
                // Copies: the slices are written back into the tensors they
                // were read from.
                let k = candle_nn::rotary_emb::rope_i(&k_cache.narrow(2, to, moved)?.force_contiguous()?, &cos, &sin)?;
                let v = v_cache.narrow(2, to, moved)?.force_contiguous()?;
                k_cache.slice_set(&k, 2, from)?;
                v_cache.slice_set(&v, 2, from)?;
            }
        }
        cache.written.drain(from..to);
        Ok(())
    }

    /// Checks that `seq` tokens fit at `pos` of `cache` and makes room for
    /// them. Whatever happens after, the cache holds nothing from `pos` on
    /// until the pass is complete.
    fn begin(&self, cache: &mut KvCache, pos: usize, seq: usize) -> Result<()> {
        if seq == 0 || pos > cache.written.len() {
            candle_core::bail!("forward of {seq} tokens at {pos} on a cache holding {}", cache.written.len());
        }
        let end = pos + seq;
        if end > MAX_POSITIONS {
            candle_core::bail!("{end} positions exceed the model's {MAX_POSITIONS}");
        }
        cache.written.truncate(pos);
        self.reserve(cache, end)
    }

    /// A layer's queries, keys and values for the rows of `x` (1, rows,
    /// hidden), as (1, heads, rows, head_dim), queries and keys rotated by
    /// `cos`/`sin` (one row of angles per row of `x`).
    fn queries_keys_values(&self, wide: &dyn Fn() -> bool, layer: &Layer, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let rows = x.dim(1)?;
        let h = layer.attention_norm.forward(x)?;
        let [q, k, v] = self.products(wide, &h, [&layer.wq, &layer.wk, &layer.wv])?;
        let q = candle_nn::rotary_emb::rope_i(&self.heads_of(&q, self.heads, rows)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&self.heads_of(&k, self.kv_heads, rows)?, cos, sin)?;
        Ok((q, k, self.heads_of(&v, self.kv_heads, rows)?))
    }

    /// The rest of a layer once its attention is `attended` (1, rows,
    /// hidden): the output product and the feed-forward, each added to
    /// what came in. Returns the layer's output.
    fn after_attention(&self, wide: &dyn Fn() -> bool, layer: &Layer, x: &Tensor, attended: &Tensor) -> Result<Tensor> {
        let [out] = self.products(wide, attended, [&layer.wo])?;
        let x1 = (out + x)?;
        let h = layer.ffn_norm.forward(&x1)?;
        let [gate, up] = self.products(wide, &h, [&layer.gate, &layer.up])?;
        let [mlp] = self.products(wide, &(candle_nn::ops::silu(&gate)? * up)?, [&layer.down])?;
        mlp + x1
    }

    /// `x` (1, tokens, cols) times each of `weights`, as (1, tokens,
    /// outputs): [`q8::products`] for Q8_0 weights on the CPU (with the
    /// spare thread when `wide()` says so), otherwise candle's products.
    fn products<const N: usize>(&self, wide: &dyn Fn() -> bool, x: &Tensor, weights: [&Weight; N]) -> Result<[Tensor; N]> {
        let ours: Option<Vec<&Q8Matrix>> = weights.iter().map(|w| w.q8.as_ref()).collect();
        let tensors = match (ours, &self.spare) {
            (Some(matrices), Some(spare)) => {
                let tokens = x.dim(1)?;
                let outs = q8::products(spare, wide(), &x.flatten_all()?.to_vec1::<f32>()?, tokens, &matrices)?;
                outs.into_iter()
                    .map(|o| {
                        let n = o.len() / tokens;
                        Tensor::from_vec(o, (1, tokens, n), &self.device)
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            _ => weights.iter().map(|w| w.candle.forward(x)).collect::<Result<Vec<_>>>()?,
        };
        tensors.try_into().map_err(|_| candle_core::Error::Msg("a product's outputs were lost".into()))
    }

    /// Attention of `seq` queries at positions `end - seq..end` (q: (1,
    /// heads, seq, head_dim)) over the first `end` cached keys and values,
    /// as (1, seq, heads * head_dim).
    fn attend(&self, q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, end: usize, seq: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let keys = k_cache.narrow(2, 0, end)?;
        let values = v_cache.narrow(2, 0, end)?;
        // Query heads h*g..h*g+g use key head h (as repeat_kv lays them
        // out): with the heads contiguous, a group's queries are rows of
        // one (g * seq, head_dim) matrix.
        let group = self.heads / self.kv_heads;
        let q = q.reshape((1, self.kv_heads, group * seq, self.head_dim))?;
        let scores = (q.matmul(&keys.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?;
        let scores = match mask {
            Some(mask) => scores.reshape((1, self.kv_heads, group, seq, end))?.broadcast_add(mask)?.reshape((1, self.kv_heads, group * seq, end))?,
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        weights.matmul(&values)?.reshape((1, self.heads, seq, self.head_dim))?.transpose(1, 2)?.reshape((1, seq, self.heads * self.head_dim))
    }

    /// [`attend`](Self::attend) for one new token on the CPU, read straight
    /// from the cache's memory: as matrix products it is a few rows against
    /// hundreds of columns, which candle's gemm packs and splits across
    /// threads at a cost that grew with the call (stage_speed, one call's
    /// turns: 49 -> 34 tokens/s over ~500 cached tokens with the products,
    /// 50 -> 42 with this loop).
    fn attend_one(&self, q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, end: usize, capacity: usize) -> Result<Tensor> {
        let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let (keys, _) = k_cache.storage_and_layout();
        let (values, _) = v_cache.storage_and_layout();
        let (Storage::Cpu(keys), Storage::Cpu(values)) = (&*keys, &*values) else {
            candle_core::bail!("the KV cache is not in CPU memory");
        };
        let shape = Heads { kv: self.kv_heads, group: self.heads / self.kv_heads, dim: self.head_dim, capacity };
        let mut out = vec![0.0; self.heads * self.head_dim];
        attention::one_token(&q, keys.as_slice()?, values.as_slice()?, end, shape, &mut out);
        Tensor::from_vec(out, (1, 1, self.heads * self.head_dim), &self.device)
    }

    /// (1, seq, n * head_dim) -> (1, n, seq, head_dim), contiguous.
    fn heads_of(&self, x: &Tensor, n: usize, seq: usize) -> Result<Tensor> {
        x.reshape((1, seq, n, self.head_dim))?.transpose(1, 2)?.contiguous()
    }

    /// Makes room for `end` positions, keeping what the cache holds.
    fn reserve(&self, cache: &mut KvCache, end: usize) -> Result<()> {
        if end <= cache.capacity {
            return Ok(());
        }
        let capacity = end.next_power_of_two().clamp(FIRST_CAPACITY, MAX_POSITIONS);
        let held = cache.written.len();
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let grown = || Tensor::zeros((1, self.kv_heads, capacity, self.head_dim), DType::F32, &self.device);
            let (k, v) = (grown()?, grown()?);
            if held > 0 {
                let (old_k, old_v) = &cache.layers[i];
                k.slice_set(&old_k.narrow(2, 0, held)?.contiguous()?, 2, 0)?;
                v.slice_set(&old_v.narrow(2, 0, held)?.contiguous()?, 2, 0)?;
            }
            layers.push((k, v));
        }
        cache.layers = layers;
        cache.capacity = capacity;
        Ok(())
    }
}

/// How the heads lie in the KV cache: `kv` key heads, each shared by
/// `group` query heads, `dim` wide, `capacity` positions per head.
#[derive(Clone, Copy)]
struct Heads {
    kv: usize,
    group: usize,
    dim: usize,
    capacity: usize,
}

/// Attention of one query position, in plain loops the compiler
/// vectorizes (on AVX2 when the CPU has it, chosen at run time).
mod attention {
    use super::Heads;

    /// `q`: the token's queries, head after head; `keys`/`values`: the
    /// cache, (key head, position, dim); `len` positions are attended;
    /// `out` gets the result, head after head.
    pub(super) fn one_token(q: &[f32], keys: &[f32], values: &[f32], len: usize, heads: Heads, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the one feature the function adds.
            return unsafe { one_token_avx2(q, keys, values, len, heads, out) };
        }
        one_token_body(q, keys, values, len, heads, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn one_token_avx2(q: &[f32], keys: &[f32], values: &[f32], len: usize, heads: Heads, out: &mut [f32]) {
        one_token_body(q, keys, values, len, heads, out)
    }

    #[inline(always)]
    fn one_token_body(q: &[f32], keys: &[f32], values: &[f32], len: usize, heads: Heads, out: &mut [f32]) {
        let Heads { kv, group, dim, capacity } = heads;
        let scale = 1.0 / (dim as f32).sqrt();
        // Each key and value row is read once for the whole group.
        let mut scores = vec![0.0f32; group * len];
        for h in 0..kv {
            let k = &keys[h * capacity * dim..][..len * dim];
            let v = &values[h * capacity * dim..][..len * dim];
            let q = &q[h * group * dim..][..group * dim];
            for (j, key) in k.chunks_exact(dim).enumerate() {
                for (r, query) in q.chunks_exact(dim).enumerate() {
                    scores[r * len + j] = dot(query, key) * scale;
                }
            }
            for row in scores.chunks_exact_mut(len) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                row.iter_mut().for_each(|s| *s /= sum);
            }
            let o = &mut out[h * group * dim..][..group * dim];
            o.fill(0.0);
            for (j, value) in v.chunks_exact(dim).enumerate() {
                for (r, acc) in o.chunks_exact_mut(dim).enumerate() {
                    let w = scores[r * len + j];
                    acc.iter_mut().zip(value).for_each(|(a, x)| *a += w * x);
                }
            }
        }
    }

    /// Eight partial sums, so that the loop vectorizes.
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in a8.zip(b8) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

/// cos and sin of each position's rotation angles, (positions, dim / 2).
fn rope_tables(dim: usize, base: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect();
    let theta = Tensor::new(theta.as_slice(), device)?.reshape((1, dim / 2))?;
    let positions = Tensor::arange(0, MAX_POSITIONS as u32, device)?.to_dtype(DType::F32)?.reshape((MAX_POSITIONS, 1))?;
    let angles = positions.matmul(&theta)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Added to the scores of `seq` queries at positions `pos..`: -inf where a
/// key comes after its query, (seq, pos + seq).
fn causal_mask(seq: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let keys = pos + seq;
    let mask: Vec<f32> = (0..seq).flat_map(|i| (0..keys).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_slice(&mask, (seq, keys), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::models::quantized_llama::ModelWeights;

    /// candle's own quantized llama on the installed model, beside ours.
    fn both() -> (ModelWeights, Llama) {
        let models = std::env::var("VOXGATE_MODELS_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../models").into());
        let path = crate::ModelPaths::new(models).llm;
        let open = || std::io::BufReader::new(std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup", path.display())));
        let mut reader = open();
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let ours = Llama::from_gguf(&content, &mut reader, &Device::Cpu).unwrap();
        let mut reader = open();
        let content = gguf_file::Content::read(&mut reader).unwrap();
        (ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap(), ours)
    }

    fn reference(model: &mut ModelWeights, pos: usize, tokens: &[u32]) -> Tensor {
        model.forward(&Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), pos).unwrap().squeeze(0).unwrap()
    }

    /// How far apart two logit vectors are: the largest difference, and
    /// their correlation.
    fn compare(a: &Tensor, b: &Tensor) -> (f32, f64) {
        let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
        let n = a.len() as f64;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let (ma, mb) = (mean(&a), mean(&b));
        let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
        for (&x, &y) in a.iter().zip(&b) {
            let (x, y) = (x as f64 - ma, y as f64 - mb);
            (ab, aa, bb) = (ab + x * y, aa + x * x, bb + y * y);
        }
        (a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max), ab / (aa * bb).sqrt())
    }

    #[test]
    fn logits_match_candles_quantized_llama_across_growth_and_going_back() {
        let (mut theirs, ours) = both();
        let mut cache = KvCache::default();
        // A prompt longer than the first allocation, read at once, then
        // tokens one by one past the point where the cache grows.
        let prompt: Vec<u32> = (0..250u32).map(|i| 200 + (i * 37) % 5000).collect();
        let mut checks = vec![compare(&reference(&mut theirs, 0, &prompt), &ours.forward(&mut cache, 0, &prompt, &|| false).unwrap())];
        let at_prompt = theirs.clone();
        // The installed model is Q8_0: single tokens take voxgate's
        // products, on one thread and on two in turn.
        assert!(ours.output.q8.is_some() && ours.layers.iter().all(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down].iter().all(|w| w.q8.is_some())));
        for (i, token) in (0..10u32).map(|i| 1000 + i * 7).enumerate() {
            let pos = prompt.len() + i;
            checks.push(compare(&reference(&mut theirs, pos, &[token]), &ours.forward(&mut cache, pos, &[token], &|| i % 2 == 1).unwrap()));
        }
        assert!(cache.capacity > FIRST_CAPACITY && cache.holds(&prompt));
        // Back to the end of the prompt, and other tokens read there.
        let other = [4000u32, 4001, 4002];
        checks.push(compare(&reference(&mut at_prompt.clone(), prompt.len(), &other), &ours.forward(&mut cache, prompt.len(), &other, &|| false).unwrap()));
        assert!(!cache.holds(&[prompt.clone(), vec![1000]].concat()), "the tokens read after the prompt are overwritten");
        // candle quantizes each layer's input to 8 bits, so a last-bit
        // difference in the attention's sums (the two do them in other
        // groupings, and candle's gemm picks its kernel by the CPU: 1.63
        // on an AVX-512 machine) can move a rounding and a logit by up to
        // ~1.5; a wrong position, head or cached token moves them all.
        for (i, (diff, correlation)) in checks.into_iter().enumerate() {
            assert!(diff < 2.5 && correlation > 0.995, "step {i}: logits differ by up to {diff}, correlation {correlation}");
        }
        // The bound tells a wrong cache apart: one token of 250 missing
        // (measured: correlation 0.956, a logit 3.75 off).
        let mut short = KvCache::default();
        ours.forward(&mut short, 0, &prompt[1..], &|| false).unwrap();
        let (_, correlation) = compare(&reference(&mut at_prompt.clone(), prompt.len(), &other[..1]), &ours.forward(&mut short, prompt.len() - 1, &other[..1], &|| false).unwrap());
        assert!(correlation < 0.995, "a cache one token short passes for right: {correlation}");
    }

    #[test]
    fn a_token_read_with_the_spare_thread_gives_the_logits_of_one_thread() {
        let (_, ours) = both();
        let (mut one, mut two) = (KvCache::default(), KvCache::default());
        let prompt: Vec<u32> = (0..40u32).map(|i| 300 + i * 11).collect();
        ours.forward(&mut one, 0, &prompt, &|| false).unwrap();
        ours.forward(&mut two, 0, &prompt, &|| false).unwrap();
        for (i, token) in (0..20u32).map(|i| 700 + i * 13).enumerate() {
            let pos = prompt.len() + i;
            let (a, b) = (ours.forward(&mut one, pos, &[token], &|| false).unwrap(), ours.forward(&mut two, pos, &[token], &|| true).unwrap());
            // Each row's sum is the same whichever thread does it.
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "token {i}");
        }
    }

    /// Not a check but a measurement for docs/BENCHMARKS.md (run by hand,
    /// alone on the machine: `cargo test --release -p voxgate-agents --lib
    /// pass_cost -- --ignored --nocapture`): the time of one pass for one
    /// token, for a prompt of n tokens, and for n conversations' tokens
    /// read together, on one thread and with the spare thread.
    #[test]
    #[ignore]
    fn pass_cost_by_tokens_read_together() {
        let (_, ours) = both();
        let prompt: Vec<u32> = (0..100u32).map(|i| 300 + i * 11).collect();
        let read = || {
            let mut cache = KvCache::default();
            ours.forward(&mut cache, 0, &prompt, &|| false).unwrap();
            cache
        };
        let ms = |t: std::time::Instant, passes: usize| t.elapsed().as_secs_f64() * 1000.0 / passes as f64;
        println!("| threads | tokens | one prompt: ms a pass | conversations together: ms a pass |\n|---|---|---|---|");
        for wide in [false, true] {
            let threads = if wide { 2 } else { 1 };
            let mut cache = read();
            let t = std::time::Instant::now();
            for i in 0..40 {
                ours.forward(&mut cache, prompt.len() + i, &[700 + i as u32], &|| wide).unwrap();
            }
            println!("| {threads} | 1 | {:.1} | |", ms(t, 40));
            for n in [2usize, 4, 8, 16] {
                let tokens: Vec<u32> = (0..n as u32).map(|i| 900 + i).collect();
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    ours.forward(&mut cache, 140, &tokens, &|| wide).unwrap();
                }
                let prompt_ms = ms(t, 10);
                let mut caches: Vec<KvCache> = (0..n).map(|_| read()).collect();
                let t = std::time::Instant::now();
                for i in 0..10 {
                    let mut reads: Vec<Read> = caches.iter_mut().map(|cache| Read { cache, pos: prompt.len() + i, token: 800 + i as u32 }).collect();
                    assert_eq!(ours.forward_batch(&mut reads, &|| wide).unwrap().len(), n);
                }
                println!("| {threads} | {n} | {prompt_ms:.1} | {:.1} |", ms(t, 10));
            }
        }
    }

    #[test]
    fn tokens_of_several_conversations_read_together_give_each_its_own_logits() {
        let (_, ours) = both();
        // Conversations of different lengths, so that every token sits at
        // another position and attends to another cache.
        let prompts: Vec<Vec<u32>> = [30u32, 57, 12].iter().map(|&n| (0..n).map(|i| 400 + i * 13 + n).collect()).collect();
        let read = |prompt: &Vec<u32>| {
            let mut cache = KvCache::default();
            ours.forward(&mut cache, 0, prompt, &|| false).unwrap();
            cache
        };
        let mut alone: Vec<KvCache> = prompts.iter().map(read).collect();
        let mut together: Vec<KvCache> = prompts.iter().map(read).collect();
        for step in 0..3u32 {
            let tokens: Vec<u32> = (0..3).map(|c| 1000 * (c + 1) + step).collect();
            let pos = |c: usize| prompts[c].len() + step as usize;
            let expected: Vec<Vec<f32>> = (0..3).map(|c| ours.forward(&mut alone[c], pos(c), &[tokens[c]], &|| false).unwrap().to_vec1().unwrap()).collect();
            let mut reads: Vec<Read> = together.iter_mut().enumerate().map(|(c, cache)| Read { cache, pos: pos(c), token: tokens[c] }).collect();
            // The second step with the spare thread: rows are summed alike.
            let got = ours.forward_batch(&mut reads, &|| step == 1).unwrap();
            for (c, logits) in got.iter().enumerate() {
                // Each row's products and the attention are the same sums in
                // the same order whichever way the tokens come.
                assert_eq!(logits.to_vec1::<f32>().unwrap(), expected[c], "conversation {c}, step {step}");
            }
        }
        for (c, cache) in together.iter().enumerate() {
            assert!(cache.holds(&[prompts[c].clone(), (0..3).map(|s| 1000 * (c as u32 + 1) + s).collect()].concat()));
        }
        // A position the cache does not reach is refused, as in `forward`.
        let mut cache = KvCache::default();
        let mut other = KvCache::default();
        assert!(ours.forward_batch(&mut [Read { cache: &mut cache, pos: 3, token: 5 }, Read { cache: &mut other, pos: 0, token: 5 }], &|| false).is_err());
    }

    #[test]
    fn a_forward_past_what_the_cache_holds_is_refused() {
        let (_, ours) = both();
        let mut cache = KvCache::default();
        assert!(ours.forward(&mut cache, 1, &[5], &|| false).is_err());
        assert!(ours.forward(&mut cache, 0, &[], &|| false).is_err());
    }

    #[test]
    fn the_mask_lets_each_query_see_the_cache_and_the_tokens_before_it() {
        let mask: Vec<Vec<f32>> = causal_mask(2, 3, &Device::Cpu).unwrap().to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(mask, vec![vec![0.0, 0.0, 0.0, 0.0, inf], vec![0.0; 5]]);
    }

    #[test]
    fn a_cache_holds_the_prefixes_of_what_it_was_written_with() {
        let cache = KvCache { written: vec![1, 2, 3], ..KvCache::default() };
        assert!(cache.holds(&[]));
        assert!(cache.holds(&[1, 2]));
        assert!(!cache.holds(&[1, 3]));
        assert!(!cache.holds(&[1, 2, 3, 4]));
    }

    #[test]
    fn forgotten_positions_leave_the_first_layer_as_a_fresh_read_of_the_rest() {
        let (_, ours) = both();
        let tokens: Vec<u32> = (0..60u32).map(|i| 300 + (i * 53) % 4000).collect();
        let mut cache = KvCache::default();
        ours.forward(&mut cache, 0, &tokens, &|| false).unwrap();
        ours.forget(&mut cache, 10, 35).unwrap();
        let rest: Vec<u32> = tokens[..10].iter().chain(&tokens[35..]).copied().collect();
        assert_eq!(cache.tokens(), &rest[..]);
        let mut fresh = KvCache::default();
        ours.forward(&mut fresh, 0, &rest, &|| false).unwrap();
        // A first layer's keys and values come from each token and its
        // position alone: the moved ones must be what a fresh read makes
        // at their new positions. Left where they were, or moved without
        // turning back, they are far off.
        let ((k, v), (fresh_k, fresh_v)) = (&cache.layers[0], &fresh.layers[0]);
        let n = rest.len();
        // The largest difference between two stretches of a cache.
        let farthest = |a: &Tensor, b: &Tensor| compare(&a.flatten_all().unwrap(), &b.flatten_all().unwrap()).0;
        let scale = fresh_k.narrow(2, 0, n).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(farthest(&k.narrow(2, 0, n).unwrap(), &fresh_k.narrow(2, 0, n).unwrap()) < scale * 1e-4, "keys differ");
        assert!(farthest(&v.narrow(2, 0, n).unwrap(), &fresh_v.narrow(2, 0, n).unwrap()) < 1e-5, "values differ");
        let mut whole = KvCache::default();
        ours.forward(&mut whole, 0, &tokens, &|| false).unwrap();
        let unturned = whole.layers[0].0.narrow(2, 35, 25).unwrap();
        assert!(farthest(&fresh_k.narrow(2, 10, 25).unwrap(), &unturned) > scale * 1e-2, "the turn back is what the test checks");
        // Reading goes on after the kept tokens, and the logits it gives
        // are close to a fresh read's (only the layers above the first
        // still carry the forgotten tokens).
        let next = [1234u32];
        let (after, fresh_after) = (ours.forward(&mut cache, n, &next, &|| false).unwrap(), ours.forward(&mut fresh, n, &next, &|| false).unwrap());
        let (_, correlation) = compare(&after, &fresh_after);
        assert!(correlation > 0.8, "correlation {correlation}");
        assert!(ours.forget(&mut cache, 5, n + 2).is_err());
    }
}
