//! An output buffer whose disjoint parts are written by different workers of the pool.

use std::marker::PhantomData;
use std::ops::Range;

/// A mutable borrow of `[f32]` that workers write disjoint ranges of at the same time
/// (the borrow ends when this does; the owner reads the buffer after the pool trip).
pub(crate) struct SharedBuf<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: every access goes through `slice_mut` or a gemm into a view, whose callers
// guarantee that concurrent users touch disjoint elements.
#[allow(unsafe_code)]
unsafe impl Sync for SharedBuf<'_> {}

impl<'a> SharedBuf<'a> {
    pub(crate) fn new(v: &'a mut [f32]) -> Self {
        Self {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            _borrow: PhantomData,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_mut_ptr(&self) -> *mut f32 {
        self.ptr
    }

    /// Elements `r` as a slice.
    ///
    /// # Safety
    /// No other thread touches them while the slice lives.
    #[allow(unsafe_code, clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut(&self, r: Range<usize>) -> &mut [f32] {
        assert!(r.start <= r.end && r.end <= self.len);
        // SAFETY: in bounds; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len()) }
    }
}
