//! One token's quantized products: Q8_0 weights times one vector, on the
//! calling thread alone or shared with a spare thread, chosen per token.
//!
//! candle splits each of its quantized products over a fixed pool of
//! threads and spin-waits for the other half. Beside another call's work on
//! the other core that half comes late, so voxgate runs candle on one
//! thread (`CANDLE_NUM_THREADS=1`), and a lone call paid for it: its
//! replies came at two thirds of the speed two threads give. Here the
//! choice is made for each token ([`Spare::run`]'s `wide`): while nothing
//! else runs the spare thread takes rows too, and the calling thread never
//! waits for more than the one chunk of rows the spare thread is working
//! on, because both take chunks from one counter: a spare thread that is
//! late to start, or finds its core taken, leaves its share to the caller
//! instead of holding it up.
//!
//! Only products of one row are done here (a generated token's). A prompt's
//! many rows go through candle's tiled product, which reads each weight
//! once for a block of rows.

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
/// SmolLM2-135M's weights, a few microseconds of work, so the last chunk
/// the caller may wait for is short, and the counter is touched seldom.
const CHUNK_ROWS: usize = 32;
/// How long the spare thread keeps looking for the next product, spinning,
/// before it sleeps: the products of one token follow each other within
/// microseconds, the next token's after its sampling (well under this).
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

/// `out[i] = row (rows.start + i) of w · x`.
fn dot_rows(w: &[Block], row_blocks: usize, x: &[Block], rows: Range<usize>, out: &mut [f32]) {
    debug_assert_eq!(out.len(), rows.len());
    debug_assert_eq!(x.len(), row_blocks);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
        // SAFETY: the features it is compiled for were just detected.
        unsafe { avx2::dot_rows(w, row_blocks, x, rows, out) };
        return;
    }
    for (o, r) in out.iter_mut().zip(rows) {
        *o = dot_scalar(&w[r * row_blocks..(r + 1) * row_blocks], x);
    }
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Block;
    use std::arch::x86_64::*;
    use std::ops::Range;

    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale(d: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)))
    }

    /// The 32 byte products of a block pair summed into 8 lanes (ggml's
    /// `mul_sum_i8_pairs`: |x| times w with x's sign; x's bytes are within
    /// ±127, so no pair of products saturates the 16-bit sums).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_dot(abs_x: __m256i, x: __m256i, w: &Block) -> __m256 {
        // SAFETY: qs is 32 bytes; the load is unaligned.
        let w = unsafe { _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i) };
        let pairs = _mm256_maddubs_epi16(abs_x, _mm256_sign_epi8(w, x));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Four rows at a time, so each block of `x` is loaded once for four.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_rows(w: &[Block], row_blocks: usize, x: &[Block], rows: Range<usize>, out: &mut [f32]) {
        let mut row = rows.start;
        let mut out = out.iter_mut();
        while row < rows.end {
            let n = (rows.end - row).min(4);
            let w_rows: [&[Block]; 4] = std::array::from_fn(|i| {
                let r = row + i.min(n - 1);
                &w[r * row_blocks..(r + 1) * row_blocks]
            });
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, xb) in x.iter().enumerate() {
                // SAFETY: qs is 32 bytes; the load is unaligned.
                let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                let abs_x = _mm256_sign_epi8(xv, xv);
                let xd = scale(xb.d);
                for i in 0..4 {
                    let wb = &w_rows[i][b];
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale(wb.d) * xd), block_dot(abs_x, xv, wb), acc[i]);
                }
            }
            for a in acc.iter().take(n) {
                if let Some(o) = out.next() {
                    *o = sum(*a);
                }
            }
            row += n;
        }
    }
}

/// Products of one input with several matrices, each output written to
/// its own rows of one buffer (the matrices of one input, such as a layer's
/// query, key and value, go as one job).
pub fn products(spare: &Spare, wide: bool, x: &[f32], matrices: &[&Q8Matrix]) -> Result<Vec<Vec<f32>>> {
    let xq = quantize(x);
    let mut weights = Vec::with_capacity(matrices.len());
    for m in matrices {
        if m.row_blocks != xq.len() || x.len() % BLOCK != 0 {
            candle_core::bail!("a product of {} values with a matrix of {} columns", x.len(), m.cols());
        }
        weights.push(m.blocks()?);
    }
    let mut outs: Vec<Vec<f32>> = matrices.iter().map(|m| vec![0.0; m.rows]).collect();
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
        // SAFETY: chunk c is taken by exactly one thread (the counter hands
        // each out once), its rows lie within the matrix's output buffer,
        // and no two chunks overlap; the buffers outlive the job.
        let out = unsafe { std::slice::from_raw_parts_mut(targets[i].0.add(rows.start), rows.len()) };
        dot_rows(weights[i], m.row_blocks, &xq, rows, out);
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
        if polls % 64 != 0 || last_job.elapsed() < SPIN {
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

    #[test]
    fn products_match_candles_on_one_thread_and_on_two() {
        let spare = Spare::new().unwrap();
        // Row counts not multiples of 4 or of a chunk, as the last rows of a
        // matrix are handled apart.
        let (q1, m1) = matrix(203, 576, 1);
        let (q2, m2) = matrix(64, 576, 2);
        let x = input(576);
        let expected = |q: &QMatMul| q.forward(&Tensor::from_vec(x.clone(), (1, 576), &Device::Cpu).unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (e1, e2) = (expected(&q1), expected(&q2));
        for wide in [false, true] {
            for _ in 0..50 {
                let outs = products(&spare, wide, &x, &[&m1, &m2]).unwrap();
                assert!(max_diff(&outs[0], &e1) < 1e-4, "wide {wide}: {}", max_diff(&outs[0], &e1));
                assert!(max_diff(&outs[1], &e2) < 1e-4, "wide {wide}: {}", max_diff(&outs[1], &e2));
            }
        }
        // The bound is not loose: a product one row off is far from it.
        let outs = products(&spare, true, &x, &[&m1]).unwrap();
        assert!(max_diff(&outs[0][1..], &e1[..202]) > 1e-2);
    }

    #[test]
    fn the_scalar_and_vector_dots_agree() {
        let (_, m) = matrix(9, 96, 3);
        let xq = quantize(&input(96));
        let w = m.blocks().unwrap();
        let mut out = vec![0.0; 9];
        dot_rows(w, 3, &xq, 0..9, &mut out);
        for (r, o) in out.iter().enumerate() {
            let scalar = dot_scalar(&w[r * 3..(r + 1) * 3], &xq);
            assert!((o - scalar).abs() < 1e-4, "row {r}: {o} vs {scalar}");
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
                let expected = q.forward(&Tensor::from_vec(x.clone(), (1, 256), &Device::Cpu).unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let out = products(&spare, true, &x, &[&m]).unwrap();
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
