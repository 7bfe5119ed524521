//! Large float64 matrices whose pages the kernel may back with huge pages.
//!
//! An `n × n` float64 matrix of a 2048-wide layer is 33.5 MB: above glibc's
//! largest mmap threshold, so every such allocation is fresh memory and is
//! faulted in 4 KiB at a time on first touch — measured at 14 ms per matrix on
//! the development VM, more than a triangular solve. Asking for transparent
//! huge pages (`MADV_HUGEPAGE`, honoured where THP is `madvise` or `always`)
//! turns 8192 faults into 16; and a small pool hands the matrices of one
//! solve to the next one of the same size (every layer of a model has the
//! same widths), so most solves fault in nothing at all.

use faer::{MatMut, MatRef};
use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Freed work matrices kept for reuse, at most [`POOL_BYTES`] in all.
static POOL: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
/// Upper bound of the memory the pool keeps between solves.
pub const POOL_BYTES: usize = 512 << 20;

const HUGE: usize = 2 << 20;
/// Below this size ordinary allocations are fine.
const MIN_HUGE: usize = 4 << 20;

/// A column-major `nrows × ncols` float64 matrix, contents uninitialised
/// until written (constructors below always write every entry).
pub struct BigMat {
    ptr: NonNull<f64>,
    nrows: usize,
    ncols: usize,
    layout: Layout,
}

// SAFETY: BigMat owns its allocation, like a Vec<f64>.
unsafe impl Send for BigMat {}
unsafe impl Sync for BigMat {}

impl BigMat {
    /// A matrix filled with zeros.
    pub fn zeros(nrows: usize, ncols: usize) -> Self {
        let mut m = Self::uninit(nrows, ncols);
        // SAFETY: the allocation holds nrows * ncols values.
        unsafe { std::ptr::write_bytes(m.ptr.as_ptr(), 0, nrows * ncols) };
        m.nrows = nrows;
        m
    }

    /// A matrix whose entries the caller must all write before reading any.
    pub fn for_overwrite(nrows: usize, ncols: usize) -> Self {
        Self::uninit(nrows, ncols)
    }

    fn uninit(nrows: usize, ncols: usize) -> Self {
        let len = (nrows * ncols).max(1);
        let bytes = len * std::mem::size_of::<f64>();
        let align = if bytes >= MIN_HUGE { HUGE } else { 64 };
        let layout = Layout::from_size_align(bytes.div_ceil(align) * align, align)
            .expect("matrix size overflows");
        // Not in a fork child: a lock held by another thread at the fork
        // would never be released there.
        if align == HUGE && crate::parallel::parallel_ok() {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(k) = pool.iter().position(|&(_, size)| size == layout.size()) {
                let (addr, _) = pool.swap_remove(k);
                let ptr = NonNull::new(addr as *mut f64).expect("pooled pointers are non-null");
                return Self { ptr, nrows, ncols, layout };
            }
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc(layout) } as *mut f64;
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        #[cfg(target_os = "linux")]
        if align == HUGE {
            // Advisory only: failure leaves ordinary pages.
            // SAFETY: the range is the allocation just made.
            unsafe { libc::madvise(raw as *mut libc::c_void, layout.size(), libc::MADV_HUGEPAGE) };
        }
        Self {
            ptr,
            nrows,
            ncols,
            layout,
        }
    }

    pub fn nrows(&self) -> usize {
        self.nrows
    }

    pub fn ncols(&self) -> usize {
        self.ncols
    }

    pub fn as_ref(&self) -> MatRef<'_, f64> {
        // SAFETY: nrows * ncols initialised values, column stride nrows.
        unsafe {
            MatRef::from_raw_parts(
                self.ptr.as_ptr(),
                self.nrows,
                self.ncols,
                1,
                self.nrows as isize,
            )
        }
    }

    pub fn as_mut(&mut self) -> MatMut<'_, f64> {
        // SAFETY: as above, borrowed mutably.
        unsafe {
            MatMut::from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.nrows,
                self.ncols,
                1,
                self.nrows as isize,
            )
        }
    }
}

impl Drop for BigMat {
    fn drop(&mut self) {
        if self.layout.align() == HUGE && crate::parallel::parallel_ok() {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let kept: usize = pool.iter().map(|&(_, size)| size).sum();
            if kept + self.layout.size() <= POOL_BYTES {
                pool.push((self.ptr.as_ptr() as usize, self.layout.size()));
                return;
            }
        }
        // SAFETY: allocated in `uninit` with this layout.
        unsafe { dealloc(self.ptr.as_ptr() as *mut u8, self.layout) };
    }
}
