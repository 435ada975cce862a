//! Process-wide settings made once before any command runs: thread counts,
//! the allocator, Ctrl-C, colour.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::exit;

pub fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Fix the thread count of candle and rayon before any pool starts. Left to
/// itself candle counts physical cores and rayon logical ones, which on small
/// machines makes the two disagree and training slower.
pub fn set_threads(threads: Option<usize>) {
    let n = threads
        .filter(|n| *n > 0)
        .or_else(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Safe in the 2021 edition; done before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // candle runs elementwise ops over a pool of its own whose workers spin
    // between ops, on the cores gemm's threads and ours need: 12% of a
    // training step's samples on 2 cores for 1% of useful work. On the
    // calling thread alone the peer benchmark's SFT stage ran 1.1× the
    // tokens/s on 12% less CPU time (interleaved, `perf stat`).
    // CANDLE_NUM_THREADS set by the user still wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Training allocates and frees the same few-MiB activations every step.
/// glibc's defaults hand such blocks back to the kernel (mmap, heap trim)
/// and fault them in again next time: 5% of an SFT step in kernel page
/// handling. Blocks under 32 MiB now come from the heap and up to 256 MiB
/// of freed heap is kept. On the peer benchmark's SFT stage (`perf stat`):
/// 905k page faults → 118k, 6% less CPU time, the same peak RSS.
/// GLIBC_TUNABLES naming malloc settings is left to rule.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"));
        if !user_set {
            // SAFETY: mallopt only sets allocator parameters; it is called
            // before the threads that allocate most.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            }
        }
    }
}

/// Ctrl-C sets a flag that stages check between steps; a second Ctrl-C exits at once.
pub fn install_interrupt() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                std::process::exit(exit::INTERRUPTED);
            }
            eprintln!("\ninterrupted: finishing the current step (Ctrl-C again to quit now)");
        });
        flag
    })
    .clone()
}
