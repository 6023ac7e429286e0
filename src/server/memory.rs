//! The process's memory as an operator needs to read it: resident size, and the heap's
//! bytes in use against the freed bytes glibc keeps for reuse. The server keeps freed
//! memory on purpose (src/alloc.rs), so a resident size that rises under load is either
//! that cache or a leak; only the heap's own split tells them apart.

/// One reading, each part absent where the platform cannot give it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryReading {
    pub resident_bytes: Option<u64>,
    /// Bytes handed out by malloc and not yet freed (heap blocks and large mappings).
    pub heap_in_use_bytes: Option<u64>,
    /// Freed bytes the allocator holds for reuse.
    pub heap_free_bytes: Option<u64>,
}

pub fn read() -> MemoryReading {
    let (heap_in_use_bytes, heap_free_bytes) = heap().unzip();
    MemoryReading {
        resident_bytes: resident(),
        heap_in_use_bytes,
        heap_free_bytes,
    }
}

/// Resident pages from /proc/self/statm (its second field), in bytes.
#[cfg(target_os = "linux")]
fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|page| pages * page)
}

#[cfg(not(target_os = "linux"))]
fn resident() -> Option<u64> {
    None
}

/// glibc's `mallinfo2` (2.33 and later), looked up at run time so that the binary still
/// starts on an older glibc, where the heap figures are simply absent.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap() -> Option<(u64, u64)> {
    use std::sync::OnceLock;
    type Mallinfo2 = unsafe extern "C" fn() -> libc::mallinfo2;
    static MALLINFO2: OnceLock<Option<Mallinfo2>> = OnceLock::new();
    let mallinfo2 = MALLINFO2.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; a non-null result is glibc's
        // `mallinfo2`, whose signature is the one transmuted to.
        unsafe {
            let symbol = libc::dlsym(libc::RTLD_DEFAULT, c"mallinfo2".as_ptr());
            (!symbol.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, Mallinfo2>(symbol))
        }
    });
    // SAFETY: `mallinfo2` takes no arguments and only reads the allocator's counters.
    let info = unsafe { (*mallinfo2)?() };
    // uordblks: heap bytes in use; hblkhd: bytes in blocks given their own mapping (in
    // use by definition); fordblks: free bytes held in the heap.
    Some(((info.uordblks + info.hblkhd) as u64, info.fordblks as u64))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap() -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn heap_in_use_follows_an_allocation_and_its_release() {
        let before = read();
        let resident = before.resident_bytes.expect("statm is readable on Linux");
        assert!(resident > 1 << 20, "resident {resident}");
        let in_use_before = before.heap_in_use_bytes.expect("glibc 2.33+ here");
        // 2 GiB from calloc: its own mapping, never touched, so it costs no memory; other
        // tests allocating in parallel move the figures by far less than the 1 GiB margin.
        const BLOCK: u64 = 2 << 30;
        const MARGIN: u64 = 1 << 30;
        let block = vec![0u8; BLOCK as usize];
        let during = read().heap_in_use_bytes.expect("glibc 2.33+ here");
        assert!(
            during >= in_use_before + BLOCK - MARGIN,
            "in use {in_use_before} -> {during} with 2 GiB allocated"
        );
        std::hint::black_box(&block);
        drop(block);
        let after = read().heap_in_use_bytes.expect("glibc 2.33+ here");
        assert!(
            after + BLOCK - MARGIN <= during,
            "in use {during} -> {after} after freeing 2 GiB"
        );
    }
}
