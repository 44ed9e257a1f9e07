//! The local model's quantized products: Q8_0 weights times a token's (or
//! a prompt's) vectors, on the calling thread alone or shared with a spare
//! thread, chosen per product.
//!
//! candle splits each of its quantized products over a fixed pool of
//! threads and spin-waits for the other half. Beside another call's work on
//! the other core that half comes late, so voxgate runs candle on one
//! thread (`CANDLE_NUM_THREADS=1`), and a lone call paid for it: its
//! replies came at two thirds of the speed two threads give. Here the
//! choice is made for each product of a token or a slice of a prompt
//! ([`Spare::run`]'s `wide`; the server's `[agents] llm_threads`, 2 by
//! default, 1 turns it off): while nothing
//! else runs the spare thread takes rows too, and the calling thread never
//! waits for more than the one chunk of rows the spare thread is working
//! on, because both take chunks from one counter: a spare thread that is
//! late to start, or finds its core taken, leaves its share to the caller
//! instead of holding it up. It still takes the core from work that
//! starts on it during a product (when the choice was made per forward
//! pass, for a whole prompt slice, that made concurrent calls' slowest
//! turns slower: docs/BENCHMARKS.md, session 16).
//!
//! A prompt's rows are done here too: each weight row is read from memory
//! once for all of them (candle's tiled product does that as well, but
//! converts every block's scale through a call, which made it as slow per
//! token as generating).

use std::borrow::Cow;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Result;

/// Values per Q8_0 block (ggml's `QK8_0`).
const BLOCK: usize = 32;
/// Output rows taken from the shared counter at a time: ~20 KB of
/// SmolLM2-135M's weights, a few microseconds of work for one token, so
/// the last chunk the caller may wait for is short, and the counter is
/// touched seldom.
const CHUNK_ROWS: usize = 32;
/// How long the spare thread keeps looking for the next product, spinning,
/// before it sleeps: the products of one token follow each other within
/// microseconds; a longer gap (sampling a token, the pool's other jobs)
/// ends in sleep, and the next post wakes it.
const SPIN: Duration = Duration::from_micros(300);

/// ggml's Q8_0 block: 32 signed bytes and their scale (an f16's bits).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct Block {
    d: u16,
    qs: [i8; BLOCK],
}

/// A Q8_0 weight matrix (rows = outputs) held by candle, read in place.
pub struct Q8Matrix {
    tensor: Arc<QTensor>,
    rows: usize,
    row_blocks: usize,
}

impl Q8Matrix {
    /// The Q8_0 weights behind `m`, or None when they are of another kind
    /// or not in CPU memory (candle's product then serves every token).
    pub fn of(m: &QMatMul) -> Option<Self> {
        let QMatMul::QTensor(tensor) = m else { return None };
        if tensor.dtype() != GgmlDType::Q8_0 {
            return None;
        }
        let (rows, cols) = tensor.shape().dims2().ok()?;
        if cols % BLOCK != 0 {
            return None;
        }
        let matrix = Q8Matrix { tensor: tensor.clone(), rows, row_blocks: cols / BLOCK };
        matrix.blocks().ok()?;
        Some(matrix)
    }

    pub fn cols(&self) -> usize {
        self.row_blocks * BLOCK
    }

    /// The weights as blocks, row after row (candle's own memory: a CPU
    /// QTensor's data is borrowed, never copied).
    fn blocks(&self) -> Result<&[Block]> {
        match self.tensor.data()? {
            Cow::Borrowed(bytes) => match bytemuck::try_cast_slice::<u8, Block>(bytes) {
                Ok(blocks) if blocks.len() == self.rows * self.row_blocks => Ok(blocks),
                _ => candle_core::bail!("Q8_0 weights of unexpected size or alignment"),
            },
            Cow::Owned(_) => candle_core::bail!("Q8_0 weights are not in CPU memory"),
        }
    }
}

/// `x` as Q8_0 blocks, as candle quantizes a product's input (its
/// `BlockQ8_0::from_float`), so that both products agree.
pub fn quantize(x: &[f32]) -> Vec<Block> {
    x.chunks_exact(BLOCK)
        .map(|values| {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; BLOCK];
            for (q, v) in qs.iter_mut().zip(values) {
                *q = (v * id).round() as i8;
            }
            Block { d: half::f16::from_f32(d).to_bits(), qs }
        })
        .collect()
}

/// Rows `rows` of `w` times every token of `xs` (`tokens` rows of
/// `row_blocks` blocks), into `out[(r - rows.start) * tokens + t]`.
fn dot_chunk(w: &[Block], row_blocks: usize, xs: &[Block], rows: Range<usize>, out: &mut [f32]) {
    debug_assert_eq!(out.len() * row_blocks, rows.len() * xs.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        if std::is_x86_feature_detected!("avxvnni") {
            // SAFETY: the features it is compiled for were just detected.
            unsafe { vnni::dot_chunk(w, row_blocks, xs, rows, out) };
        } else {
            // SAFETY: as above.
            unsafe { avx2::dot_chunk(w, row_blocks, xs, rows, out) };
        }
        return;
    }
    let mut out = out.iter_mut();
    for r in rows {
        for x in xs.chunks_exact(row_blocks) {
            if let Some(o) = out.next() {
                *o = dot_scalar(&w[r * row_blocks..(r + 1) * row_blocks], x);
            }
        }
    }
}

/// What the `avx2` kernels are compiled for (the `vnni` ones add avxvnni).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c")
}

fn dot_scalar(w: &[Block], x: &[Block]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| {
            let sum: i32 = w.qs.iter().zip(&x.qs).map(|(&a, &b)| a as i32 * b as i32).sum();
            half::f16::from_bits(w.d).to_f32() * half::f16::from_bits(x.d).to_f32() * sum as f32
        })
        .sum()
}

/// The vector kernels, once per instruction set: `$features` for
/// `#[target_feature]`, and how a block's 32 byte products (|b| against a
/// with b's sign) become eight 32-bit sums.
#[cfg(target_arch = "x86_64")]
macro_rules! q8_kernels {
    ($module:ident, $features:literal, |$abs:ident, $signed:ident| $sums:expr) => {
        mod $module {
            use super::Block;
            use std::arch::x86_64::*;
            use std::ops::Range;

            #[target_feature(enable = $features)]
            fn scale(d: u16) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)))
            }

            #[target_feature(enable = $features)]
            fn sum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }

            /// Dots of each of the four rows `a` with `b`, each block of `b` loaded
            /// once for the four. `ahead`: the four rows that come next (or
            /// nothing), fetched into the cache meanwhile, block for block.
            #[target_feature(enable = $features)]
            #[inline]
            fn dot4(a: [&[Block]; 4], b: &[Block], ahead: &[Block]) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (k, bb) in b.iter().enumerate() {
                    for i in 0..4 {
                        if let Some(next) = ahead.get(i * b.len() + k) {
                            _mm_prefetch::<_MM_HINT_T0>(next as *const Block as *const i8);
                        }
                    }
                    // SAFETY: qs is 32 bytes; the loads are unaligned.
                    let bv = unsafe { _mm256_loadu_si256(bb.qs.as_ptr() as *const __m256i) };
                    let abs_b = _mm256_sign_epi8(bv, bv);
                    let bd = scale(bb.d);
                    for i in 0..4 {
                        let ab = &a[i][k];
                        let av = unsafe { _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i) };
                        let ($abs, $signed) = (abs_b, _mm256_sign_epi8(av, bv));
                        let dot = _mm256_cvtepi32_ps($sums);
                        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale(ab.d) * bd), dot, acc[i]);
                    }
                }
                [sum(acc[0]), sum(acc[1]), sum(acc[2]), sum(acc[3])]
            }

            /// Dots of the weight row `w` with each of the first `N` tokens
            /// of `xs` (token after token, their blocks' scales as f32 in
            /// `xd`, laid out alike) into `out`: each weight block is
            /// loaded and its scale converted once for all of them, and
            /// nothing is computed twice (a group of four filled up with
            /// copies of its last token did that for two and three).
            #[target_feature(enable = $features)]
            #[inline]
            fn row_tokens<const N: usize>(w: &[Block], xs: &[Block], xd: &[f32], ahead: &[Block], out: &mut [f32]) {
                let mut acc = [_mm256_setzero_ps(); N];
                let blocks = w.len();
                assert!(xs.len() >= N * blocks && xd.len() >= N * blocks && out.len() == N);
                for k in 0..blocks {
                    // SAFETY: k + i * blocks < N * blocks, within both token
                    // slices (checked above); qs is 32 bytes; the loads are
                    // unaligned.
                    let wb = unsafe { w.get_unchecked(k) };
                    if let Some(next) = ahead.get(k) {
                        _mm_prefetch::<_MM_HINT_T0>(next as *const Block as *const i8);
                    }
                    let wv = unsafe { _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i) };
                    let abs_w = _mm256_sign_epi8(wv, wv);
                    let dw = scale(wb.d);
                    for i in 0..N {
                        let (xb, d) = unsafe { (xs.get_unchecked(i * blocks + k), *xd.get_unchecked(i * blocks + k)) };
                        let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                        let ($abs, $signed) = (abs_w, _mm256_sign_epi8(xv, wv));
                        let dot = _mm256_cvtepi32_ps($sums);
                        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d), dot, acc[i]);
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = sum(a);
                }
            }

            /// See `super::dot_chunk`. One token: four weight rows at a time
            /// against it. More: each weight row against four tokens at a time,
            /// so a prompt reads each row from memory once, not once per token.
            #[target_feature(enable = $features)]
            pub(super) fn dot_chunk(w: &[Block], row_blocks: usize, xs: &[Block], rows: Range<usize>, out: &mut [f32]) {
                let tokens = xs.len() / row_blocks;
                let row = |r: usize| &w[r * row_blocks..(r + 1) * row_blocks];
                let token = |t: usize| &xs[t * row_blocks..(t + 1) * row_blocks];
                // Groups of four, the last filled up with its own last member.
                let four = |start: usize, end: usize| (start..end).step_by(4).map(move |s| (s, (end - s).min(4)));
                if tokens == 1 {
                    for (r, n) in four(rows.start, rows.end) {
                        // A token's products wait on memory (each weight is read
                        // once): fetching the next four rows while these are
                        // summed gave ~1.5x tokens/s (docs/BENCHMARKS.md,
                        // session 17). A prompt reads each row for many tokens.
                        let ahead = w.get((r + 4) * row_blocks..((r + 8) * row_blocks).min(w.len())).unwrap_or(&[]);
                        let d = dot4(std::array::from_fn(|i| row(r + i.min(n - 1))), token(0), ahead);
                        let at = r - rows.start;
                        out[at..at + n].copy_from_slice(&d[..n]);
                    }
                } else {
                    // The tokens' scales once per chunk, not once per row.
                    let xd: Vec<f32> = xs.iter().map(|b| scale(b.d)).collect();
                    const AHEAD: usize = 2;
                    for r in rows.clone() {
                        let ahead = w.get((r + AHEAD) * row_blocks..((r + AHEAD + 1) * row_blocks).min(w.len())).unwrap_or(&[]);
                        for (t, n) in four(0, tokens) {
                            // The next row is on its way by the first group's end.
                            let ahead = if t == 0 { ahead } else { &[] };
                            let at = (r - rows.start) * tokens + t;
                            let (xs, xd, out) = (&xs[t * row_blocks..], &xd[t * row_blocks..], &mut out[at..at + n]);
                            match n {
                                4 => row_tokens::<4>(row(r), xs, xd, ahead, out),
                                3 => row_tokens::<3>(row(r), xs, xd, ahead, out),
                                2 => row_tokens::<2>(row(r), xs, xd, ahead, out),
                                _ => row_tokens::<1>(row(r), xs, xd, ahead, out),
                            }
                        }
                    }
                }
            }
        }
    };
}

// ggml's `mul_sum_i8_pairs`: quantized bytes are within ±127, so no pair
// of products saturates the 16-bit sums.
#[cfg(target_arch = "x86_64")]
q8_kernels!(avx2, "avx2,fma,f16c", |abs, signed| _mm256_madd_epi16(_mm256_maddubs_epi16(abs, signed), _mm256_set1_epi16(1)));
// AVX-VNNI sums four byte products into each 32-bit lane in one
// instruction (ggml's `mul_sum_us8_pairs_float` with `__AVXVNNI__`).
#[cfg(target_arch = "x86_64")]
q8_kernels!(vnni, "avx2,fma,f16c,avxvnni", |abs, signed| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), abs, signed));

/// Products of `tokens` input rows (`x`, row after row) with several
/// matrices: one output per matrix, (tokens, its rows) row after row. The
/// matrices of one input, such as a layer's query, key and value, go as
/// one job.
pub fn products(spare: &Spare, wide: bool, x: &[f32], tokens: usize, matrices: &[&Q8Matrix]) -> Result<Vec<Vec<f32>>> {
    let mut weights = Vec::with_capacity(matrices.len());
    for m in matrices {
        if tokens == 0 || x.len() != tokens * m.cols() {
            candle_core::bail!("a product of {} values in {tokens} rows with a matrix of {} columns", x.len(), m.cols());
        }
        weights.push(m.blocks()?);
    }
    let xq = quantize(x);
    let mut outs: Vec<Vec<f32>> = matrices.iter().map(|m| vec![0.0; tokens * m.rows]).collect();
    // Chunk c of the job: matrix index and rows, matrices one after another.
    let chunks_of = |m: &Q8Matrix| m.rows.div_ceil(CHUNK_ROWS);
    let firsts: Vec<usize> = matrices.iter().scan(0, |n, m| Some(std::mem::replace(n, *n + chunks_of(m)))).collect();
    let total: usize = matrices.iter().map(|m| chunks_of(m)).sum();
    let targets: Vec<Target> = outs.iter_mut().map(|o| Target(o.as_mut_ptr())).collect();
    let work = |c: usize| {
        let i = firsts.partition_point(|&f| f <= c) - 1;
        let m = matrices[i];
        let start = (c - firsts[i]) * CHUNK_ROWS;
        let rows = start..(start + CHUNK_ROWS).min(m.rows);
        let mut chunk = vec![0.0; rows.len() * tokens];
        dot_chunk(weights[i], m.row_blocks, &xq, rows.clone(), &mut chunk);
        for (at, r) in rows.enumerate() {
            for t in 0..tokens {
                // SAFETY: chunk c is taken by exactly one thread (the
                // counter hands each out once), (t, r) lies within the
                // matrix's output, and no two chunks share a row; the
                // buffers outlive the job.
                unsafe { *targets[i].0.add(t * m.rows + r) = chunk[at * tokens + t] };
            }
        }
    };
    spare.run(total, &work, wide)?;
    Ok(outs)
}

/// An output buffer's start, written by several threads at disjoint rows.
struct Target(*mut f32);
// SAFETY: each thread writes only rows of chunks it took (see `products`).
unsafe impl Sync for Target {}

/// Phases of a job in `Shared::state` (the low two bits; the job's number
/// is the rest).
const POSTED: u64 = 1;
const TAKEN: u64 = 2;
const DONE: u64 = 3;
const RETRACTED: u64 = 0;

/// The work of one job: take chunks from `next` until there are none.
#[derive(Clone, Copy)]
struct Job {
    chunks: usize,
    next: *const AtomicUsize,
    work: *const (dyn Fn(usize) + Sync),
}

struct Shared {
    state: AtomicU64,
    /// Written by the caller before it posts, read by the spare thread once
    /// it has taken the job (the state's release/acquire orders both).
    job: UnsafeCell<Option<Job>>,
    /// The spare thread's part of the last job panicked.
    failed: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the thread holding `Spare::owner` while
// no job is posted or taken, and read only by the spare thread between
// taking a job and marking it done, during which the poster waits.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A thread that takes a share of a token's products while the other core
/// is idle. One per model; callers that find it busy work alone.
pub struct Spare {
    shared: Arc<Shared>,
    /// The number of the last job posted; held while a job runs.
    owner: Mutex<u64>,
    thread: Option<JoinHandle<()>>,
}

impl Spare {
    pub fn new() -> std::io::Result<Self> {
        let shared = Arc::new(Shared { state: AtomicU64::new(RETRACTED), job: UnsafeCell::new(None), failed: AtomicBool::new(false), stop: AtomicBool::new(false) });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new().name("voxgate-llm-spare".into()).spawn(move || spare_loop(&theirs))?;
        Ok(Spare { shared, owner: Mutex::new(0), thread: Some(thread) })
    }

    /// Runs `work(c)` for every chunk `c < chunks`: on this thread alone,
    /// or, when `wide` and the spare thread is free, on both. Returns once
    /// every chunk is done.
    pub fn run(&self, chunks: usize, work: &(dyn Fn(usize) + Sync), wide: bool) -> Result<()> {
        let next = AtomicUsize::new(0);
        let owner = if wide && chunks > 1 { self.owner.try_lock().ok() } else { None };
        let Some(mut number) = owner else {
            take_chunks(&next, chunks, work);
            return Ok(());
        };
        *number += 1;
        let id = *number << 2;
        // SAFETY: the job's pointers are to this frame's `next` and `work`,
        // which outlive it: `Posted`'s drop (even on a panic in `work`)
        // retracts the job or waits until the spare thread is done with it.
        // The 'static is only the type's; the borrow ends with this frame.
        let work: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
        unsafe { *self.shared.job.get() = Some(Job { chunks, next: &next, work }) };
        self.shared.state.store(id | POSTED, Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
        let posted = Posted { shared: &self.shared, id };
        // SAFETY: `work` is the caller's reference, alive for this call.
        take_chunks(&next, chunks, unsafe { &*work });
        drop(posted);
        if self.shared.failed.swap(false, Ordering::AcqRel) {
            candle_core::bail!("the spare thread's share of a product failed");
        }
        Ok(())
    }
}

fn take_chunks(next: &AtomicUsize, chunks: usize, work: &(dyn Fn(usize) + Sync)) {
    loop {
        let c = next.fetch_add(1, Ordering::Relaxed);
        if c >= chunks {
            return;
        }
        work(c);
    }
}

/// A posted job: dropping it retracts the job if the spare thread has not
/// taken it, or waits until the spare thread is done with it.
struct Posted<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Posted<'_> {
    fn drop(&mut self) {
        if self.shared.state.compare_exchange(self.id | POSTED, self.id | RETRACTED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return;
        }
        // Taken: the spare thread holds at most the chunk it is on (the
        // counter is exhausted by now, unless this thread panicked).
        while self.shared.state.load(Ordering::Acquire) != self.id | DONE {
            std::hint::spin_loop();
        }
    }
}

fn spare_loop(shared: &Shared) {
    let mut last_job = Instant::now();
    let mut polls: u32 = 0;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let state = shared.state.load(Ordering::Acquire);
        if state & 3 == POSTED && shared.state.compare_exchange(state, state - POSTED + TAKEN, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // SAFETY: the poster wrote the job before posting it and keeps
            // it alive until this thread marks it done.
            let job = unsafe { *shared.job.get() };
            if let Some(job) = job {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    // SAFETY: as above, both pointers outlive the job.
                    take_chunks(unsafe { &*job.next }, job.chunks, unsafe { &*job.work })
                }));
                if ran.is_err() {
                    shared.failed.store(true, Ordering::Release);
                }
            }
            shared.state.store(state - POSTED + DONE, Ordering::Release);
            last_job = Instant::now();
            polls = 0;
            continue;
        }
        polls = polls.wrapping_add(1);
        if !polls.is_multiple_of(64) || last_job.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            // A post unparks this thread; one made between the check above
            // and here leaves the token, so park returns at once.
            std::thread::park();
            last_job = Instant::now();
        }
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    fn matrix(rows: usize, cols: usize, seed: u64) -> (QMatMul, Q8Matrix) {
        let values: Vec<f32> = (0..rows * cols).map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        let w = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        let view = Q8Matrix::of(&q).expect("a Q8_0 matrix in CPU memory");
        (q, view)
    }

    fn input(cols: usize) -> Vec<f32> {
        (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// candle's product of `x` (`tokens` rows) with `q`, row after row.
    fn candles(q: &QMatMul, x: &[f32], tokens: usize) -> Vec<f32> {
        let x = Tensor::from_vec(x.to_vec(), (tokens, x.len() / tokens), &Device::Cpu).unwrap();
        q.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn products_match_candles_for_a_token_and_a_prompt_on_one_thread_and_on_two() {
        let spare = Spare::new().unwrap();
        // Row and token counts not multiples of 4 or of a chunk, as the
        // last of each are handled apart.
        let (q1, m1) = matrix(203, 576, 1);
        let (q2, m2) = matrix(64, 576, 2);
        for tokens in [1, 6] {
            let x = input(576 * tokens);
            let (e1, e2) = (candles(&q1, &x, tokens), candles(&q2, &x, tokens));
            for wide in [false, true] {
                for _ in 0..20 {
                    let outs = products(&spare, wide, &x, tokens, &[&m1, &m2]).unwrap();
                    assert!(max_diff(&outs[0], &e1) < 1e-4, "{tokens} tokens, wide {wide}: {}", max_diff(&outs[0], &e1));
                    assert!(max_diff(&outs[1], &e2) < 1e-4, "{tokens} tokens, wide {wide}: {}", max_diff(&outs[1], &e2));
                }
            }
            // The bound is not loose: a product one row off is far from it.
            let outs = products(&spare, true, &x, tokens, &[&m1]).unwrap();
            assert!(max_diff(&outs[0][1..], &e1[..e1.len() - 1]) > 1e-2);
        }
        // Inputs that do not fit the matrix are refused.
        assert!(products(&spare, false, &input(575), 1, &[&m1]).is_err());
        assert!(products(&spare, false, &input(576), 2, &[&m1]).is_err());
    }

    type Kernel = fn(&[Block], usize, &[Block], Range<usize>, &mut [f32]);

    /// Each vector kernel this CPU can run, beside the one chosen for it.
    fn kernels() -> Vec<(&'static str, Kernel)> {
        let mut kernels: Vec<(&'static str, Kernel)> = vec![("chosen", dot_chunk)];
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the features each is compiled for are detected.
            kernels.push(("avx2", |w, n, xs, rows, out| unsafe { avx2::dot_chunk(w, n, xs, rows, out) }));
            if std::is_x86_feature_detected!("avxvnni") {
                kernels.push(("avxvnni", |w, n, xs, rows, out| unsafe { vnni::dot_chunk(w, n, xs, rows, out) }));
            }
        }
        kernels
    }

    #[test]
    fn the_scalar_and_vector_dots_agree() {
        let (_, m) = matrix(9, 96, 3);
        let w = m.blocks().unwrap();
        // Groups of four tokens and the rest (three, two, one) apart.
        for tokens in [1, 2, 3, 5, 7] {
            let xq = quantize(&input(96 * tokens));
            for (kernel, dot) in kernels() {
                let mut out = vec![0.0; 9 * tokens];
                dot(w, 3, &xq, 0..9, &mut out);
                for r in 0..9 {
                    for t in 0..tokens {
                        let scalar = dot_scalar(&w[r * 3..(r + 1) * 3], &xq[t * 3..(t + 1) * 3]);
                        let o = out[r * tokens + t];
                        assert!((o - scalar).abs() < 1e-4, "{kernel}: row {r} token {t}: {o} vs {scalar}");
                    }
                }
            }
        }
    }

    #[test]
    fn two_threads_at_once_share_the_spare_without_mixing_their_jobs() {
        let spare = Arc::new(Spare::new().unwrap());
        let (q, m) = matrix(300, 256, 4);
        let m = Arc::new(m);
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let (spare, m) = (spare.clone(), m.clone());
                let x = input(256).iter().map(|v| v * (t + 1) as f32).collect::<Vec<_>>();
                let expected = candles(&q, &x, 1);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let out = products(&spare, true, &x, 1, &[&m]).unwrap();
                        assert!(max_diff(&out[0], &expected) < 1e-3);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn other_kinds_of_weights_are_left_to_candle() {
        let w = Tensor::zeros((8, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).unwrap();
        assert!(Q8Matrix::of(&q).is_none());
    }
}
