//! Range checks of recipe values: each names the key and the rule, and
//! points at the value.

use super::span::Sp;
use super::Problem;

pub fn at_least<T: PartialOrd + std::fmt::Display + Copy>(
    problems: &mut Vec<Problem>,
    key: &str,
    v: &Sp<T>,
    min: T,
) {
    if v.value < min {
        problems.push(
            Problem::new(format!("`{key}` must be >= {min}, got {}", v.value))
                .at(v.span.clone(), "out of range"),
        );
    }
}

pub fn positive(problems: &mut Vec<Problem>, key: &str, v: &Sp<f64>) {
    if !(v.value > 0.0 && v.value.is_finite()) {
        problems.push(
            Problem::new(format!("`{key}` must be > 0, got {}", v.value))
                .at(v.span.clone(), "out of range"),
        );
    }
}

pub fn non_negative(problems: &mut Vec<Problem>, key: &str, v: &Sp<f64>) {
    if !(v.value >= 0.0 && v.value.is_finite()) {
        problems.push(
            Problem::new(format!("`{key}` must be >= 0, got {}", v.value))
                .at(v.span.clone(), "out of range"),
        );
    }
}

pub fn unit_interval(problems: &mut Vec<Problem>, key: &str, v: &Sp<f64>) {
    if !(0.0..1.0).contains(&v.value) {
        problems.push(
            Problem::new(format!("`{key}` must be in [0, 1), got {}", v.value))
                .at(v.span.clone(), "out of range"),
        );
    }
}
