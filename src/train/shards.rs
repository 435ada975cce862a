//! A micro-batch split into shards whose forward and backward passes run
//! on threads of their own.
//!
//! On a CPU, candle runs the many small ops of a step (gradient sums,
//! norms, softmax, the graph's bookkeeping) on the calling thread, and only
//! the matrix products spread over the cores: a 2-core SFT step kept about
//! 1.4 cores busy (`perf stat`). Shards of whole sequences keep every core on its own share
//! of everything, with each product on its own thread.
//!
//! The split depends on the examples' lengths alone (consecutive examples
//! until a shard holds `MIN_SHARD_TOKENS`), never on the thread count, and
//! the shards' gradients are added in shard order: the same bytes on any
//! number of threads.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::model::kernels::cpu::{threads_here, with_threads};

/// Stack of a shard's thread: backward walks the graph recursively (as
/// `with_big_stack`).
const SHARD_STACK: usize = 64 << 20;

/// The shards of a micro-batch whose examples feed the model `tokens[i]`
/// tokens each: consecutive examples, each shard closed once it holds
/// `MIN_SHARD_TOKENS` tokens (a product over fewer rows wastes most of the
/// kernel's registers); on a device other than the CPU the whole batch is
/// one pass (a GPU fills itself with one batch).
pub fn split(tokens: &[usize], on_cpu: bool) -> Vec<Range<usize>> {
    if !on_cpu {
        return std::iter::once(0..tokens.len()).collect();
    }
    let mut shards = Vec::new();
    let (mut start, mut held) = (0, 0);
    for (i, &t) in tokens.iter().enumerate() {
        held += t;
        if held >= MIN_SHARD_TOKENS {
            shards.push(start..i + 1);
            (start, held) = (i + 1, 0);
        }
    }
    if start < tokens.len() {
        shards.push(start..tokens.len());
    }
    shards
}

/// Tokens a shard gathers before it is closed (`split`). On the demo
/// (examples of a few dozen tokens) 64 and 128 ran its SFT stage in 4.8 s,
/// one example a shard in 7.4 s, 256 in 7.2 s (too few shards to fill 2
/// threads); on the peer benchmark (about 150 tokens an example) 1 and 128
/// ran alike.
pub const MIN_SHARD_TOKENS: usize = 128;

/// `f` over the shards of examples that feed the model `tokens[i]` tokens
/// each (`split`), on the threads this thread may use (`run`), with each
/// shard's range of examples; results in shard order.
pub fn map<T: Send>(
    tokens: &[usize],
    on_cpu: bool,
    f: impl Fn(Range<usize>) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let shards = split(tokens, on_cpu);
    run(shards.len(), threads_here(), |i| f(shards[i].clone()))
}

/// `f(0) .. f(n - 1)` in order, on up to `threads` threads (the calling
/// one among them), each taking the next index when it is free. A thread
/// gives the fused kernels `threads / workers` threads of their own
/// (`cpu::with_threads`). The first error by index is returned.
pub fn run<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let workers = threads.clamp(1, n.max(1));
    let share = (threads / workers).max(1);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<anyhow::Result<T>>>> = Mutex::new((0..n).map(|_| None).collect());
    let work = || {
        with_threads(share, || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let r = f(i);
            results.lock().expect("shard results")[i] = Some(r);
        })
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers)
            .map(|w| {
                std::thread::Builder::new()
                    .name(format!("shard-{w}"))
                    .stack_size(SHARD_STACK)
                    .spawn_scoped(scope, work)
                    .expect("spawn a shard thread")
            })
            .collect();
        work();
        for h in helpers {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    results
        .into_inner()
        .expect("shard results")
        .into_iter()
        .map(|r| r.expect("every shard ran"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_index_order_whatever_the_threads() {
        for threads in [1, 2, 3, 8] {
            let out = run(5, threads, |i| Ok(i * 10)).unwrap();
            assert_eq!(out, vec![0, 10, 20, 30, 40], "{threads} threads");
        }
        assert!(run(0, 2, Ok).unwrap().is_empty());
    }

    #[test]
    fn the_first_error_by_index_is_returned() {
        let err = run(4, 2, |i| {
            if i >= 2 {
                anyhow::bail!("shard {i}")
            }
            Ok(i)
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "shard 2");
    }

    #[test]
    fn each_thread_gives_the_kernels_its_share() {
        let shares = run(2, 4, |_| Ok(threads_here())).unwrap();
        assert_eq!(shares, vec![2, 2]);
        let shares = run(3, 2, |_| Ok(threads_here())).unwrap();
        assert_eq!(shares, vec![1, 1, 1]);
    }

    #[test]
    fn shards_gather_consecutive_examples_up_to_the_minimum_on_a_cpu_only() {
        let m = MIN_SHARD_TOKENS;
        assert_eq!(
            split(&[m, m + 5, 1, m - 1, 3, 2], true),
            vec![0..1, 1..2, 2..4, 4..6],
            "the last shard keeps what is left"
        );
        assert_eq!(split(&[1, 2], true), vec![0..2]);
        assert_eq!(split(&[m, m], false), vec![0..2]);
        assert!(split(&[], true).is_empty());
        let ranges = with_threads(2, || map(&[m, 1, m, 2], true, Ok)).unwrap();
        assert_eq!(ranges, vec![0..1, 1..3, 3..4]);
    }
}
