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
//! output channel over 16 tiles, each weight broadcast from L1. The products are the blocked path's, summed in another order
//! (tested against it).
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

/// A task's buffers, kept by each thread between calls (fresh ones for each of rayon's splits were
/// about 0.5 MB of new pages a call).
struct Buffers {
    /// The kernels of a panel's chunk, output channel innermost: k[(i * 9 + l) * 16 + j].
    k: Vec<f32>,
    /// Their transform: u[(p * CH + i) * 16 + j].
    u: Vec<f32>,
    /// The transformed outputs of the task's panels: m[((panel * 36 + p) * 16 + j) * nt + tile].
    m: Vec<f32>,
    /// The output transform's scratch.
    scratch: Vec<f32>,
}

/// The convolution of a layer whose input is already transformed into `v` (V[p][ci][tile], one
/// band: `rows`), into `sink`. [`applies`] must hold.
pub(super) fn run<X: Value>(
    plan: Plan,
    w: &[X],
    v: &[f32],
    rows: &std::ops::Range<usize>,
    sink: Sink,
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
                let u = grow(&mut buf.u, 36 * CH * PANEL);
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
                        // SAFETY: `available` (checked by `applies`); the buffers have the sizes
                        // `products` reads and writes (grown above), V holds 36 x ci x nt values.
                        unsafe { chunk_avx512(&chunk, k, u, v, nt, m) };
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
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = const {
        std::cell::RefCell::new(Buffers {
            k: Vec::new(),
            u: Vec::new(),
            m: Vec::new(),
            scratch: Vec::new(),
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
/// The CPU has AVX-512F; `k` and `u` hold 9 and P x `CH` x 16 values, `m` P x 16 x `nt`, `v`
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
    let (k, u) = (&mut k[..9 * CH * PANEL], &mut u[..A * A * CH * PANEL]);
    // k[e * 16 + j] = element e (input channel e / 9, kernel element e % 9) of output channel
    // co0 + j: a row of 16 gathered from the panel's rows (each in L1 after its first line), so
    // that every store is one whole row.
    let rows: [&[X]; PANEL] = std::array::from_fn(|j| {
        let j = j.min(c.nco - 1);
        &c.w[((c.co0 + j) * c.ci_total + c.c0) * 9..][..c.len * 9]
    });
    for (e, row) in k.chunks_exact_mut(PANEL).take(c.len * 9).enumerate() {
        for (j, (d, src)) in row.iter_mut().zip(&rows).enumerate() {
            *d = if j < c.nco { src[e].get() } else { 0.0 };
        }
    }
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
                u[((r * A + q) * CH + i) * PANEL..][..PANEL].copy_from_slice(out);
            }
        }
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
    debug_assert!(u.len() >= P * CH * PANEL && m.len() >= P * PANEL * nt);
    debug_assert!(v.len() >= P * c.ci_total * nt);
    for p in 0..P {
        // SAFETY (all pointer arithmetic below): inside U (p < P, i < len <= CH, j < 16), V
        // (row p * ci_total + c0 + i < P * ci_total, tiles t0.. masked to nt) and M (row
        // p * 16 + j, tiles masked to nt), as the caller promises.
        let (up, vp, mp) = unsafe {
            (
                u.as_ptr().add(p * CH * PANEL),
                v.as_ptr().add((p * c.ci_total + c.c0) * nt),
                m.as_mut_ptr().add(p * PANEL * nt),
            )
        };
        for t0 in (0..nt).step_by(16) {
            let mask: __mmask16 = if nt - t0 >= 16 {
                0xFFFF
            } else {
                (1u16 << (nt - t0)) - 1
            };
            let mut acc = [_mm512_setzero_ps(); PANEL];
            if c.c0 > 0 {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = unsafe { _mm512_maskz_loadu_ps(mask, mp.add(j * nt + t0)) };
                }
            }
            for i in 0..c.len {
                let x = unsafe { _mm512_maskz_loadu_ps(mask, vp.add(i * nt + t0)) };
                let ui = unsafe { up.add(i * PANEL) };
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *ui.add(j) }), x, *a);
                }
            }
            for (j, a) in acc.iter().enumerate() {
                unsafe { _mm512_mask_storeu_ps(mp.add(j * nt + t0), mask, *a) };
            }
        }
    }
}
