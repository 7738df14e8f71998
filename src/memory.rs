//! How the process keeps its resident memory small on the low-end machines it runs on: glibc's
//! allocator set for a few dozen mostly idle threads, and memory handed back when a thread goes quiet.
//! The only `unsafe` in the crate lives here; elsewhere (not glibc on Linux) every function is a no-op.
//!
//! Why: with its defaults glibc gives each of the first 8 × cores threads its own arena, raises its
//! mmap threshold after the first large buffer is freed (so later ones land in the arenas), and keeps
//! the freed middle of its heaps. 50 sessions that stream at once then leave several MiB resident that
//! nothing uses (`make bench`, the RSS rows). A worker's stack likewise keeps every page its deepest
//! call touched, for as long as the session lives.

/// Allocations this big or bigger get their own mapping, returned to the system when freed: the
/// bodies of large answers, a file for `!file`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 64 * 1024;
/// Free memory at the top of the heap beyond this goes back to the system at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD_BYTES: libc::c_int = 128 * 1024;

/// glibc's tunables for this process: no per-thread cache (tcache), one arena, fixed thresholds.
/// Each thread's tcache keeps up to 7 freed chunks of every small size for itself; with 50 workers
/// those chunks pin several MiB of the shared heap that `malloc_trim` cannot hand back (`make
/// bench`: 4.1 against 1.3 MiB of heap after 50 sessions streamed). The cache can be turned off
/// only by `GLIBC_TUNABLES`, which glibc reads when the process starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TUNABLES: &str = "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1:\
glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072";

/// First thing in `main`, while the process has one thread: starts the same program again in this
/// process (same pid, arguments and descriptors) with `TUNABLES` in its environment. Returns at
/// once when the tunables, or `MALLOC_ARENA_MAX`, are already set (by the user or by the first
/// start), and when the exec fails, leaving `tune_allocator` to do what `mallopt` can.
pub fn restart_with_tunables() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if set_by_user("MALLOC_ARENA_MAX") || set_by_user("GLIBC_TUNABLES") {
            return;
        }
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new("/proc/self/exe");
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        // Returns only when the exec failed (no /proc, say); the process then runs as it is.
        let _ = command.args(args).env("GLIBC_TUNABLES", TUNABLES).exec();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_by_user(name: &str) -> bool {
    std::env::var_os(name).is_some()
}

/// Once, before any other thread starts: one arena for every thread (the threads mostly wait on the
/// network, so they hardly contend for it), and fixed thresholds instead of glibc's rising ones.
/// `MALLOC_ARENA_MAX` and `GLIBC_TUNABLES` set by the user win over these.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if set_by_user("MALLOC_ARENA_MAX") || set_by_user("GLIBC_TUNABLES") {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        }
    }
}

/// Hands the free pages in the middle of the heap back to the system, at most once every
/// `TRIM_INTERVAL` for the whole process (it takes the allocator's lock and walks the free chunks,
/// and 50 workers may go quiet together). Call it when a burst of work has ended, not per event.
/// A call inside the interval is owed, and `return_owed_heap` makes it: otherwise the last workers
/// of a burst, which free the most, would leave their memory resident.
pub fn return_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    trim::request();
}

/// Makes a trim that `return_free_heap` owes, once its interval has passed. For a thread that
/// wakes regularly anyway (the heartbeat, every second).
pub fn return_owed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if trim::OWED.load(std::sync::atomic::Ordering::Relaxed) {
        trim::request();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod trim {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    pub(super) static OWED: AtomicBool = AtomicBool::new(false);
    static LAST_TRIM_MS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn request() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = LAST_TRIM_MS.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < super::TRIM_INTERVAL_MS {
            OWED.store(true, Ordering::Relaxed);
            return;
        }
        if LAST_TRIM_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another thread trims right now; what was freed before this call is in its walk.
            return;
        }
        OWED.store(false, Ordering::Relaxed);
        // SAFETY: malloc_trim is thread-safe and only releases memory that is free.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_INTERVAL_MS: u64 = 250;

/// Hands back the pages of the calling thread's stack below the current frame, which earlier, deeper
/// calls touched and which would otherwise stay resident for the thread's life. For a thread about to
/// wait a long time (an idle session worker). Deeper calls later fault in fresh zero pages.
pub fn return_unused_stack() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Some(bottom) = stack_bottom() else {
            return;
        };
        let marker = 0u8;
        let here = std::ptr::addr_of!(marker) as usize;
        let page = 4096;
        // At least a page below `here` stays: the rest of this frame, the 128-byte red zone and the
        // madvise call need well under 1 KiB. Every page more would stay resident in every idle worker.
        let end = (here & !(page - 1)).saturating_sub(page);
        if end <= bottom {
            return;
        }
        // SAFETY: [bottom, end) lies inside this thread's own stack mapping, below every live frame
        // of this thread (the stack grows down and `end` is pages below this function's frame), and
        // no other thread uses another thread's stack. MADV_DONTNEED on private anonymous memory
        // only makes the next touch see zero pages.
        unsafe {
            libc::madvise(
                bottom as *mut libc::c_void,
                end - bottom,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// The lowest usable address of the calling thread's stack (above its guard page).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn stack_bottom() -> Option<usize> {
    // SAFETY: the attribute object is initialised by pthread_getattr_np before it is read, and
    // destroyed once; the out-pointers are valid locals.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut address: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let found = libc::pthread_attr_getstack(&attr, &mut address, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        found.then_some(address as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touches `kib` of stack below the caller, so that there is something to hand back.
    #[inline(never)]
    fn deep(kib: usize) -> u8 {
        let mut block = [0u8; 1024];
        block[kib % 1024] = kib as u8;
        let below = if kib > 1 { deep(kib - 1) } else { 0 };
        std::hint::black_box(&mut block);
        block[0].wrapping_add(below)
    }

    fn resident_stack_kib() -> Option<u64> {
        let bottom = stack_bottom()?;
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-')
                && !first.ends_with(':')
            {
                let lo = usize::from_str_radix(lo, 16).ok()?;
                let hi = usize::from_str_radix(hi, 16).ok()?;
                inside = lo <= bottom && bottom < hi;
            } else if inside && let Some(value) = line.strip_prefix("Rss:") {
                return value.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
        None
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_thread_hands_back_the_stack_its_deeper_calls_touched_and_can_go_deep_again() {
        let outcome = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(|| {
                std::hint::black_box(deep(200));
                let before = resident_stack_kib().expect("the thread's stack in smaps");
                return_unused_stack();
                let after = resident_stack_kib().expect("the thread's stack in smaps");
                // The stack still works, as deep as before.
                std::hint::black_box(deep(200));
                (before, after)
            })
            .expect("spawn")
            .join()
            .expect("the thread neither crashed nor panicked");
        let (before, after) = outcome;
        assert!(before >= 200, "200 KiB were touched: {before} KiB resident");
        assert!(
            after + 150 <= before,
            "most of it was handed back: {before} KiB before, {after} KiB after"
        );
    }

    #[test]
    fn tuning_and_trimming_leave_the_allocator_working() {
        tune_allocator();
        let big: Vec<u8> = vec![7; 1 << 20];
        drop(big);
        return_free_heap();
        let again: Vec<u8> = vec![9; 1 << 20];
        assert_eq!(again.iter().map(|&b| b as usize).sum::<usize>(), 9 << 20);
    }
}
