//! An allocation the machine refuses ends the program with a message
//! naming the stage and the size, and exit code 3 ("the device failed"),
//! instead of Rust's abort (SIGABRT, a backtrace, exit 134). The `runner`
//! binary installs [`Guarded`] as its global allocator; the executor names
//! the running stage with [`set_stage`]. Nothing here allocates: the
//! message is built on the stack and written with one `write(2)`.
//! Artifacts are promoted atomically, so a stage that dies here leaves no
//! artifact behind (its staging folder is swept by `runner gc`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const NAME_BYTES: usize = 120;
static STAGE: [AtomicU8; NAME_BYTES] = [const { AtomicU8::new(0) }; NAME_BYTES];
static STAGE_LEN: AtomicUsize = AtomicUsize::new(0);

/// Names the stage whose allocations follow (cut to 120 bytes).
pub fn set_stage(name: &str) {
    let bytes = &name.as_bytes()[..name.len().min(NAME_BYTES)];
    STAGE_LEN.store(0, Ordering::SeqCst);
    for (slot, b) in STAGE.iter().zip(bytes) {
        slot.store(*b, Ordering::Relaxed);
    }
    STAGE_LEN.store(bytes.len(), Ordering::SeqCst);
}

/// No stage is running.
pub fn clear_stage() {
    STAGE_LEN.store(0, Ordering::SeqCst);
}

/// The system allocator, with [`out_of_memory`] when it returns null.
pub struct Guarded;

// SAFETY: every call is forwarded to `System` unchanged; only a null result
// is handled, and that path never returns.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// A fixed buffer the message is written into (no allocation).
struct Message {
    bytes: [u8; 512],
    len: usize,
}

impl Message {
    fn push(&mut self, s: &[u8]) {
        for b in s {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = *b;
                self.len += 1;
            }
        }
    }
    fn number(&mut self, mut n: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Writes "runner: <stage>: out of memory allocating N bytes …" to stderr
/// and exits with code 3.
fn out_of_memory(size: usize) -> ! {
    let mut m = Message {
        bytes: [0; 512],
        len: 0,
    };
    m.push(b"\nrunner: ");
    let len = STAGE_LEN.load(Ordering::SeqCst);
    if len > 0 {
        m.push(b"stage `");
        for slot in &STAGE[..len] {
            m.push(&[slot.load(Ordering::Relaxed)]);
        }
        m.push(b"`: ");
    }
    m.push(b"out of memory: the machine refused an allocation of ");
    m.number(size);
    m.push(b" bytes (its memory, or a limit such as `ulimit -v` or a cgroup's); nothing was cached for the stage. `runner plan` shows each stage's estimate.\n");
    // SAFETY: writes our stack buffer to fd 2; _exit ends the process
    // without running anything that could allocate.
    unsafe {
        libc::write(2, m.bytes.as_ptr().cast(), m.len);
        libc::_exit(3);
    }
}
