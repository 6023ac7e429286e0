//! Allocator settings for the forward pass.
//!
//! Every layer of a forward pass allocates fresh output buffers of a few MB and frees the
//! previous ones. glibc's defaults hand such buffers back to the kernel (large blocks are
//! mmap'ed and unmapped, the heap top is trimmed) and the next batch page-faults them in
//! again, zeroed by the kernel: 5% of a MiniLM forward in `perf` (page faults and
//! `clear_page`), and 10-17% of its throughput measured (docs/benchmarks.md). Keeping
//! freed memory in the process for reuse removes that; the price is that the resident
//! size stays at the largest batch's working set instead of shrinking between batches.
//!
//! Not applied to `warm fuse`, whose peak resident size is bounded on purpose.

/// Blocks below this size come from the heap, not from their own mapping (32 MiB is the
/// largest value glibc accepts for it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Keeps freed blocks in the process for the next forward pass (glibc only; a no-op
/// elsewhere). Call once at start-up, before the model is loaded.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before the
        // server's threads start and glibc serializes it with allocations anyway.
        let applied = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        };
        if !applied {
            tracing::warn!("mallopt refused the allocator settings; running with glibc's defaults");
        }
    }
}
