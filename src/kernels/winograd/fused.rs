//! F(4x4, 3x3) and F(2x2, 3x3) with their weight transform fused into their products, for layers
//! with few tiles on CPUs with AVX-512F: F(4x4) for the UNet's 16x16 level in bf16 (32 tiles with
//! guidance), F(2x2) for the f32 UNet's 8x8 level (32 tiles with guidance, which took im2col
//! before: the blocked F(2x2) was no faster there) and its 16x16 level without guidance (64).
//!
//! The blocked path ([`super::run_within`]) writes the transformed weights of a block of output
//! channels (36 x 32 x 1280 f32, 5.9 MB at 1280 channels) and gemm reads them back, repacking the
//! transformed input of each position for every block: at 1280 channels and 16x16 it wrote and
//! read 236 MB of transformed weights and repacked as much input per call, and the weight
//! transform took as long as the products (20 ms each per call in the UNet, Zen 4). Here a task
//! takes a few panels of 16 output channels; for each chunk of 64 input channels it transforms
//! their weights into L2 (36 x 64 x 16 f32, 147 KiB; the same values as the blocked path's
//! `WeightTask::run_f4`; F(2x2): 16 x 64 x 16, as `run_f2`) and multiplies them at once with
//! the transformed input, which stays where it lies (no packing): each of 16 registers sums one
//! output channel over 16 tiles, each weight broadcast from L1. The products are the blocked
//! path's, summed in another order (tested against it).
//!
//! bf16 layers on CPUs with AVX512-BF16 multiply in bf16 here (`chunk_bf16`): the transformed
//! input (once per layer, `pair_input`) and each chunk's transformed weights are rounded to bf16
//! and paired by input channel, and `vdpbf16ps` adds two products per lane into the f32 sums, at
//! twice the f32 rate. Rounding the transformed values costs precision that F(4x4)'s transforms
//! magnify (within 1-3 % of the direct convolution's product scale on the tests' layers, against
//! 1e-6 for f32 products), so only this level takes it: last session's model of bf16 products at
//! every F(4x4) level moved m18's bf16 image from fp32 by 1.23 levels (PyTorch bf16: 0.585), at
//! the 16x16 level only by 0.49. Measured with it: m18 0.494, m9 0.507 levels (0.457-0.469 and
//! 0.509 before; PyTorch 0.585 and 0.630). `fused_bf16_speed` (Zen 4, 2 threads, in one
//! process, min of 15, ms, f32 / bf16 products): 1280 channels, batch 2 32.7 / 25.6; 2560 ->
//! 1280 56.4 / 43.7; batch 1 (16 tiles) 18.1 / 17.2.
//!
//! Only where the tiles are few (`MAX_TILES`, `MAX_TILES_F2`): each task reads the whole
//! transformed input once, which for many tiles is more than the transformed weights it saves.
//!
//! The f32 UNet's F(2x2) here sums in another order than the blocked path, within 1e-6 of the
//! products' scale (tested), so its parity with diffusers is that of F(2x2) (the parity suite
//! passes unchanged); the f32 VAE's F(4x4) layers have far more tiles than this path takes.

use std::arch::x86_64::*;

use super::{g4_row, grow, Band, OutputTask, Plan, Sink};
use crate::kernels::convert::Value;
use crate::kernels::vectorized;

/// Input channels per chunk.
const CH: usize = 64;
/// Output channels per panel: 16 registers of sums, one per channel.
const PANEL: usize = 16;
/// The most tiles (per band) for which the fused path is taken: the UNet's 16x16 level with
/// guidance (32). Its 32x32 level (128 tiles) reads the transformed input 40 times over at 640
/// channels, twice the traffic of the blocked path's transformed weights; from 128 tiles it was
/// 10 % faster alone (640 channels, `winograd_speed`: 29-31 -> 26-27 ms) but no faster in paired
/// m18 bf16 runs (UNet step min 4.29 / 4.38 / 4.45 s at 32, 4.49 / 4.37 / 4.36 s at 128; Zen 4).
pub(super) const MAX_TILES: usize = 32;
/// The same for F(2x2) in f32 (the UNet's 8x8 level with guidance: 32 tiles; its 16x16 level
/// without: 64). `winograd_speed` (Zen 4, 2 threads, ms, blocked / fused): 1280 channels at 8x8,
/// batch 2 (32 tiles) 21.1 / 15.9-16.9 (im2col 18.3-20.7); at 16x16, batch 1 (64) 27.6-42.1 /
/// 24.0-27.9; at 16x16, batch 2 (128) 45.7-59.5 / 49.1-52.2, no clear gain, so not there.
pub(super) const MAX_TILES_F2: usize = 64;
/// Transformed outputs a task keeps (f32): up to four panels of F(4x4)'s 36 positions at 32 tiles
/// (295 KiB, in L2); F(2x2)'s 16 positions at its 64 tiles come to 16 x 64 = 1024 per panel
/// column against 36 x 32 = 1152, so they fit the same four panels.
const TASK_OUTPUT: usize = 4 * 36 * PANEL * 32;
/// Values from one position's transformed weights to the next's in `u`: a chunk's `CH` x 16 and
/// one line more. The transform writes all 36 positions of an input channel at once; 4 KiB
/// apart (`CH` x 16 f32) those 36 lines fell in one set of the 8-way L1 and evicted each other
/// on every write. `winograd_speed` (Zen 4, 2 threads, bf16, min of 3-6 alternating runs, ms):
/// 1280 channels at 16x16, batch 1 20.5-21.7 -> 15.8-16.6; 2560 -> 1280, batch 2 63.9 -> 56.7.
const USTRIDE: usize = CH * PANEL + PANEL;
/// The same for the bf16 pairs of `u` (bf16 products): half as many words, and one line more.
const UBSTRIDE: usize = CH / 2 * PANEL + PANEL;

/// Whether this CPU and this layer take the fused path: F(4x4) or F(2x2) written out, one band of
/// at most `MAX_TILES` or `MAX_TILES_F2` tiles.
pub(super) fn applies(plan: &Plan, tiles: usize) -> bool {
    let most = match plan.t.m {
        4 => MAX_TILES,
        2 => MAX_TILES_F2,
        _ => 0,
    };
    plan.t.written_out && tiles <= most && available()
}

pub(super) fn available() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// Whether this CPU multiplies bf16 pairs (`vdpbf16ps`: AVX512-BF16 with AVX-512F and BW).
pub(super) fn bf16_available() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| {
        available()
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

/// A task's buffers, kept by each thread between calls (fresh ones for each of rayon's splits were
/// about 0.5 MB of new pages a call).
struct Buffers {
    /// The kernels of a panel's chunk, output channel innermost: k[(i * 9 + l) * 16 + j].
    k: Vec<f32>,
    /// Their transform: u[p * USTRIDE + i * 16 + j].
    u: Vec<f32>,
    /// The transformed outputs of the task's panels: m[((panel * 36 + p) * 16 + j) * nt + tile].
    m: Vec<f32>,
    /// The output transform's scratch.
    scratch: Vec<f32>,
    /// `u` rounded to bf16, input channels in pairs (bf16 products only): ub[p * UBSTRIDE +
    /// (i / 2) * 16 + j] holds U[p][i][j] (i even, low half) and U[p][i + 1][j] (high half).
    ub: Vec<u32>,
}

/// The convolution of a layer whose input is already transformed into `v` (V[p][ci][tile], one
/// band: `rows`), into `sink`; with `bf16`, its products in bf16 (the transformed input and
/// weights rounded, [`bf16_available`] must hold). [`applies`] must hold.
pub(super) fn run<X: Value>(
    plan: Plan,
    w: &[X],
    v: &[f32],
    rows: &std::ops::Range<usize>,
    sink: Sink,
    bf16: bool,
) {
    use rayon::prelude::*;
    let g = plan.g;
    let nt = rows.len() * plan.ntx;
    let positions = plan.t.a * plan.t.a;
    assert!(
        v.len() >= positions * g.ci * nt,
        "winograd: transformed input size"
    );
    let panels = g.co.div_ceil(PANEL);
    // With bf16 products: V's input channels in pairs, rounded, once for all the tasks.
    let pairs = if bf16 {
        let mut pairs = PAIRS
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        pair_input(v, positions, g.ci, nt, &mut pairs);
        pairs
    } else {
        Vec::new()
    };
    let vb = &pairs[..];
    // Up to four panels a task (each reads the transformed input once), but enough tasks for
    // every thread twice over.
    let threads = rayon::current_num_threads();
    let per_task = (TASK_OUTPUT / (positions * PANEL * nt))
        .min(panels.div_ceil(2 * threads))
        .clamp(1, 4);
    (0..panels.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            BUFFERS.with_borrow_mut(|buf| {
                let first = task * per_task;
                let count = per_task.min(panels - first);
                let panel_len = positions * PANEL * nt;
                let k = grow(&mut buf.k, 9 * CH * PANEL);
                let u = grow(&mut buf.u, 36 * USTRIDE);
                if bf16 {
                    buf.ub.resize(36 * UBSTRIDE, 0);
                }
                let m = grow(&mut buf.m, count * panel_len);
                for c0 in (0..g.ci).step_by(CH) {
                    let len = CH.min(g.ci - c0);
                    for (i, m) in m.chunks_exact_mut(panel_len).enumerate() {
                        let co0 = (first + i) * PANEL;
                        let nco = PANEL.min(g.co - co0);
                        let chunk = Chunk {
                            w,
                            m: plan.t.m,
                            ci_total: g.ci,
                            co0,
                            nco,
                            c0,
                            len,
                        };
                        // SAFETY: `available` (checked by `applies`) and, with `bf16`,
                        // `bf16_available` (the caller's promise); the buffers have the sizes
                        // `products` reads and writes (grown above), V holds 36 x ci x nt
                        // values and its pairs 36 x ceil(ci / 2) x nt.
                        unsafe {
                            if bf16 {
                                chunk_bf16(&chunk, k, u, &mut buf.ub, vb, nt, m)
                            } else {
                                chunk_avx512(&chunk, k, u, v, nt, m)
                            }
                        };
                    }
                }
                for (i, m) in m.chunks_exact(panel_len).enumerate() {
                    let co0 = (first + i) * PANEL;
                    for col in 0..PANEL.min(g.co - co0) {
                        vectorized(OutputTask {
                            band: Band::new(plan, rows, &mut buf.scratch),
                            mv: m,
                            co: co0 + col,
                            col,
                            nco: PANEL,
                            sink,
                        });
                    }
                }
            })
        });
    if bf16 {
        if let Ok(mut kept) = PAIRS.lock() {
            *kept = pairs;
        }
    }
}

/// V's pairs, kept between calls (a fresh buffer per call was pages to fault in each time).
static PAIRS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Frees V's pairs kept between calls ([`super::release_scratch`]).
pub(super) fn release_scratch() {
    if let Ok(mut kept) = PAIRS.lock() {
        *kept = Vec::new();
    }
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = const {
        std::cell::RefCell::new(Buffers {
            k: Vec::new(),
            u: Vec::new(),
            m: Vec::new(),
            scratch: Vec::new(),
            ub: Vec::new(),
        })
    };
}

/// One panel's chunk of input channels.
struct Chunk<'a, X> {
    w: &'a [X],
    /// The output tile's side: 4 (F(4x4), 36 positions) or 2 (F(2x2), 16).
    m: usize,
    ci_total: usize,
    /// The panel's first output channel and how many it has (16, or fewer in the last).
    co0: usize,
    nco: usize,
    /// The chunk's first input channel and how many it has.
    c0: usize,
    len: usize,
}

/// The chunk's weights transformed into `u`, then its products added into `m` (set on the first
/// chunk).
///
/// # Safety
/// The CPU has AVX-512F; `k` holds 9 x `CH` x 16 values and `u` P x `USTRIDE`, `m` P x 16 x `nt`, `v`
/// P x ci_total x `nt`, for the P = 36 (F(4x4)) or 16 (F(2x2)) positions of `c.m`.
#[target_feature(enable = "avx512f")]
unsafe fn chunk_avx512<X: Value>(
    c: &Chunk<X>,
    k: &mut [f32],
    u: &mut [f32],
    v: &[f32],
    nt: usize,
    m: &mut [f32],
) {
    if c.m == 2 {
        transform::<X, 4>(c, k, u, g2_rows);
        // SAFETY: the caller's promises.
        unsafe { products::<X, 16>(u, c, v, nt, m) };
    } else {
        transform::<X, 6>(c, k, u, g4_rows);
        // SAFETY: the caller's promises.
        unsafe { products::<X, 36>(u, c, v, nt, m) };
    }
}

/// U[p][i][j] for input channels c0 + i and output channels co0 + j (zero past `nco`), with
/// `g_rows` the A rows of `G` applied to three kernel values: the products and sums of
/// `WeightTask::run_f4` (A = 6) or `run_f2` (A = 4), in their order, 16 output channels at a time.
#[inline(always)]
fn transform<X: Value, const A: usize>(
    c: &Chunk<X>,
    k: &mut [f32],
    u: &mut [f32],
    g_rows: impl Fn(f32, f32, f32) -> [f32; A],
) {
    let (k, u) = (&mut k[..9 * CH * PANEL], &mut u[..A * A * USTRIDE]);
    // SAFETY: AVX-512F (`transform` runs inside `chunk_avx512` and `chunk_bf16`); `k` holds 9 x
    // CH x 16 values.
    unsafe { gather_kernels(c, k) };
    for i in 0..c.len {
        let mut kl = [[0f32; PANEL]; 9];
        for (l, kl) in kl.iter_mut().enumerate() {
            kl.copy_from_slice(&k[(i * 9 + l) * PANEL..][..PANEL]);
        }
        // gg[col][r] = (G g)[r][col], from kernel rows 0, 1, 2 of column col.
        let mut gg = [[[0f32; PANEL]; A]; 3];
        for (col, gg) in gg.iter_mut().enumerate() {
            for j in 0..PANEL {
                let values = g_rows(kl[col][j], kl[3 + col][j], kl[6 + col][j]);
                for (r, v) in values.into_iter().enumerate() {
                    gg[r][j] = v;
                }
            }
        }
        // U[r * A + q] = ((G g) G^T)[r][q], from columns 0, 1 and 2 of row r.
        for r in 0..A {
            let mut out = [[0f32; PANEL]; A];
            for j in 0..PANEL {
                let row = g_rows(gg[0][r][j], gg[1][r][j], gg[2][r][j]);
                for (q, v) in row.into_iter().enumerate() {
                    out[q][j] = v;
                }
            }
            for (q, out) in out.iter().enumerate() {
                u[(r * A + q) * USTRIDE + i * PANEL..][..PANEL].copy_from_slice(out);
            }
        }
    }
}

/// V's input channels in pairs, rounded to bf16: pairs[(p * ceil(ci / 2) + c) * nt + t] holds
/// V[p][2c][t] in its low half and V[p][2c + 1][t] (zero past `ci`) in its high half, the
/// operand layout of `vdpbf16ps` ([`pair16`]).
fn pair_input(v: &[f32], positions: usize, ci: usize, nt: usize, pairs: &mut Vec<u32>) {
    use rayon::prelude::*;
    let half = ci.div_ceil(2);
    pairs.resize(positions * half * nt, 0);
    if nt == 0 {
        return;
    }
    pairs
        .par_chunks_mut(half * nt)
        .enumerate()
        .for_each(|(p, dst)| {
            let rows = &v[p * ci * nt..][..ci * nt];
            // SAFETY: `bf16_available` (the caller's promise, through `run`); V's position p holds
            // ci rows of nt values and `dst` half rows of nt.
            unsafe { pair_position(rows, ci, nt, dst) };
        });
}

/// One position's rows of V (`ci` x `nt`) paired into `dst` (ceil(ci / 2) x `nt`).
///
/// # Safety
/// The CPU has AVX512-BF16 (with AVX-512F and BW); the slices have those lengths.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn pair_position(rows: &[f32], ci: usize, nt: usize, dst: &mut [u32]) {
    debug_assert!(rows.len() >= ci * nt && dst.len() >= ci.div_ceil(2) * nt);
    for (c, dst) in dst.chunks_exact_mut(nt).take(ci.div_ceil(2)).enumerate() {
        let has_odd = 2 * c + 1 < ci;
        for t0 in (0..nt).step_by(16) {
            let mask = lanes(nt - t0);
            // SAFETY: rows 2c and 2c + 1 (< ci) of nt values, tiles t0.. masked to nt.
            unsafe {
                let even = _mm512_maskz_loadu_ps(mask, rows.as_ptr().add(2 * c * nt + t0));
                let odd = if has_odd {
                    _mm512_maskz_loadu_ps(mask, rows.as_ptr().add((2 * c + 1) * nt + t0))
                } else {
                    _mm512_setzero_ps()
                };
                let words = pair16(even, odd);
                _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(t0).cast(), mask, words);
            }
        }
    }
}

/// Word t: `even[t]` rounded to bf16 in its low half, `odd[t]` in its high half
/// (`vcvtne2ps2bf16`: to nearest, ties to even, as `convert::round` rounds but for subnormal
/// values, which it flushes to zero; then the two halves interleaved).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
fn pair16(even: __m512, odd: __m512) -> __m512i {
    // Element k of the result is element INTERLEAVE[k] of [even 0..16, odd 0..16].
    const INTERLEAVE: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut k = 0;
        while k < 32 {
            idx[k] = (k / 2 + (k % 2) * 16) as u16;
            k += 1;
        }
        idx
    };
    // SAFETY: INTERLEAVE is 64 bytes.
    let idx = unsafe { _mm512_loadu_si512(INTERLEAVE.as_ptr().cast()) };
    let both = _mm512_cvtne2ps_pbh(odd, even);
    // SAFETY: 32 bf16 as 32 u16, the same 512 bits.
    let both = unsafe { std::mem::transmute::<__m512bh, __m512i>(both) };
    _mm512_permutexvar_epi16(idx, both)
}

/// [`chunk_avx512`] with bf16 products: the chunk's weights transformed in f32 as there, then
/// rounded into pairs of input channels (`ub`, as [`pair_input`] pairs V), and each output
/// channel's sums taken with `vdpbf16ps` over V's pairs `vb` (f32 sums, from the previous
/// chunks' in `m`).
///
/// # Safety
/// As [`chunk_avx512`] for F(4x4) (36 positions), with `vb` holding 36 x ceil(ci_total / 2) x
/// `nt` pairs and `ub` 36 x `UBSTRIDE`; the CPU has AVX512-BF16 (with AVX-512F and BW); the
/// chunk starts at an even input channel.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn chunk_bf16<X: Value>(
    c: &Chunk<X>,
    k: &mut [f32],
    u: &mut [f32],
    ub: &mut [u32],
    vb: &[u32],
    nt: usize,
    m: &mut [f32],
) {
    debug_assert!(c.m == 4 && c.c0.is_multiple_of(2));
    transform::<X, 6>(c, k, u, g4_rows);
    let half = c.len.div_ceil(2);
    debug_assert!(u.len() >= 36 * USTRIDE && ub.len() >= 36 * UBSTRIDE);
    for p in 0..36 {
        for i in 0..half {
            // SAFETY: rows 2i and 2i + 1 (< CH) of position p's 16 values in `u` (the odd one
            // only below `len`), word row i of position p in `ub`: inside both (checked above).
            unsafe {
                let at = u.as_ptr().add(p * USTRIDE + 2 * i * PANEL);
                let even = _mm512_loadu_ps(at);
                let odd = if 2 * i + 1 < c.len {
                    _mm512_loadu_ps(at.add(PANEL))
                } else {
                    _mm512_setzero_ps()
                };
                let dst = ub.as_mut_ptr().add(p * UBSTRIDE + i * PANEL);
                _mm512_storeu_si512(dst.cast(), pair16(even, odd));
            }
        }
    }
    // SAFETY: the caller's promises.
    unsafe { products_bf16(ub, c, vb, nt, m) };
}

/// M[p][j][tile] (+)= sum over the chunk's input channel pairs of U's pair [p][i][j] times V's
/// pair [p][c0 / 2 + i][tile] (`vdpbf16ps`: both products added in f32), as [`products`] sums
/// in f32: 16 registers, one per output channel, over 16 tiles at a time (the last masked).
///
/// # Safety
/// As [`chunk_bf16`].
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn products_bf16<X>(ub: &[u32], c: &Chunk<X>, vb: &[u32], nt: usize, m: &mut [f32]) {
    let (half, half_total) = (c.len.div_ceil(2), c.ci_total.div_ceil(2));
    debug_assert!(ub.len() >= 36 * UBSTRIDE && m.len() >= 36 * PANEL * nt);
    debug_assert!(vb.len() >= 36 * half_total * nt);
    for p in 0..36 {
        // SAFETY (all pointer arithmetic below): inside U's pairs (p < 36, i < half <= CH / 2,
        // j < 16), V's pairs (row p * half_total + c0 / 2 + i < 36 * half_total, tiles t0..
        // masked to nt) and M (row p * 16 + j, tiles masked to nt), as the caller promises.
        let (up, vp, mp) = unsafe {
            (
                ub.as_ptr().add(p * UBSTRIDE),
                vb.as_ptr().add((p * half_total + c.c0 / 2) * nt),
                m.as_mut_ptr().add(p * PANEL * nt),
            )
        };
        for t0 in (0..nt).step_by(16) {
            let mask = lanes(nt - t0);
            // SAFETY: M's rows p * 16 + j, tiles t0.. masked to nt (above).
            let mut acc = unsafe { sums_so_far(mp, nt, t0, mask, c.c0 > 0) };
            for i in 0..half {
                let words = unsafe { _mm512_maskz_loadu_epi32(mask, vp.add(i * nt + t0).cast()) };
                let x: __m512bh = unsafe { std::mem::transmute::<__m512i, __m512bh>(words) };
                let ui = unsafe { up.add(i * PANEL) };
                for (j, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_epi32(unsafe { *ui.add(j) } as i32);
                    let w: __m512bh = unsafe { std::mem::transmute::<__m512i, __m512bh>(w) };
                    *a = _mm512_dpbf16_ps(*a, w, x);
                }
            }
            // SAFETY: as `sums_so_far`.
            unsafe { store_sums(mp, nt, t0, mask, &acc) };
        }
    }
}

/// k[e * 16 + j] = element e (input channel e / 9, kernel element e % 9) of output channel
/// co0 + j, zero past `nco`: a row of 16 gathered from the panel's rows (each in L1 after its
/// first line), so that every store is one whole row. With `vpgatherdd`, bf16 kernels two
/// elements at a time (a 32-bit word, split into its halves); a value at a time (a load, a
/// widening and a store each) it took 13 % of the bf16 chunk's time (Zen 4).
///
/// # Safety
/// The CPU has AVX-512F; `k` holds `c.len` x 9 x 16 values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gather_kernels<X: Value>(c: &Chunk<X>, k: &mut [f32]) {
    let n = c.len * 9;
    debug_assert!(k.len() >= n * PANEL && c.nco >= 1 && c.nco <= PANEL);
    let first = (c.co0 * c.ci_total + c.c0) * 9;
    // The last output channel's chunk ends inside `w` (a caller's bug otherwise).
    assert!(
        first + (c.nco - 1) * c.ci_total * 9 + n <= c.w.len(),
        "fused: weights"
    );
    // The gathers below read `w` as 32-bit words: bf16 pairs or f32 values.
    const { assert!(std::mem::size_of::<X>() == if X::BF16 { 2 } else { 4 }) };
    let base = c.w[first..].as_ptr();
    let stride = (c.ci_total * 9) as i32;
    let rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(stride),
    );
    let mask: __mmask16 = if c.nco == PANEL {
        0xFFFF
    } else {
        (1u16 << c.nco) - 1
    };
    let out = k.as_mut_ptr();
    let mut e = 0;
    if X::BF16 {
        // Element pairs (e, e + 1) of each row as one word: bf16 e in its low half.
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        while e + 1 < n {
            // SAFETY: rows j < nco of the panel, elements e and e + 1 < n of each (asserted
            // above: inside `w`); k rows e and e + 1.
            unsafe {
                let words = _mm512_mask_i32gather_epi32::<2>(
                    _mm512_setzero_si512(),
                    mask,
                    rows,
                    base.add(e).cast(),
                );
                let lo = _mm512_slli_epi32::<16>(words);
                let hi = _mm512_and_si512(words, high);
                _mm512_storeu_ps(out.add(e * PANEL), _mm512_castsi512_ps(lo));
                _mm512_storeu_ps(out.add((e + 1) * PANEL), _mm512_castsi512_ps(hi));
            }
            e += 2;
        }
    } else {
        while e < n {
            // SAFETY: as above, for element e of each row (f32: the words themselves).
            unsafe {
                let v = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    mask,
                    rows,
                    base.add(e).cast(),
                );
                _mm512_storeu_ps(out.add(e * PANEL), v);
            }
            e += 1;
        }
    }
    // An odd last element (bf16): one value at a time.
    for e in e..n {
        for j in 0..PANEL {
            let v = if j < c.nco {
                c.w[first + j * c.ci_total * 9 + e].get()
            } else {
                0.0
            };
            // SAFETY: k row e < n.
            unsafe { *out.add(e * PANEL + j) = v };
        }
    }
}

/// The first `min(n, 16)` lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// A panel's 16 output channels' sums over tiles t0.. (`mask`) of M (rows `nt` apart from `mp`):
/// those of the chunks before (`earlier`), else zero.
///
/// # Safety
/// The CPU has AVX-512F; `mp` points at 16 rows of `nt` values, t0 + the mask's lanes <= nt.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sums_so_far(
    mp: *const f32,
    nt: usize,
    t0: usize,
    mask: __mmask16,
    earlier: bool,
) -> [__m512; PANEL] {
    let mut acc = [_mm512_setzero_ps(); PANEL];
    if earlier {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: the caller's promise.
            *a = unsafe { _mm512_maskz_loadu_ps(mask, mp.add(j * nt + t0)) };
        }
    }
    acc
}

/// Stores [`sums_so_far`]'s sums back.
///
/// # Safety
/// As [`sums_so_far`], with `mp` writable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_sums(mp: *mut f32, nt: usize, t0: usize, mask: __mmask16, acc: &[__m512; PANEL]) {
    for (j, a) in acc.iter().enumerate() {
        // SAFETY: the caller's promise.
        unsafe { _mm512_mask_storeu_ps(mp.add(j * nt + t0), mask, *a) };
    }
}

/// The six rows of `G` applied to (x0, x1, x2) ([`g4_row`]).
#[inline(always)]
fn g4_rows(x0: f32, x1: f32, x2: f32) -> [f32; 6] {
    [
        g4_row::<0>(x0, x1, x2),
        g4_row::<1>(x0, x1, x2),
        g4_row::<2>(x0, x1, x2),
        g4_row::<3>(x0, x1, x2),
        g4_row::<4>(x0, x1, x2),
        g4_row::<5>(x0, x1, x2),
    ]
}

/// F(2x2)'s four rows of `G` applied to (x0, x1, x2): a value, or a halved sum of three, as
/// `WeightTask::run_f2` makes them (the same products and sums in the same order).
#[inline(always)]
fn g2_rows(x0: f32, x1: f32, x2: f32) -> [f32; 4] {
    let h = 0.5f32;
    [
        x0,
        (h * x0 + h * x1) + h * x2,
        (h * x0 - h * x1) + h * x2,
        x2,
    ]
}

/// M[p][j][tile] (+)= sum over the chunk's input channels i of U[p][i][j] V[p][c0 + i][tile], for
/// the P positions: 16 registers, one per output channel, over 16 tiles at a time (the last ones
/// masked).
///
/// # Safety
/// As [`chunk_avx512`].
#[target_feature(enable = "avx512f")]
unsafe fn products<X, const P: usize>(
    u: &[f32],
    c: &Chunk<X>,
    v: &[f32],
    nt: usize,
    m: &mut [f32],
) {
    debug_assert!(u.len() >= P * USTRIDE && m.len() >= P * PANEL * nt);
    debug_assert!(v.len() >= P * c.ci_total * nt);
    for p in 0..P {
        // SAFETY (all pointer arithmetic below): inside U (p < P, i < len <= CH, j < 16), V
        // (row p * ci_total + c0 + i < P * ci_total, tiles t0.. masked to nt) and M (row
        // p * 16 + j, tiles masked to nt), as the caller promises.
        let (up, vp, mp) = unsafe {
            (
                u.as_ptr().add(p * USTRIDE),
                v.as_ptr().add((p * c.ci_total + c.c0) * nt),
                m.as_mut_ptr().add(p * PANEL * nt),
            )
        };
        for t0 in (0..nt).step_by(16) {
            let mask = lanes(nt - t0);
            // SAFETY: M's rows p * 16 + j, tiles t0.. masked to nt (above).
            let mut acc = unsafe { sums_so_far(mp, nt, t0, mask, c.c0 > 0) };
            for i in 0..c.len {
                let x = unsafe { _mm512_maskz_loadu_ps(mask, vp.add(i * nt + t0)) };
                let ui = unsafe { up.add(i * PANEL) };
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *ui.add(j) }), x, *a);
                }
            }
            // SAFETY: as `sums_so_far`.
            unsafe { store_sums(mp, nt, t0, mask, &acc) };
        }
    }
}
