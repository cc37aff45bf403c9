//! Reusable, aligned byte buffers for the data path.
//!
//! A cycle moves gigabytes through buffers of a few MiB: blobs read, encoded, fetched, decrypted,
//! decompressed. Allocating each afresh costs a page fault per 4 KiB touched (the allocator maps
//! large buffers fresh from the kernel and returns them on free) and makes peak memory depend on
//! the allocator. A [`BufPool`] keeps a few freed buffers and hands them out again; a
//! [`PooledBuf`] goes back to its pool when dropped, also when it ended as the owner of a
//! [`Bytes`] ([`PooledBuf::into_bytes`]) and the last clone of those bytes is dropped.
//!
//! The bytes of a pooled buffer start at an address aligned to [`ALIGN_BYTES`], so that they can
//! be written to (or read from) a file with `O_DIRECT` without a bounce copy. Safe code only: the
//! buffer is a `Vec` over-allocated by one alignment, used from its first aligned byte.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Alignment of the start of every pooled buffer: 4096 covers the logical block size of every
/// Linux device (512 or 4096), as `O_DIRECT` needs.
pub const ALIGN_BYTES: usize = 4096;

/// A bounded free list of buffers. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep_max: usize,
}

impl BufPool {
    /// A pool keeping at most `keep_max` freed buffers (more are released to the allocator).
    pub fn new(keep_max: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            keep_max,
        })
    }

    /// A buffer of `len` bytes whose start is aligned to [`ALIGN_BYTES`]. Its contents are
    /// unspecified (what a previous user left, or zeros): callers overwrite what they expose.
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            // The smallest that fits, else the largest (grown below).
            let fit = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len + ALIGN_BYTES)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            let pick = fit.or_else(|| {
                free.iter()
                    .enumerate()
                    .max_by_key(|(_, v)| v.capacity())
                    .map(|(i, _)| i)
            });
            pick.map(|i| free.swap_remove(i))
        };
        let mut buf = PooledBuf {
            vec: reused.unwrap_or_default(),
            pad: 0,
            len: 0,
            pool: Some(Arc::clone(self)),
        };
        buf.set_len(len);
        buf
    }

    /// Buffers waiting in the pool.
    pub fn free_count(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn give_back(&self, vec: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep_max {
            free.push(vec);
        }
    }
}

/// A buffer from a [`BufPool`] (or a one-off, [`PooledBuf::unpooled`]); back to its pool on drop.
#[derive(Debug)]
pub struct PooledBuf {
    vec: Vec<u8>,
    /// Bytes before the aligned start.
    pad: usize,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl PooledBuf {
    /// A buffer of `len` bytes that belongs to no pool (freed on drop).
    pub fn unpooled(len: usize) -> PooledBuf {
        let mut buf = PooledBuf {
            vec: Vec::new(),
            pad: 0,
            len: 0,
            pool: None,
        };
        buf.set_len(len);
        buf
    }

    /// A buffer of `len` bytes from `pool`, or a one-off when there is none.
    pub fn take_from(pool: Option<&Arc<BufPool>>, len: usize) -> PooledBuf {
        match pool {
            Some(pool) => pool.take(len),
            None => PooledBuf::unpooled(len),
        }
    }

    /// Sets the length. Bytes kept keep their values only while the buffer does not grow past
    /// its capacity; new bytes are unspecified.
    pub fn set_len(&mut self, len: usize) {
        let need = len + ALIGN_BYTES;
        if self.vec.capacity() < need {
            // Reallocate: the old contents are not kept (callers fill what they use).
            self.vec = Vec::with_capacity(need);
        }
        let pad = self.vec.as_ptr().align_offset(ALIGN_BYTES);
        // `align_offset` may give up (usize::MAX): the buffer is then merely unaligned, and
        // direct I/O takes its bounce or buffered path.
        self.pad = if pad < ALIGN_BYTES { pad } else { 0 };
        if self.vec.len() < self.pad + len {
            self.vec.resize(self.pad + len, 0);
        }
        self.len = len;
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether its start is aligned to [`ALIGN_BYTES`].
    pub fn is_aligned(&self) -> bool {
        self.as_slice().as_ptr().align_offset(ALIGN_BYTES) == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.vec[self.pad..self.pad + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.pad..self.pad + self.len]
    }

    /// The underlying vector and the offset of the aligned start in it, for writers that append
    /// (the vector's length is the pad plus this buffer's length; capacity reserved with
    /// [`PooledBuf::reserve`] keeps the start where it is). [`PooledBuf::sync_len`] takes the
    /// length back from the vector afterwards.
    pub fn vec_mut(&mut self) -> (&mut Vec<u8>, usize) {
        self.vec.truncate(self.pad + self.len);
        (&mut self.vec, self.pad)
    }

    /// Makes room for `len` bytes in all without moving the start (contents kept).
    pub fn reserve(&mut self, len: usize) {
        if self.vec.capacity() < self.pad + len {
            let mut bigger: Vec<u8> = Vec::with_capacity(len + ALIGN_BYTES);
            let pad = bigger.as_ptr().align_offset(ALIGN_BYTES);
            let pad = if pad < ALIGN_BYTES { pad } else { 0 };
            bigger.resize(pad, 0);
            bigger.extend_from_slice(self.as_slice());
            self.vec = bigger;
            self.pad = pad;
        }
    }

    /// Takes the length from the vector after [`PooledBuf::vec_mut`] appended to it.
    pub fn sync_len(&mut self) {
        self.len = self.vec.len().saturating_sub(self.pad);
    }

    /// Shortens it to `len` bytes (no effect when longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The bytes as [`Bytes`] without a copy; the buffer returns to its pool when the last clone
    /// of them is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.vec));
        }
    }
}

/// Whether `bytes` start at an address aligned to [`ALIGN_BYTES`].
pub fn is_aligned(bytes: &[u8]) -> bool {
    bytes.as_ptr().align_offset(ALIGN_BYTES) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_and_bounded() {
        let pool = BufPool::new(2);
        let mut a = pool.take(10_000);
        assert!(a.is_aligned());
        assert_eq!(a.len(), 10_000);
        a.as_mut_slice().fill(7);
        let addr = a.as_slice().as_ptr() as usize;
        drop(a);
        assert_eq!(pool.free_count(), 1);
        // Reused: same memory, no new allocation, still aligned.
        let b = pool.take(5_000);
        assert_eq!(b.as_slice().as_ptr() as usize, addr);
        assert!(b.is_aligned());
        assert_eq!(pool.free_count(), 0);
        // Growing past the capacity still gives an aligned buffer of the length asked for.
        let mut c = b;
        c.set_len(1 << 20);
        assert!(c.is_aligned());
        assert_eq!(c.as_slice().len(), 1 << 20);
        let (d, e, f) = (pool.take(1), pool.take(1), pool.take(1));
        drop((c, d, e, f));
        assert_eq!(
            pool.free_count(),
            2,
            "the pool keeps at most keep_max buffers"
        );
    }

    #[test]
    fn bytes_return_the_buffer_when_the_last_clone_drops() {
        let pool = BufPool::new(4);
        let mut buf = pool.take(4096 * 3);
        buf.as_mut_slice().fill(1);
        let bytes = buf.into_bytes();
        assert!(is_aligned(&bytes));
        let part = bytes.slice(4096..8192);
        drop(bytes);
        assert_eq!(pool.free_count(), 0, "a slice still holds the buffer");
        assert!(part.iter().all(|&b| b == 1));
        drop(part);
        assert_eq!(pool.free_count(), 1);
    }

    #[test]
    fn appending_through_the_vector_keeps_the_start() {
        let pool = BufPool::new(1);
        let mut buf = pool.take(0);
        buf.reserve(100_000);
        let start = buf.as_slice().as_ptr() as usize;
        let (vec, pad) = buf.vec_mut();
        assert_eq!(vec.len(), pad);
        vec.extend_from_slice(&[9u8; 100_000]);
        buf.sync_len();
        assert_eq!(buf.len(), 100_000);
        assert_eq!(buf.as_slice().as_ptr() as usize, start);
        assert!(buf.is_aligned());
        assert!(buf.as_slice().iter().all(|&b| b == 9));
        // Reserving more keeps the contents.
        buf.reserve(1 << 20);
        assert!(buf.is_aligned());
        assert_eq!(buf.len(), 100_000);
        assert!(buf.as_slice().iter().all(|&b| b == 9));
        let unpooled = PooledBuf::unpooled(3);
        assert_eq!(unpooled.as_slice().len(), 3);
    }
}
