//! Process-wide allocator policy for programs that move volumes.

/// Keeps freed transfer buffers in the process instead of handing them back to the kernel.
///
/// Why: a transfer allocates and frees buffers of 128 KiB and more all the time (socket input,
/// read chunks). glibc serves such sizes with mmap or trims them off the heap when they are
/// freed, so the next buffer faults in fresh zeroed pages: about 80,000 page faults per GiB
/// received, and on VMs with free-page reporting every fault is also a trip to the host. With
/// this policy freed buffers are reused while still resident. The price is that memory freed
/// after a peak stays in the process (bounded by the read-ahead budget and windows).
///
/// Process-wide, so it is for a binary to choose: the volstream CLI, the iohelper and the
/// benchmarks call it; an embedding daemon decides for its own process. A no-op off glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Values are bytes; mallopt returns 0 on failure, which only means the default policy.
        // 32 MiB is the largest threshold glibc accepts on 64-bit.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 512 << 20;
        // SAFETY: mallopt only adjusts glibc's allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
