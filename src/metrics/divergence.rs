//! How far one model's next-token distributions are from another's on the
//! same rows: what holding a model quantized, or saving a merge in a lower
//! precision, costs where it matters (the predictions), beside the weights.

use candle_core::{DType, Tensor, D};

use crate::data::SftExample;
use crate::model::decoder::{Decoder, Input, Mode, Rows};

/// Positions whose logits exist at once (a [chunk, vocab] f32 tensor per model).
const POSITION_CHUNK: usize = 256;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Divergence {
    /// Mean over positions of KL(reference ‖ model) of the next-token
    /// distributions, in nats.
    pub mean_kl: f64,
    /// Largest |logit difference| at any position and token.
    pub max_logit_error: f64,
    /// Positions compared (every token of every row but the last).
    pub positions: usize,
}

/// KL(reference ‖ model) and the logit error at every position of `rows`
/// that predicts a next token. The two models must share a vocabulary.
pub fn divergence(
    reference: &Decoder,
    model: &Decoder,
    rows: &[SftExample],
) -> anyhow::Result<Divergence> {
    let (mut kl_sum, mut max_err, mut positions) = (0.0f64, 0.0f64, 0usize);
    for row in rows.iter().filter(|r| r.input_ids.len() >= 2) {
        let ids = Tensor::from_vec(
            row.input_ids.clone(),
            (1, row.input_ids.len()),
            &reference.device,
        )?;
        let hidden_ref =
            reference.forward(Input::padded(&ids, None), Rows::All, Mode::Inference)?;
        let ids = ids.to_device(&model.device)?;
        let hidden = model.forward(Input::padded(&ids, None), Rows::All, Mode::Inference)?;
        let n = row.input_ids.len() - 1;
        for start in (0..n).step_by(POSITION_CHUNK) {
            let at: Vec<(usize, usize)> = (start..n.min(start + POSITION_CHUNK))
                .map(|t| (0, t))
                .collect();
            let logits_ref = reference
                .logits_at(&hidden_ref, &at)?
                .to_dtype(DType::F64)?;
            let logits = model
                .logits_at(&hidden, &at)?
                .to_device(&reference.device)?
                .to_dtype(DType::F64)?;
            let err = (&logits_ref - &logits)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            max_err = max_err.max(err);
            let lp_ref = candle_nn::ops::log_softmax(&logits_ref, D::Minus1)?;
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let kl = (lp_ref.exp()? * (&lp_ref - &lp)?)?
                .sum_all()?
                .to_scalar::<f64>()?;
            kl_sum += kl;
            positions += at.len();
        }
    }
    Ok(Divergence {
        mean_kl: kl_sum / positions.max(1) as f64,
        max_logit_error: max_err,
        positions,
    })
}
