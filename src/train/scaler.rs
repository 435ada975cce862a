//! Dynamic loss scaling for f16 training (as PyTorch's GradScaler): the loss
//! is multiplied by a scale before backward so small f16 gradients do not
//! flush to zero; gradients are divided back; a step whose gradients
//! overflowed is skipped and the scale halved; after `GROWTH_INTERVAL` good
//! steps in a row the scale doubles. bf16 and f32 need none of this.

use serde::{Deserialize, Serialize};

pub const INITIAL_SCALE: f64 = 65536.0;
pub const GROWTH_INTERVAL: u64 = 2000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: INITIAL_SCALE,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    /// Record a step's outcome: whether its unscaled gradients were all finite.
    /// Returns whether the optimizer should apply the step.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_skips_growth_doubles_after_the_interval() {
        let mut s = LossScaler::default();
        assert!(!s.update(false));
        assert_eq!(s.scale, INITIAL_SCALE / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, INITIAL_SCALE / 2.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (INITIAL_SCALE, 0));
        let mut tiny = LossScaler {
            scale: 1.0,
            good_steps: 5,
        };
        tiny.update(false);
        assert_eq!(tiny.scale, 1.0, "never below 1");
    }
}
