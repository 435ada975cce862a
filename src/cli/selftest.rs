//! `runner selftest` (hidden): the device's logits against the CPU's.

use super::{Context, Error};

pub fn selftest(ctx: &Context) -> Result<(), Error> {
    let wanted = ctx.device.clone().unwrap_or_default();
    let device = crate::device::resolve(&wanted).map_err(|e| Error::Usage(e.to_string()))?;
    let diff = crate::train::with_big_stack(|| crate::device::logits_check(&device))
        .map_err(Error::environment("selftest"))?;
    let ok = diff <= 1e-3;
    println!(
        "logits on {} vs cpu (f32): max abs diff {diff:.3e} ({})",
        String::from(device),
        if ok {
            "ok, within 1e-3"
        } else {
            "FAILED, above 1e-3"
        }
    );
    if ok {
        Ok(())
    } else {
        Err(Error::StageFailed)
    }
}
