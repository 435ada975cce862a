//! Bad input never panics: mutated recipes give errors that render.

use crate::support;
use std::sync::Arc;

const VALID: &str = include_str!("../../recipes/demo.toml");

#[test]
fn mutated_recipes_never_panic_and_their_errors_render() {
    let registry = support::kinds::registry();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/demo.toml");
    let bytes = VALID.as_bytes();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"[]{}=\"',.#\n 0123456789abcxyz_-\xff\xc3";
    let mut errors = 0;
    for _ in 0..3000 {
        let mut m = bytes.to_vec();
        for _ in 0..(1 + next() % 4) {
            let at = (next() as usize) % m.len();
            match next() % 3 {
                0 => m[at] = alphabet[(next() as usize) % alphabet.len()],
                1 => {
                    m.remove(at);
                }
                _ => m.insert(at, alphabet[(next() as usize) % alphabet.len()]),
            }
        }
        let text = String::from_utf8_lossy(&m).into_owned();
        let result = lora_runner::recipe::parse(&dir, &dir, Arc::new(text), &registry)
            .and_then(|r| lora_runner::graph::build(&r).map(|_| ()));
        if let Err(e) = result {
            errors += 1;
            assert!(!e.problems.is_empty());
            let rendered = e.render(false);
            assert!(rendered.contains("demo.toml"), "{rendered}");
        }
    }
    assert!(
        errors > 1000,
        "mutations should mostly break the recipe ({errors})"
    );
}
