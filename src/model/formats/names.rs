//! Hugging Face module and tensor names, built in one place: the checkpoint
//! layout (`model.layers.{i}.self_attn.q_proj.weight`, ...) and the PEFT
//! adapter names derived from it.

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The sub-module of a decoder layer a projection lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Attention,
    Mlp,
}

impl Group {
    pub fn module(self) -> &'static str {
        match self {
            Group::Attention => "self_attn",
            Group::Mlp => "mlp",
        }
    }
}

/// The seven linear projections of a decoder layer in checkpoint order
/// (the order of `DecoderLayer::linears`), with their group.
pub const PROJECTIONS: [(&str, Group); 7] = [
    ("q_proj", Group::Attention),
    ("k_proj", Group::Attention),
    ("v_proj", Group::Attention),
    ("o_proj", Group::Attention),
    ("gate_proj", Group::Mlp),
    ("up_proj", Group::Mlp),
    ("down_proj", Group::Mlp),
];

/// Phi-3's four: q, k and v in one `qkv_proj`, gate and up in one
/// `gate_up_proj` (LoRA targets these fused modules, as PEFT names them).
pub const FUSED_PROJECTIONS: [(&str, Group); 4] = [
    ("qkv_proj", Group::Attention),
    ("o_proj", Group::Attention),
    ("gate_up_proj", Group::Mlp),
    ("down_proj", Group::Mlp),
];

/// A family's projections in checkpoint order: fused (Phi-3) or the seven.
pub fn projections(fused: bool) -> &'static [(&'static str, Group)] {
    if fused {
        &FUSED_PROJECTIONS
    } else {
        &PROJECTIONS
    }
}

/// The group of a projection name; None for an unknown name.
pub fn group_of(projection: &str) -> Option<Group> {
    PROJECTIONS
        .iter()
        .chain(&FUSED_PROJECTIONS)
        .find(|(p, _)| *p == projection)
        .map(|&(_, g)| g)
}

/// `model.layers.{i}`.
pub fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}

/// `model.layers.{i}.self_attn.q_proj` (or `.mlp.` for an MLP projection).
/// Panics on a name outside `PROJECTIONS` (a programming error).
pub fn projection(i: usize, projection: &str) -> String {
    let group = group_of(projection).expect("known projection");
    format!("{}.{}.{projection}", layer(i), group.module())
}

/// Every projection's module name, layer by layer, in `projections(fused)`
/// order.
pub fn all_projections(num_layers: usize, fused: bool) -> Vec<String> {
    (0..num_layers)
        .flat_map(|i| {
            projections(fused)
                .iter()
                .map(move |(p, _)| projection(i, p))
        })
        .collect()
}

pub fn input_layernorm(i: usize) -> String {
    format!("{}.input_layernorm.weight", layer(i))
}

pub fn post_attention_layernorm(i: usize) -> String {
    format!("{}.post_attention_layernorm.weight", layer(i))
}

/// Gemma's norm in front of the MLP.
pub fn pre_feedforward_layernorm(i: usize) -> String {
    format!("{}.pre_feedforward_layernorm.weight", layer(i))
}

/// Gemma's and OLMo 2's norm on the MLP's output.
pub fn post_feedforward_layernorm(i: usize) -> String {
    format!("{}.post_feedforward_layernorm.weight", layer(i))
}

/// The RMSNorm on the query (`which` = 'q') or key ('k') projection.
pub fn qk_norm(i: usize, which: char) -> String {
    format!("{}.self_attn.{which}_norm.weight", layer(i))
}

/// `{module}.weight`.
pub fn weight(module: &str) -> String {
    format!("{module}.weight")
}

/// `{module}.bias`.
pub fn bias(module: &str) -> String {
    format!("{module}.bias")
}

/// PEFT tensor name of a LoRA matrix (`which` is 'A' or 'B') on `module`:
/// `base_model.model.{module}.lora_A.weight`.
pub fn peft_tensor(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// PEFT tensor name of a DoRA magnitude on `module`:
/// `base_model.model.{module}.lora_magnitude_vector` (no `.weight`, as PEFT 0.21 saves it).
pub fn peft_magnitude(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}
