//! The order in which training examples are visited: a fresh seeded
//! permutation per epoch, a pure function of (seed, position), so a resumed
//! run needs only the number of examples seen to continue identically.

use crate::model::kernels::rng::SplitMix64;

/// Indices of `count` examples starting at cursor `seen`, over a dataset of `n`.
pub fn take(seed: u64, n: usize, seen: u64, count: usize) -> Vec<usize> {
    assert!(n > 0, "an empty dataset has no order");
    let mut out = Vec::with_capacity(count);
    let mut epoch = u64::MAX;
    let mut perm = Vec::new();
    for k in seen..seen + count as u64 {
        let e = k / n as u64;
        if e != epoch {
            epoch = e;
            perm = permutation(seed, e, n);
        }
        out.push(perm[(k % n as u64) as usize]);
    }
    out
}

/// The distinct examples the first `count` draws visit, ascending: what a
/// run of that many examples (steps × grad_accum × batch) will touch.
pub fn visited(seed: u64, n: usize, count: u64) -> Vec<usize> {
    if count >= n as u64 {
        return (0..n).collect();
    }
    let mut seen = take(seed, n, 0, count as usize);
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// Fisher-Yates with a stream derived from (seed, epoch).
pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = SplitMix64::for_stream(seed, &format!("data-order/{epoch}"));
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// Seed for the dropout masks of one micro-batch.
pub fn dropout_seed(seed: u64, step: u64, micro: u64) -> u64 {
    SplitMix64::for_stream(seed, &format!("dropout/{step}/{micro}")).next_u64()
}

/// Seed for the dropout masks of shard `shard` of a micro-batch whose seed
/// is `micro_seed`: shards draw masks of their own (equal seeds would give
/// every shard the same masks).
pub fn shard_dropout_seed(micro_seed: u64, shard: usize) -> u64 {
    SplitMix64::for_stream(micro_seed, &format!("shard/{shard}")).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_visits_every_example_once_and_resuming_continues_the_same_order() {
        let all = take(7, 10, 0, 30);
        for epoch in all.chunks(10) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(all[..10], all[10..20], "epochs are shuffled differently");
        assert_eq!(
            take(7, 10, 13, 9),
            all[13..22],
            "a cursor continues the same sequence"
        );
        assert_ne!(take(8, 10, 0, 10), all[..10], "the seed matters");
    }
}
