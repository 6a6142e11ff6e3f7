//! Zero-filled stack buffers without `memset`.
//!
//! LLVM turns zeroing a struct or array of more than a few bytes into a call
//! to `memset`, which on BPF is a byte-at-a-time loop (64 iterations for a
//! `bpf_fib_lookup` struct, every packet: it showed in a perf profile of the
//! encapsulation path). [`Zeroed`] writes 8 bytes at a time instead.

use core::mem::{size_of, MaybeUninit};

/// A `T` whose every byte is zero, 8-byte aligned so the stores are too (the
/// verifier rejects misaligned stack access).
#[repr(C, align(8))]
pub struct Zeroed<T>(pub T);

impl<T> Zeroed<T> {
    /// Zeroes `slot` in place and returns the `T` in it. (In place: built by
    /// value and moved, LLVM is free to zero the destination with `memset`.)
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T` (plain-data structs and byte
    /// arrays); `size_of::<T>()` must be a multiple of 8 (checked at build
    /// time).
    #[inline(always)]
    pub unsafe fn init(slot: &mut MaybeUninit<Self>) -> &mut T {
        const { assert!(size_of::<T>().is_multiple_of(8)) };
        let words = slot.as_mut_ptr() as *mut u64;
        for i in 0..size_of::<Self>() / 8 {
            // SAFETY: in bounds and 8-aligned (repr align(8)); volatile so
            // LLVM does not fold the stores back into a memset call.
            unsafe { words.add(i).write_volatile(0) };
        }
        // SAFETY: every byte is written; the caller vouches zero is valid.
        unsafe { &mut slot.assume_init_mut().0 }
    }
}
