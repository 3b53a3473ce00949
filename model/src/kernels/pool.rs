//! Work on candle's worker pool (the kernels share its threads: a second pool would fight
//! it for the same cores), and the reuse of host buffers from step to step.

use std::collections::HashMap;
use std::sync::Mutex;

/// Rows per work item of the element-wise passes.
pub(crate) const ROWS_PER_ITEM: usize = 16;

/// `f(item)` for every item on candle's worker pool.
pub(crate) fn pool_items(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f));
}

/// Host buffers by length, handed back when their user is done and handed out again.
/// A fresh `vec![0f32; n]` of these sizes is a memset on the calling thread (the allocator
/// reuses freed memory, which it must clear for a zeroed allocation) while the other core
/// waits for the next parallel part: about 2 GB of them a step in `bench train`.
///
/// The buffers are kept for one batch shape: a pass over a batch of another shape (rows
/// padded to another length, an evaluation batch) empties the pool first, so batches of
/// many lengths do not each leave a full set of buffers behind.
#[derive(Default)]
pub(crate) struct BufPool(Mutex<PoolInner>);

#[derive(Default)]
struct PoolInner {
    /// `(rows, tokens per row)` of the batch the buffers were sized for.
    shape: (usize, usize),
    free: HashMap<usize, Vec<Vec<f32>>>,
}

impl BufPool {
    /// Start a pass over a batch of `shape` (`(rows, tokens per row)`): the buffers of
    /// another shape go back to the allocator.
    pub(crate) fn begin(&self, shape: (usize, usize)) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if p.shape != shape {
            p.free.clear();
            p.shape = shape;
        }
    }

    /// How many buffers it holds.
    #[cfg(test)]
    fn held(&self) -> usize {
        let p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.free.values().map(Vec::len).sum()
    }

    /// A buffer of `len` holding whatever an earlier user left in it: every caller writes
    /// it whole before reading it.
    pub(crate) fn dirty(&self, len: usize) -> Vec<f32> {
        let reused = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .get_mut(&len)
            .and_then(Vec::pop);
        match reused {
            // Tests run with debug assertions: a read before the first write shows up as
            // NaN in their results.
            Some(mut v) if cfg!(debug_assertions) => {
                v.fill(f32::NAN);
                v
            }
            Some(v) => v,
            None if cfg!(debug_assertions) => vec![f32::NAN; len],
            None => vec![0f32; len],
        }
    }

    /// A zeroed buffer of `len`, cleared on the pool's threads.
    pub(crate) fn zeros(&self, len: usize) -> Vec<f32> {
        let mut v = self.dirty(len);
        par_rows(&mut v, PIECE, |_, c| c.fill(0.0));
        v
    }

    /// A copy of `x`, copied on the pool's threads.
    pub(crate) fn copy_of(&self, x: &[f32]) -> Vec<f32> {
        let mut v = self.dirty(x.len());
        par_rows(&mut v, PIECE, |k, c| {
            c.copy_from_slice(&x[k * PIECE..][..c.len()])
        });
        v
    }

    pub(crate) fn put(&self, v: Vec<f32>) {
        if !v.is_empty() {
            let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            m.free.entry(v.len()).or_default().push(v);
        }
    }
}

/// A copy of a model starts with no buffers of its own.
impl Clone for BufPool {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BufPool")
    }
}

/// The "row" length [`BufPool`] clears and copies flat buffers in with [`par_rows`]
/// (`ROWS_PER_ITEM` of them, 64 Ki elements, per work item).
pub(crate) const PIECE: usize = 4096;

/// `f(row, row_slice)` for every `ld`-long row of `buf`, on the pool.
pub(crate) fn par_rows(buf: &mut [f32], ld: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let items: Vec<Mutex<&mut [f32]>> =
        buf.chunks_mut(ROWS_PER_ITEM * ld).map(Mutex::new).collect();
    pool_items(items.len(), |it| {
        let mut chunk = items[it].lock().unwrap_or_else(|e| e.into_inner());
        for (k, row) in chunk.chunks_mut(ld).enumerate() {
            f(it * ROWS_PER_ITEM + k, row);
        }
    });
}

/// A host buffer reused from step to step. A buffer as large as the output head's
/// logits (100 MB) comes back from the allocator as fresh pages that the kernel zeroes
/// on first touch: 93 ms a step in `bench train`, for a product of 320 ms.
#[derive(Default)]
pub(crate) struct Scratch(Mutex<Vec<f32>>);

impl Scratch {
    /// The buffer, at least `len` long (its contents are whatever was left in it).
    pub(crate) fn take(&self, len: usize) -> Vec<f32> {
        let mut v = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        if v.len() < len {
            v.resize(len, 0.0);
        }
        v
    }

    /// Give the buffer back for the next step.
    pub(crate) fn put(&self, v: Vec<f32>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }
}

/// A copy starts with no buffer of its own.
impl Clone for Scratch {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

#[cfg(test)]
mod tests {
    use super::BufPool;

    #[test]
    fn the_buffer_pool_reuses_buffers_within_a_batch_shape_and_drops_them_on_another() {
        let pool = BufPool::default();
        pool.begin((4, 256));
        let a = pool.dirty(1000);
        let ptr = a.as_ptr();
        pool.put(a);
        pool.put(vec![1.0; 10]);
        assert_eq!(pool.held(), 2);
        // Same shape: the same allocation comes back, at the length asked for.
        pool.begin((4, 256));
        let b = pool.dirty(1000);
        assert_eq!((b.as_ptr(), b.len()), (ptr, 1000));
        pool.put(b);
        // Another shape: nothing is kept.
        pool.begin((4, 128));
        assert_eq!(pool.held(), 0);
        assert_eq!(pool.zeros(10), vec![0.0; 10]);
    }
}
