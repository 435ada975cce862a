//! Data layer: JSONL rows in TRL's shapes → token ids → cached datasets →
//! padded micro-batches.
//!
//! Flow: [`ModelTokenizer::load`] → [`load_sft`] / [`load_dpo`] (uses
//! [`TokenizeSettings`], returns a dataset with its [`DataReport`]) →
//! `write`/`read` in a compact binary form (`stored`), keyed by
//! [`tokenization_identity`] → [`sft_micro_batches`] / [`dpo_micro_batches`].

pub mod batch;
pub mod dpo;
pub mod error;
pub mod report;
pub mod rows;
pub mod settings;
pub mod sft;
pub mod stored;
pub mod template;
pub mod tokenizer;
pub mod truncate;

mod load;

pub use batch::{dpo_micro_batches, sft_micro_batches, DpoBatch, Padding, SftBatch};
pub use dpo::{load_dpo, DpoDataset, DpoExample};
pub use error::{DataError, RowError};
pub use report::DataReport;
pub use rows::{Message, Turn};
pub use settings::{
    tokenization_identity, BadRows, DatasetKind, EosPolicy, Overlong, TokenizationIdentity,
    TokenizeSettings, TOKENIZATION_VERSION,
};
pub use sft::{load_sft, SftDataset, SftExample};
pub use template::{ChatTemplate, TemplateChoice, BUILTIN_FORMATS};
pub use tokenizer::{ModelTokenizer, SpecialToken, TokenizerConfig};
