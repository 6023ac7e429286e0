//! Text to tokens: tokenizer files, chat templates, input formatting and truncation.

mod encode;
mod separated;
mod steps;
mod template;
mod tokenizer;

use std::path::Path;

pub use encode::{pair_messages, Direction, EncodeOptions, Encoded, Input, TextEncoder};
pub use steps::{join_steps, StepsError};
pub use template::{ChatTemplate, Message};
pub use tokenizer::{load_tokenizer, TokenizerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("tokenizer configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Template(String),
    /// The chat template refused the conversation (`raise_exception`).
    #[error("the chat template rejected the conversation: {0}")]
    Rejected(String),
    #[error("this model has no chat template, so it cannot format messages")]
    NoChatTemplate,
    #[error("the input is {length} tokens long, more than the maximum of {max} (send \"truncate\": true to cut it)")]
    TooLong { length: usize, max: usize },
    #[error("the input tokenizes to zero tokens")]
    Empty,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// tokenizer.json and config.json's `vocab_size` disagree; checked on the host, since
    /// an out-of-range id on a GPU is a device-side assert that breaks the context.
    #[error("the tokenizer gave token id {id}, beyond the model's {rows} embedding rows (tokenizer.json and config.json's vocab_size disagree)")]
    BeyondEmbedding { id: u32, rows: usize },
    /// A token id a client sent that the model has no embedding for.
    #[error("token id {id} is beyond the model's vocabulary ({rows} embedding rows)")]
    IdBeyondVocabulary { id: u32, rows: usize },
    /// The same for token type ids (a pair template giving a type the model lacks).
    #[error("the tokenizer gave token type id {id}, beyond the model's {rows} token types (tokenizer.json's post-processor and config.json's type_vocab_size disagree)")]
    TypeBeyondEmbedding { id: u32, rows: usize },
    /// The model cannot score the input as encoded (ArmoRM without a prompt's end).
    #[error("{0}")]
    Unscorable(String),
    /// Steps reach the encoder only for a model that tokenizes them apart; a model with a
    /// step tag gets them joined by it first.
    #[error("a response given as steps is encoded apart only for a process reward model that separates them (TRL's layout); join the steps with the model's step tag")]
    StepsUnseparated,
}

/// Loads the encoder of a checkpoint folder: tokenizer.json plus the chat template and
/// special tokens of tokenizer_config.json.
pub fn load_text_encoder(dir: &Path) -> Result<TextEncoder, TextError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(TextError::Config(format!(
            "{}: tokenizer.json not found (warm needs a fast tokenizer file)",
            dir.display()
        )));
    }
    let tokenizer = load_tokenizer(&path)?;
    let config = TokenizerConfig::read(dir)?;
    let chat = config
        .chat_template
        .as_deref()
        .map(|source| ChatTemplate::new(source, config.special_tokens.clone()))
        .transpose()?;
    let bos_token = config.special_tokens.get("bos_token").cloned();
    Ok(TextEncoder::new(tokenizer, chat, bos_token))
}
