//! Activation checkpointing: a decoder layer whose forward pass keeps only
//! its input, and whose backward pass runs the layer again (same dropout
//! masks: they are drawn from the step's seed and the module name) to get
//! the gradients.
//!
//! The layer becomes one graph node, a `CustomOp1` on its input. Its forward
//! hands over the output computed beforehand (the layer's own graph is freed
//! as soon as that output is taken), its backward re-runs the layer with a
//! graph and backpropagates through it. candle's custom ops can return a
//! gradient only for their inputs, so the gradients of the layer's LoRA Vars
//! go to a store of the backward pass, which `backward_with_recomputed`
//! (`Decoder::backward`) opens and merges into the pass's gradients.
//!
//! The output head gets the same treatment per chunk of rows
//! (`recomputed_rows`): its [rows, vocab] logits, the largest activation of
//! a long sequence (1.2 GB for 2048 tokens of a 151936-token vocabulary in
//! f32), exist for one chunk at a time in forward and in backward.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Shape, Storage, Tensor, TensorId, Var};

use crate::model::layers::attention::AttentionContext;
use crate::model::layers::layer::DecoderLayer;
use crate::model::mode::Mode;

thread_local! {
    /// The LoRA gradients that checkpointed layers recompute, by Var id and
    /// summed over every layer pass, one store per `backward_with_recomputed`
    /// running on this thread (innermost last). candle runs a backward pass
    /// on the thread that calls it, so a store belongs to one pass even when
    /// shards run theirs side by side.
    static RECOMPUTED: RefCell<Vec<HashMap<TensorId, Tensor>>> = const { RefCell::new(Vec::new()) };
}

/// `loss.backward()`, with the gradients of the LoRA Vars that
/// checkpointed layers recomputed during it added in.
pub fn backward_with_recomputed(loss: &Tensor) -> candle_core::Result<GradStore> {
    /// Pops this pass's store however the backward ends.
    struct Pass;
    impl Drop for Pass {
        fn drop(&mut self) {
            RECOMPUTED.with(|r| r.borrow_mut().pop());
        }
    }
    RECOMPUTED.with(|r| r.borrow_mut().push(HashMap::new()));
    let pass = Pass;
    let mut grads = loss.backward()?;
    let recomputed =
        RECOMPUTED.with(|r| std::mem::take(r.borrow_mut().last_mut().expect("pushed above")));
    drop(pass);
    for (id, extra) in recomputed {
        let sum = match grads.get_id(id) {
            Some(g) => (g + extra)?,
            None => extra,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}

/// Adds a LoRA gradient found while recomputing a layer to this thread's
/// innermost backward pass.
fn add_recomputed(var: &Var, grad: &Tensor) -> candle_core::Result<()> {
    RECOMPUTED.with(|r| {
        let mut passes = r.borrow_mut();
        let Some(store) = passes.last_mut() else {
            candle_core::bail!(
                "a checkpointed layer ran backward outside Decoder::backward: its LoRA gradients would be lost"
            )
        };
        let sum = match store.remove(&var.id()) {
            Some(g) => (g + grad)?,
            None => grad.clone(),
        };
        store.insert(var.id(), sum);
        Ok(())
    })
}

/// `layer` applied to `x` keeping only `x` for backward.
pub fn checkpointed_layer(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &Arc<AttentionContext>,
    mode: Mode,
) -> candle_core::Result<Tensor> {
    let (output, _) = layer
        .forward(&x.detach(), ctx, mode, None, None)
        .map_err(wrap)?;
    // The embeddings are not Vars: without `tracked` the first layer's node
    // would not be in the graph and its LoRA gradients never computed.
    tracked(x)?.apply_op1(Recompute {
        layer: layer.clone(),
        ctx: ctx.clone(),
        mode,
        output: Precomputed::new(output)?,
    })
}

fn wrap(e: crate::model::error::ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

struct Recompute {
    layer: DecoderLayer,
    ctx: Arc<AttentionContext>,
    mode: Mode,
    /// The layer's output (its graph freed as the forward takes it).
    output: Precomputed,
}

/// An output computed before its graph node exists, handed over once by the
/// node's forward (which must return fresh storage: a copy, contiguous from 0).
pub(crate) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(crate) fn new(output: Tensor) -> candle_core::Result<Self> {
        let output = if output.layout().start_offset() == 0 && output.is_contiguous() {
            output
        } else {
            output.copy()?
        };
        Ok(Precomputed(Mutex::new(Some(output))))
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("output lock")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("a recomputed op ran twice".into()))
    }

    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("recomputed op: the output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("recomputed op: the output is not on the GPU"),
        }
    }
}

/// The forward functions of a custom op whose output was computed before
/// its node (a `Precomputed` in the op's field `output`), for ops of one,
/// two or three tensors: they hand that output over, on the CPU or the GPU.
macro_rules! precomputed_forward {
    (1) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.output.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.output.cuda()
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.output.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.output.cuda()
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.output.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.output.cuda()
        }
    };
}
pub(crate) use precomputed_forward;

/// `x` itself when it is in the graph, else a Var copy of it: a custom op
/// on a tensor outside the graph gets no backward call.
fn tracked(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        Ok(x.clone())
    } else {
        Ok(Var::from_tensor(x)?.into_inner())
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    precomputed_forward!(1);

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let input = Var::from_tensor(&arg.detach())?;
        let (output, _) = self
            .layer
            .forward(input.as_tensor(), &self.ctx, self.mode, None, None)
            .map_err(wrap)?;
        // d/d(output) of Σ output·g is g: backward of this scalar is the
        // layer's vector-Jacobian product with the incoming gradient.
        let grads = (output * grad_res.detach())?.sum_all()?.backward()?;
        for linear in self.layer.linears() {
            if let Some(lora) = &linear.lora {
                for (_, var) in lora.named_vars(&linear.name) {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        add_recomputed(&var, g)?;
                    }
                }
            }
        }
        Ok(grads.get(input.as_tensor()).cloned())
    }
}

/// A function of a chunk of rows: `rows` of the whole input, and their values.
pub type RowFunction =
    Arc<dyn Fn(Range<usize>, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// `f` applied to `x` [N, ...] in chunks of `chunk` rows and concatenated
/// along the first dimension, keeping only `x` for backward; backward
/// recomputes one chunk at a time. `f` must treat rows independently and
/// must not depend on Vars (their gradients would be lost).
pub fn recomputed_rows(x: &Tensor, chunk: usize, f: RowFunction) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let detached = x.detach();
    let parts = chunks(n, chunk)
        .map(|rows| f(rows.clone(), &detached.narrow(0, rows.start, rows.len())?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let output = Tensor::cat(&parts, 0)?;
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(RecomputeRows {
        f,
        chunk,
        output: Precomputed::new(output)?,
    })
}

fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk)).map(move |i| i * chunk..((i + 1) * chunk).min(n))
}

struct RecomputeRows {
    f: RowFunction,
    chunk: usize,
    output: Precomputed,
}

impl CustomOp1 for RecomputeRows {
    fn name(&self) -> &'static str {
        "recomputed-rows"
    }

    precomputed_forward!(1);

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, grad_res) = (arg.dim(0)?, grad_res.detach());
        let parts = chunks(n, self.chunk)
            .map(|rows| {
                let input = Var::from_tensor(&arg.narrow(0, rows.start, rows.len())?.detach())?;
                let g = grad_res.narrow(0, rows.start, rows.len())?;
                let out = (self.f)(rows, input.as_tensor())?;
                let grads = (out * g)?.sum_all()?.backward()?;
                match grads.get(input.as_tensor()) {
                    Some(g) => Ok(g.clone()),
                    None => input.as_tensor().zeros_like(),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}
