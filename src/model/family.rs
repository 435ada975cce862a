//! The model families and everything that differs between them, declared
//! in one table: a new family is one `Architecture` variant and one
//! `Family` row. Everything else (the layers, LoRA, the formats) reads the
//! family through `ModelConfig`. The reference for each row is the family's
//! modeling file in transformers (not candle-transformers', which differs
//! for Gemma 2's window and attention scale).

/// A supported model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    /// Qwen2 and Qwen2.5 (and Qwen1.5, whose checkpoints say "qwen2").
    Qwen2,
    Qwen3,
    Gemma2,
    /// Gemma 3's text decoder (`Gemma3ForCausalLM`, model_type "gemma3_text").
    Gemma3,
    Olmo2,
    SmolLM3,
    /// Phi-3, Phi-3.5 and Phi-4 (model_type "phi3").
    Phi3,
}

/// Which layers attend through a sliding window when config.json does not
/// list `layer_types` (transformers' `__post_init__` of each config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultWindows {
    /// Never: every token sees all earlier ones.
    Never,
    /// Every layer, whenever `sliding_window` is set (Mistral).
    WhenSet,
    /// When `use_sliding_window` is true, the layers from
    /// `max_window_layers` on (Qwen2, Qwen3).
    FromMaxWindowLayers,
    /// Every layer but each `n`th (Gemma 2: n = 2; Gemma 3:
    /// `sliding_window_pattern`, 6 when absent).
    AllButEvery(usize),
    /// When `use_sliding_window` is true, the layers without rope (SmolLM3).
    NoRopeLayers,
}

/// Where a layer's RMSNorms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// x + attn(norm₁(x)), then + mlp(norm₂(x)) (Llama and most).
    Pre,
    /// Gemma's four: x + norm₂(attn(norm₁(x))), then + norm₄(mlp(norm₃(x))).
    Sandwich,
    /// OLMo 2: x + norm₁(attn(x)), then + norm₂(mlp(x)).
    Post,
}

/// An RMSNorm on the query and key projections before rope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` values (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection (OLMo 2).
    Whole,
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: silu(gate) · up.
    Silu,
    /// GeGLU with the tanh approximation ("gelu_pytorch_tanh").
    GeluTanh,
}

impl Activation {
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// What distinguishes one family from another.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Family {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// config.json's `architectures` entry (the transformers class).
    pub hf_class: &'static str,
    /// q/k/v always carry a bias and o_proj none (Qwen2); otherwise
    /// config.json's `attention_bias` puts one on all four.
    pub qkv_bias: bool,
    /// Whether config.json may state `attention_bias`.
    pub states_attention_bias: bool,
    /// Whether config.json may state `mlp_bias` (only `false` is supported).
    pub states_mlp_bias: bool,
    pub windows: DefaultWindows,
    /// Whether config.json may list `layer_types`.
    pub layer_types: bool,
    pub norms: NormPlacement,
    pub qk_norm: QkNorm,
    /// Gemma's RMSNorm scales by (1 + w); others by w.
    pub norm_plus_one: bool,
    /// Gemma multiplies the embeddings by √hidden.
    pub scaled_embeddings: bool,
    /// Gemma's attention scale is `query_pre_attn_scalar`^-½, and its
    /// config may soft-cap attention and final logits.
    pub gemma_attention: bool,
    /// The config key naming the MLP activation, and the only value
    /// supported.
    pub activation_key: &'static str,
    pub activation: Activation,
    /// rope_theta when config.json gives none (transformers' `default_theta`).
    pub default_theta: f64,
    /// Gemma 3's local (sliding) layers' rope base when absent.
    pub default_local_theta: Option<f64>,
    /// SmolLM3: `no_rope_layers` marks the layers without rope.
    pub no_rope_layers: bool,
    /// Phi-3: one `qkv_proj` and one `gate_up_proj` (`names::FUSED_PROJECTIONS`).
    pub fused_projections: bool,
    /// Phi-3: rope types "su" and "yarn" mean LongRoPE, and a top-level
    /// `original_max_position_embeddings` wins over the rope dict's.
    pub phi3_rope: bool,
}

const LLAMA: Family = Family {
    model_type: "llama",
    hf_class: "LlamaForCausalLM",
    qkv_bias: false,
    states_attention_bias: true,
    states_mlp_bias: true,
    windows: DefaultWindows::Never,
    layer_types: false,
    norms: NormPlacement::Pre,
    qk_norm: QkNorm::None,
    norm_plus_one: false,
    scaled_embeddings: false,
    gemma_attention: false,
    activation_key: "hidden_act",
    activation: Activation::Silu,
    default_theta: 10_000.0,
    default_local_theta: None,
    no_rope_layers: false,
    fused_projections: false,
    phi3_rope: false,
};

const MISTRAL: Family = Family {
    model_type: "mistral",
    hf_class: "MistralForCausalLM",
    states_attention_bias: false,
    states_mlp_bias: false,
    windows: DefaultWindows::WhenSet,
    ..LLAMA
};

const QWEN2: Family = Family {
    model_type: "qwen2",
    hf_class: "Qwen2ForCausalLM",
    qkv_bias: true,
    states_attention_bias: false,
    states_mlp_bias: false,
    windows: DefaultWindows::FromMaxWindowLayers,
    layer_types: true,
    ..LLAMA
};

const QWEN3: Family = Family {
    model_type: "qwen3",
    hf_class: "Qwen3ForCausalLM",
    states_attention_bias: true,
    states_mlp_bias: false,
    windows: DefaultWindows::FromMaxWindowLayers,
    layer_types: true,
    qk_norm: QkNorm::PerHead,
    ..LLAMA
};

const GEMMA2: Family = Family {
    model_type: "gemma2",
    hf_class: "Gemma2ForCausalLM",
    states_mlp_bias: false,
    windows: DefaultWindows::AllButEvery(2),
    layer_types: true,
    norms: NormPlacement::Sandwich,
    norm_plus_one: true,
    scaled_embeddings: true,
    gemma_attention: true,
    activation_key: "hidden_activation",
    activation: Activation::GeluTanh,
    ..LLAMA
};

const GEMMA3: Family = Family {
    model_type: "gemma3_text",
    hf_class: "Gemma3ForCausalLM",
    windows: DefaultWindows::AllButEvery(6),
    qk_norm: QkNorm::PerHead,
    default_theta: 1_000_000.0,
    default_local_theta: Some(10_000.0),
    ..GEMMA2
};

const OLMO2: Family = Family {
    model_type: "olmo2",
    hf_class: "Olmo2ForCausalLM",
    states_mlp_bias: false,
    norms: NormPlacement::Post,
    qk_norm: QkNorm::Whole,
    ..LLAMA
};

const SMOLLM3: Family = Family {
    model_type: "smollm3",
    hf_class: "SmolLM3ForCausalLM",
    windows: DefaultWindows::NoRopeLayers,
    layer_types: true,
    default_theta: 2_000_000.0,
    no_rope_layers: true,
    ..LLAMA
};

const PHI3: Family = Family {
    model_type: "phi3",
    hf_class: "Phi3ForCausalLM",
    states_attention_bias: false,
    states_mlp_bias: false,
    windows: DefaultWindows::WhenSet,
    fused_projections: true,
    phi3_rope: true,
    ..LLAMA
};

/// Families people ask for that are refused, with the reason.
const REFUSED: [(&str, &str); 14] = [
    ("phimoe", "mixture-of-experts models are not supported"),
    ("gemma", "Gemma 1 is not supported (Gemma 2 and Gemma 3 are)"),
    ("gemma3", "this is Gemma 3's multimodal wrapper; point `path` at a text-only checkpoint (model_type \"gemma3_text\")"),
    ("gemma4", "Gemma 4 (per-layer-type head sizes, partial rotary) is not supported yet"),
    ("gemma4_text", "Gemma 4 (per-layer-type head sizes, partial rotary) is not supported yet"),
    ("ministral", "Ministral is not supported yet"),
    ("mixtral", "mixture-of-experts models are not supported"),
    ("qwen2_moe", "mixture-of-experts models are not supported"),
    ("qwen3_moe", "mixture-of-experts models are not supported"),
    ("qwen3_next", "hybrid linear-attention models are not supported"),
    ("qwen3_5", "hybrid linear-attention models are not supported"),
    ("qwen3_5_moe", "hybrid linear-attention mixture-of-experts models are not supported"),
    ("gpt_oss", "mixture-of-experts models are not supported"),
    ("deepseek_v3", "mixture-of-experts models are not supported"),
];

impl Architecture {
    pub const ALL: [Architecture; 9] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma2,
        Architecture::Gemma3,
        Architecture::Olmo2,
        Architecture::SmolLM3,
        Architecture::Phi3,
    ];

    pub fn family(self) -> &'static Family {
        match self {
            Architecture::Llama => &LLAMA,
            Architecture::Mistral => &MISTRAL,
            Architecture::Qwen2 => &QWEN2,
            Architecture::Qwen3 => &QWEN3,
            Architecture::Gemma2 => &GEMMA2,
            Architecture::Gemma3 => &GEMMA3,
            Architecture::Olmo2 => &OLMO2,
            Architecture::SmolLM3 => &SMOLLM3,
            Architecture::Phi3 => &PHI3,
        }
    }

    pub fn model_type(self) -> &'static str {
        self.family().model_type
    }

    pub fn hf_class(self) -> &'static str {
        self.family().hf_class
    }

    /// The families' `model_type`s, for messages: "llama, mistral, qwen2, …".
    pub fn supported() -> String {
        Self::ALL.map(Architecture::model_type).join(", ")
    }

    /// The family a `model_type` or an `architectures` entry names (any case).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| {
            let f = a.family();
            name.eq_ignore_ascii_case(f.model_type) || name.eq_ignore_ascii_case(f.hf_class)
        })
    }

    /// Why a known but unsupported `model_type` is refused.
    pub fn refusal(model_type: &str) -> Option<&'static str> {
        REFUSED
            .iter()
            .find(|(t, _)| t.eq_ignore_ascii_case(model_type))
            .map(|&(_, why)| why)
    }
}
