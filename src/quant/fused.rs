//! The integer linears fused per task (`int8::linear_rows_f32`,
//! `int4::linear_rows_f32`): each task of one parallel loop produces (or
//! reads) its rows, quantizes them, multiplies them and runs an epilogue on its
//! output rows. At the demonstration model's sizes the separate passes
//! (quantization, shift sums, product, output zeroing, activation, residual)
//! each waited for both threads: about a third of a W8A8 linear's time.

use super::int8::{check_quantize_args, quantize_block};
use anyhow::{ensure, Result};
use rayon::prelude::*;
use std::cell::RefCell;

/// Where a fused linear's input rows come from: a `[rows, k]` slice, or a
/// producer that writes row `r` into a scratch row (layer norm + modulate).
#[derive(Clone, Copy)]
pub enum RowSource<'a> {
    Rows(&'a [f32]),
    Produced(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// A fused linear's per-task epilogue: `(first row, the task's output rows)`.
pub type Finish<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;

/// The shape of one fused product.
#[derive(Clone, Copy)]
pub struct Layout<'a> {
    pub k: usize,
    /// Bytes per quantized row as the kernel reads it (`k` zero-padded).
    pub lda: usize,
    pub n: usize,
    pub task_rows: usize,
    pub inv_smooth: Option<&'a [f32]>,
    pub qmax: i32,
    /// The kernel wants each row's sum of its quantized values in
    /// [`Task::sums`], taken while the rows are quantized (a pass over the
    /// bytes less).
    pub row_sums: bool,
}

/// One task's quantized rows, handed to the kernel.
pub struct Task<'a> {
    /// `m` rows of `lda` bytes.
    pub a: &'a [i8],
    pub lda: usize,
    pub scale: &'a [f32],
    pub m: usize,
    /// With [`Layout::row_sums`], each row's sum of its quantized values;
    /// otherwise scratch for the kernel's own sums.
    pub sums: &'a mut Vec<i32>,
    /// The task's `m` output rows of `n` values, every one of which the kernel writes.
    pub y: *mut f32,
}

/// The arguments every fused linear checks.
#[allow(clippy::too_many_arguments)]
pub fn check(x: RowSource, rows: usize, k: usize, n: usize, inv_smooth: Option<&[f32]>, qmax: i32, bias: Option<&[f32]>) -> Result<()> {
    check_quantize_args(k, inv_smooth, qmax)?;
    if let RowSource::Rows(xs) = x {
        ensure!(xs.len() == rows * k, "integer linear: {} values are not {rows} rows of {k}", xs.len());
    }
    if let Some(b) = bias {
        ensure!(b.len() == n, "integer linear: bias has {} values for {n} outputs", b.len());
    }
    Ok(())
}

/// One worker's buffers: the produced rows, the hidden rows between two
/// chained products, the quantized bytes (and a padded copy when `lda > k`;
/// both line-aligned for AMX), scales and the kernel's sums.
#[derive(Default)]
struct Scratch {
    produced: Vec<f32>,
    hidden: Vec<f32>,
    product: ProductBuffers,
}

/// What one product quantizes into.
#[derive(Default)]
struct ProductBuffers {
    q: Vec<super::Line>,
    qpad: Vec<super::Line>,
    scale: Vec<f32>,
    sums: Vec<i32>,
}

thread_local! {
    /// Kept across calls: allocating and zeroing them per task showed in the profile.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The first `len` bytes of `buf`, grown to hold them.
fn bytes(buf: &mut Vec<super::Line>, len: usize) -> &mut [i8] {
    if buf.len() * 64 < len {
        *buf = super::lines(len);
    }
    &mut bytemuck::cast_slice_mut(buf)[..len]
}

/// One integer product as the fused paths run it: its shape and its kernel.
pub struct Stage<'a> {
    pub layout: Layout<'a>,
    pub kernel: &'a (dyn Fn(Task) + Sync),
}

/// One task's product: quantizes its `m` rows `xb` exactly as
/// `int8::quantize_rows` does and hands them to the kernel, which writes all
/// `m * n` values at `y`.
fn product(xb: &[f32], m: usize, stage: &Stage, buffers: &mut ProductBuffers, y: *mut f32) {
    let Layout { k, lda, inv_smooth, qmax, row_sums, .. } = stage.layout;
    let ProductBuffers { q, qpad, scale, sums } = buffers;
    let q = bytes(q, m * k);
    scale.resize(m, 0f32);
    let row_sums = row_sums.then(|| {
        sums.clear();
        sums.resize(m, 0);
        &mut sums[..]
    });
    quantize_block(xb, k, inv_smooth, qmax, q, scale, row_sums);
    let a = if lda == k {
        &q[..]
    } else {
        let qpad = bytes(qpad, m * lda);
        qpad.fill(0);
        for (d, s) in qpad.chunks_mut(lda).zip(q.chunks(k)) {
            d[..k].copy_from_slice(s);
        }
        &qpad[..]
    };
    (stage.kernel)(Task { a, lda, scale, m, sums, y });
}

/// Runs `f` with this worker's scratch: a task never runs inside another on
/// the same thread (nothing in it waits on the pool), so the borrow is free;
/// a fresh one otherwise.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut fresh = Scratch::default();
        let mut held = cell.try_borrow_mut();
        f(match held.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut fresh,
        })
    })
}

/// The task's input rows `r0 .. r0 + m`: borrowed, or produced into `produced`.
fn source_rows<'s>(x: RowSource<'s>, r0: usize, m: usize, k: usize, produced: &'s mut Vec<f32>) -> &'s [f32] {
    match x {
        RowSource::Rows(xs) => &xs[r0 * k..(r0 + m) * k],
        RowSource::Produced(produce) => {
            produced.resize(m * k, 0f32);
            for (i, row) in produced.chunks_mut(k).enumerate() {
                produce(r0 + i, row);
            }
            &produced[..]
        }
    }
}

/// `[rows, n]` from tasks of `layout.task_rows` rows: each quantizes its rows
/// exactly as `int8::quantize_rows` does, hands them to `kernel`, then runs `finish`.
pub fn rows(x: RowSource, rows: usize, layout: &Layout, finish: Option<&Finish>, kernel: &(dyn Fn(Task) + Sync)) -> Vec<f32> {
    let stage = Stage { layout: *layout, kernel };
    let (k, n, task_rows) = (layout.k, layout.n, layout.task_rows);
    let mut y = Vec::<f32>::with_capacity(rows * n);
    y.spare_capacity_mut()[..rows * n].par_chunks_mut(task_rows * n).enumerate().for_each(|(t, out)| {
        with_scratch(|s| {
            let (r0, m) = (t * task_rows, out.len() / n);
            let xb = source_rows(x, r0, m, k, &mut s.produced);
            let y_task = out.as_mut_ptr() as *mut f32;
            product(xb, m, &stage, &mut s.product, y_task);
            if let Some(f) = finish {
                // SAFETY: the kernel has just written all m * n values of this chunk.
                f(r0, unsafe { std::slice::from_raw_parts_mut(y_task, m * n) });
            }
        })
    });
    // SAFETY: every task's kernel wrote all of its rows.
    unsafe { y.set_len(rows * n) };
    y
}

/// Two products chained per task: `second(between(first(x)))`, then `finish`
/// on the second's output, in tasks of the first's `task_rows` rows. Each
/// task's hidden rows stay in its worker's scratch, near the core, and one
/// parallel loop replaces two (the demo's MLP: fc1, GELU, fc2 and the
/// residual). The same values as [`rows`] twice, bit for bit: every row is
/// quantized and multiplied on its own.
pub fn chain(x: RowSource, rows: usize, first: &Stage, between: &Finish, second: &Stage, finish: Option<&Finish>) -> Result<Vec<f32>> {
    let (k, hidden, n, task_rows) = (first.layout.k, first.layout.n, second.layout.n, first.layout.task_rows);
    ensure!(second.layout.k == hidden, "chained integer linears: the second takes {} inputs, the first gives {hidden}", second.layout.k);
    let mut y = Vec::<f32>::with_capacity(rows * n);
    y.spare_capacity_mut()[..rows * n].par_chunks_mut(task_rows * n).enumerate().for_each(|(t, out)| {
        with_scratch(|s| {
            let (r0, m) = (t * task_rows, out.len() / n);
            let Scratch { produced, hidden: h, product: buffers } = s;
            let xb = source_rows(x, r0, m, k, produced);
            h.resize(m * hidden, 0f32);
            product(xb, m, first, buffers, h.as_mut_ptr());
            between(r0, &mut h[..]);
            let y_task = out.as_mut_ptr() as *mut f32;
            product(&h[..], m, second, buffers, y_task);
            if let Some(f) = finish {
                // SAFETY: the kernel has just written all m * n values of this chunk.
                f(r0, unsafe { std::slice::from_raw_parts_mut(y_task, m * n) });
            }
        })
    });
    // SAFETY: every task's second kernel wrote all of its rows.
    unsafe { y.set_len(rows * n) };
    Ok(y)
}
