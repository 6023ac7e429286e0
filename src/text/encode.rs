//! Turning the inputs of a request into token ids exactly as design.md section 5 says:
//! text with the tokenizer's special tokens; a prompt/response pair through the chat
//! template when the model has one, else as a tokenizer pair; messages through the chat
//! template; truncation that keeps the special tokens, as transformers does.

use tokenizers::utils::truncation::{
    truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
};
use tokenizers::{Encoding, PostProcessor, Tokenizer};

use super::template::{ChatTemplate, Message};
use super::TextError;

/// One thing to score.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Already formatted text.
    Text(String),
    Pair {
        prompt: String,
        response: String,
    },
    Messages(Vec<Message>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Left,
    Right,
}

/// How one input is to be encoded.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// Inputs longer than this are truncated (when `truncate`) or refused.
    pub max_length: usize,
    pub truncate: bool,
    pub direction: Direction,
    /// Add the tokenizer's special tokens to `Input::Text` (the OpenRLHF route does not:
    /// its text is already templated).
    pub add_special_tokens: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// Formats and tokenizes inputs for one model.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
}

impl TextEncoder {
    pub fn new(tokenizer: Tokenizer, chat: Option<ChatTemplate>) -> Self {
        Self { tokenizer, chat }
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn encode(&self, input: &Input, options: &EncodeOptions) -> Result<Encoded, TextError> {
        let encoding = match input {
            Input::Text(text) => {
                self.encode_parts(text, None, options.add_special_tokens, options)?
            }
            Input::Pair { prompt, response } => match &self.chat {
                Some(chat) => {
                    let rendered = chat.render(&pair_messages(prompt, response), false)?;
                    self.encode_parts(&rendered, None, false, options)?
                }
                None => self.encode_parts(prompt, Some(response), true, options)?,
            },
            Input::Messages(messages) => {
                let chat = self.chat.as_ref().ok_or(TextError::NoChatTemplate)?;
                let rendered = chat.render(messages, false)?;
                self.encode_parts(&rendered, None, false, options)?
            }
        };
        if encoding.get_ids().is_empty() {
            return Err(TextError::Empty);
        }
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
        })
    }

    /// Tokenizes one text or a text pair, truncates what is not special tokens, then adds
    /// the special tokens (the order transformers' fast tokenizers use).
    fn encode_parts(
        &self,
        first: &str,
        second: Option<&str>,
        add_special_tokens: bool,
        options: &EncodeOptions,
    ) -> Result<Encoding, TextError> {
        let tok = |t: &str| {
            self.tokenizer
                .encode(t, false)
                .map_err(|e| TextError::Tokenizer(e.to_string()))
        };
        let a = tok(first)?;
        let b = second.map(tok).transpose()?;
        let added = if add_special_tokens {
            self.tokenizer
                .get_post_processor()
                .map_or(0, |p| p.added_tokens(b.is_some()))
        } else {
            0
        };
        let content = a.get_ids().len() + b.as_ref().map_or(0, |b| b.get_ids().len());
        let (a, b) = if content + added <= options.max_length {
            (a, b)
        } else if options.truncate {
            let params = TruncationParams {
                max_length: options.max_length.saturating_sub(added),
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: match options.direction {
                    Direction::Left => TruncationDirection::Left,
                    Direction::Right => TruncationDirection::Right,
                },
            };
            truncate_encodings(a, b, &params).map_err(|e| TextError::Tokenizer(e.to_string()))?
        } else {
            return Err(TextError::TooLong {
                length: content + added,
                max: options.max_length,
            });
        };
        self.tokenizer
            .post_process(a, b, add_special_tokens)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }
}

/// A prompt/response pair as the conversation a chat template renders.
pub fn pair_messages(prompt: &str, response: &str) -> Vec<Message> {
    vec![
        Message {
            role: "user".into(),
            content: prompt.into(),
        },
        Message {
            role: "assistant".into(),
            content: response.into(),
        },
    ]
}
