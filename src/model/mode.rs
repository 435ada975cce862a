//! How a forward pass runs: whether it keeps a graph and draws dropout.

/// Forward-pass mode. Dropout only runs in `Train`, seeded per step so a
/// resumed run reproduces the same masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No dropout; the graph to the LoRA Vars is kept (backward possible).
    Eval,
    /// No dropout and no graph: LoRA weights are used detached, so
    /// intermediates are freed as the forward pass goes (evaluation, DPO
    /// reference log-probs).
    Inference,
    /// Dropout on, seeded by `dropout_seed` (derive it from seed and step).
    Train { dropout_seed: u64 },
}
