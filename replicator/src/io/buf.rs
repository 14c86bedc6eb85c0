//! `AlignedBuf`: a heap buffer aligned for O_DIRECT.
//!
//! Direct I/O needs the memory address, the file offset and the length to be
//! multiples of the device's logical block size. Every buffer handed to the
//! I/O engine is an `AlignedBuf`, aligned to [`IO_ALIGN`], and is owned by the
//! engine until the kernel has completed the operation.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer, and the block size for direct I/O (4 KiB covers
/// both 512-byte and 4 KiB logical-sector devices).
pub const IO_ALIGN: usize = 4096;

/// An owned, zero-initialised byte buffer whose start is aligned to `IO_ALIGN`.
/// `len()` may be any value; the allocation is rounded up to `IO_ALIGN`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it
// between threads moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::for_overwrite(len);
        buf.fill(0);
        buf
    }

    /// A buffer of `len` bytes whose contents are unspecified (but
    /// initialised: recycled buffers hold earlier data), for callers that
    /// overwrite all of it (reads, socket payloads). Recycles memory from the
    /// pool: large fresh allocations cost a page fault per 4 KiB on first
    /// touch, which dominated 1 MiB writes.
    pub fn for_overwrite(len: usize) -> Self {
        let cap = pool::capacity_for(len);
        if let Some(ptr) = pool::take(cap) {
            return Self { ptr, len, cap };
        }
        let layout = Self::layout(cap);
        // SAFETY: layout has a non-zero size (cap >= IO_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::for_overwrite(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (a multiple of `IO_ALIGN`, at least `len`).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length to `len` (at most the capacity). Bytes between the
    /// old and new length are unspecified (recycled memory).
    ///
    /// # Panics
    /// If `len` exceeds the capacity: a programming error, not an input error.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Raw pointer for the I/O engine.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer for the I/O engine.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn layout(cap: usize) -> Layout {
        match Layout::from_size_align(cap, IO_ALIGN) {
            Ok(layout) => layout,
            // Only reachable for sizes near usize::MAX, which no caller passes
            // (NBD and the wire cap requests far below that).
            Err(_) => alloc::handle_alloc_error(Layout::new::<[u8; IO_ALIGN]>()),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if !pool::give(self.ptr, self.cap) {
            // SAFETY: ptr was allocated in `for_overwrite` with exactly this
            // layout and the pool did not keep it.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

/// A process-wide free list of buffers per power-of-two capacity, bounded
/// per size class, so that steady I/O reuses warm, already-faulted memory.
mod pool {
    use std::ptr::NonNull;
    use std::sync::Mutex;

    use super::IO_ALIGN;

    /// Size classes: 4 KiB .. 32 MiB.
    const CLASSES: usize = 14;
    /// Bytes kept per class (at least one buffer: after a burst of 32 MiB
    /// requests, which any NBD client may send, the pool keeps 32 MiB of
    /// them, not 128).
    const KEEP_BYTES: usize = 32 << 20;

    struct Free(Vec<NonNull<u8>>);
    // SAFETY: the pointers are exclusively owned allocations nobody else
    // references while they sit in the free list.
    unsafe impl Send for Free {}

    static FREE: Mutex<Vec<Free>> = Mutex::new(Vec::new());

    /// The capacity to allocate for `len` bytes: a pooled size class (a
    /// power of two) where one fits, else whole 4 KiB pages (a record just
    /// above the largest class, 32 MiB + 8 KiB, must not take 64 MiB).
    pub(super) fn capacity_for(len: usize) -> usize {
        let pooled = len.max(IO_ALIGN).next_power_of_two();
        if class(pooled).is_some() {
            pooled
        } else {
            len.div_ceil(IO_ALIGN) * IO_ALIGN
        }
    }

    fn class(cap: usize) -> Option<usize> {
        let c = cap.trailing_zeros() as usize;
        let base = IO_ALIGN.trailing_zeros() as usize;
        (cap.is_power_of_two() && c >= base && c - base < CLASSES).then(|| c - base)
    }

    /// A cached buffer of exactly `cap` bytes, if one is free.
    pub(super) fn take(cap: usize) -> Option<NonNull<u8>> {
        let class = class(cap)?;
        let mut free = FREE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        free.get_mut(class)?.0.pop()
    }

    /// Keeps `ptr` (capacity `cap`) for reuse; false if the class is full.
    pub(super) fn give(ptr: NonNull<u8>, cap: usize) -> bool {
        let Some(class) = class(cap) else { return false };
        let mut free = FREE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if free.len() < CLASSES {
            free.resize_with(CLASSES, || Free(Vec::new()));
        }
        let list = &mut free[class].0;
        if list.len() >= (KEEP_BYTES / cap).max(1) {
            return false;
        }
        list.push(ptr);
        true
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes and
        // lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// The end of each large frame received from the peer is read into a
/// recycled buffer (see `replicator_protocol::wire`).
impl replicator_protocol::wire::AlignedMemory for AlignedBuf {
    fn for_overwrite(len: usize) -> Self {
        AlignedBuf::for_overwrite(len)
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::copy_from(self)
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len && buf.capacity() % IO_ALIGN == 0);
            drop(buf);
            // Recycled memory is zeroed again.
            let mut dirty = AlignedBuf::for_overwrite(len);
            dirty.fill(0xa5);
            drop(dirty);
            let buf = AlignedBuf::zeroed(len);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn capacity_is_a_size_class_or_whole_pages_above_them() {
        assert_eq!(AlignedBuf::for_overwrite(1).capacity(), 4096);
        assert_eq!(AlignedBuf::for_overwrite(5000).capacity(), 8192);
        assert_eq!(AlignedBuf::for_overwrite(32 << 20).capacity(), 32 << 20);
        // A widened 32 MiB record: 32 MiB + 8 KiB, not 64 MiB.
        assert_eq!(AlignedBuf::for_overwrite((32 << 20) + 4097).capacity(), (32 << 20) + 8192);
    }

    #[test]
    fn copy_and_resize() {
        let mut buf = AlignedBuf::copy_from(b"hello");
        assert_eq!(&buf[..], b"hello");
        buf.set_len(4096);
        assert_eq!(&buf[..5], b"hello");
    }
}
