//! The model families and everything that differs between them, declared
//! in one table: a new family is one `Architecture` variant and one
//! `Family` row. Everything else (the layers, LoRA, the formats) reads the
//! family through `ModelConfig`.

/// A supported model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    /// Qwen2 and Qwen1.5 (Qwen1.5 checkpoints use model_type "qwen2").
    Qwen2,
}

/// How a family's config.json turns on sliding-window attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlidingWindow {
    /// Never: every token sees all earlier ones.
    Never,
    /// Whenever `sliding_window` is set (Mistral).
    WhenSet,
    /// When `use_sliding_window` is true, then of `sliding_window` (Qwen2).
    WhenEnabled,
}

/// What distinguishes one family from another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// config.json's `architectures` entry (the transformers class).
    pub hf_class: &'static str,
    /// q/k/v always carry a bias and o_proj none (Qwen2); otherwise
    /// config.json's `attention_bias` puts one on all four, and `mlp_bias`
    /// is refused.
    pub qkv_bias: bool,
    pub sliding_window: SlidingWindow,
    /// Whether a written config.json states `attention_bias` and `mlp_bias`.
    pub states_biases: bool,
}

const LLAMA: Family = Family {
    model_type: "llama",
    hf_class: "LlamaForCausalLM",
    qkv_bias: false,
    sliding_window: SlidingWindow::Never,
    states_biases: true,
};

const MISTRAL: Family = Family {
    model_type: "mistral",
    hf_class: "MistralForCausalLM",
    qkv_bias: false,
    sliding_window: SlidingWindow::WhenSet,
    states_biases: false,
};

const QWEN2: Family = Family {
    model_type: "qwen2",
    hf_class: "Qwen2ForCausalLM",
    qkv_bias: true,
    sliding_window: SlidingWindow::WhenEnabled,
    states_biases: false,
};

impl Architecture {
    pub const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
    ];

    pub fn family(self) -> &'static Family {
        match self {
            Architecture::Llama => &LLAMA,
            Architecture::Mistral => &MISTRAL,
            Architecture::Qwen2 => &QWEN2,
        }
    }

    pub fn model_type(self) -> &'static str {
        self.family().model_type
    }

    pub fn hf_class(self) -> &'static str {
        self.family().hf_class
    }

    /// The families' `model_type`s, for messages: "llama, mistral, qwen2".
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
}
