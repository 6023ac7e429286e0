//! Turning the inputs of a request into token ids exactly as design.md section 5 says:
//! text with the tokenizer's special tokens; a prompt/response pair through the chat
//! template when the model has one, else as a tokenizer pair; messages through the chat
//! template; truncation that keeps the special tokens, as transformers does; then the
//! model's own last token where it has one (InternLM2's reward token).

use tokenizers::utils::truncation::{
    truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
};
use tokenizers::{Encoding, PostProcessor, Token, Tokenizer};

use super::separated::SeparatedSteps;
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
    /// A prompt and its response's steps, for a process reward model whose steps are
    /// tokenized apart (TRL's PRMTrainer layout, src/text/separated.rs).
    Steps {
        prompt: String,
        steps: Vec<String>,
    },
    /// Token ids, taken as they are (special tokens included or not, as the client
    /// tokenized them): vLLM's and SGLang's token-id inputs.
    Ids(Vec<u32>),
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

#[cfg(test)]
impl EncodeOptions {
    /// Options for a test, the tokenizer's special tokens added.
    pub fn up_to(max_length: usize, truncate: bool, direction: Direction) -> Self {
        Self {
            max_length,
            truncate,
            direction,
            add_special_tokens: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Where each step's reward is read, for separated steps.
    pub read_at: Option<Vec<usize>>,
}

/// Formats and tokenizes inputs for one model.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
    /// tokenizer_config.json's `bos_token`, as transformers' `bos_token_id` reads it.
    bos_token: Option<String>,
    /// Set for a process reward model whose steps are tokenized apart: every input is
    /// laid out so.
    separated: Option<SeparatedSteps>,
    /// A token put after every input, once formatted, unless it already ends with it
    /// (InternLM2's reward token, where its score is read); truncation leaves room for
    /// it, as for the special tokens.
    appended: Option<u32>,
}

impl TextEncoder {
    pub fn new(
        tokenizer: Tokenizer,
        chat: Option<ChatTemplate>,
        bos_token: Option<String>,
    ) -> Self {
        Self {
            tokenizer,
            chat,
            bos_token,
            separated: None,
            appended: None,
        }
    }

    /// Puts `id` after every input that does not end with it: the last token, the one a
    /// decoder's head reads.
    pub fn append_token(&mut self, id: u32) {
        self.appended = Some(id);
    }

    /// The token put after every input, if any.
    pub fn appended_token(&self) -> Option<u32> {
        self.appended
    }

    /// Lays every input out with its steps tokenized apart, each followed by `separator`
    /// (whose ids are `separator_ids`), the BOS token first and `prompt_suffix` after the
    /// prompt. `needs_bos`: a layout that cannot do without the BOS token (Skywork's writes
    /// it), refused when the tokenizer has none.
    pub fn separate_steps(
        &mut self,
        separator: &str,
        separator_ids: &[u32],
        prompt_suffix: &str,
        needs_bos: bool,
    ) -> Result<(), TextError> {
        let bos = self
            .bos_token
            .as_deref()
            .and_then(|token| self.tokenizer.token_to_id(token));
        if needs_bos && bos.is_none() {
            return Err(TextError::Config(
                "this process reward model's input opens with the tokenizer's BOS token, \
                 and tokenizer_config.json names none in the vocabulary (bos_token)"
                    .into(),
            ));
        }
        self.separated = Some(SeparatedSteps {
            separator: separator.to_string(),
            separator_ids: separator_ids.to_vec(),
            bos,
            prompt_suffix: prompt_suffix.to_string(),
        });
        Ok(())
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn encode(&self, input: &Input, options: &EncodeOptions) -> Result<Encoded, TextError> {
        if let Some(separated) = &self.separated {
            return separated.encode(input, options, |text| {
                self.tokenizer
                    .encode(text, false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| TextError::Tokenizer(e.to_string()))
            });
        }
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
            Input::Steps { .. } => return Err(TextError::StepsUnseparated),
            // Taken as given: no special tokens added, cut as text is.
            Input::Ids(ids) => self.fit(ids_encoding(ids), None, false, options)?,
        };
        if encoding.get_ids().is_empty() {
            return Err(TextError::Empty);
        }
        let mut ids = encoding.get_ids().to_vec();
        let mut type_ids = encoding.get_type_ids().to_vec();
        // A client that appends the token itself (to text it formats) gets no second one.
        if let Some(id) = self.appended.filter(|_| self.will_append(&encoding)) {
            ids.push(id);
            type_ids.push(type_ids.last().copied().unwrap_or(0));
        }
        Ok(Encoded {
            ids,
            type_ids,
            read_at: None,
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
        self.fit(a, b, add_special_tokens, options)
    }

    /// Fits tokenized parts to `options.max_length` (truncated, or refused when too long)
    /// with room for the appended token, then adds the special tokens.
    fn fit(
        &self,
        a: Encoding,
        b: Option<Encoding>,
        add_special_tokens: bool,
        options: &EncodeOptions,
    ) -> Result<Encoding, TextError> {
        let special = if add_special_tokens {
            self.tokenizer
                .get_post_processor()
                .map_or(0, |p| p.added_tokens(b.is_some()))
        } else {
            0
        };
        let post_process = |a: Encoding, b: Option<Encoding>| {
            self.tokenizer
                .post_process(a, b, add_special_tokens)
                .map_err(|e| TextError::Tokenizer(e.to_string()))
        };
        let content = a.get_ids().len() + b.as_ref().map_or(0, |b| b.get_ids().len());
        let room = usize::from(self.appended.is_some());
        if content + special + room <= options.max_length {
            return post_process(a, b);
        }
        // Over the limit with room for the appended token, which an input that ends with
        // it does not get: its length is then that of its own tokens.
        let whole = post_process(a.clone(), b.clone())?;
        let length = whole.get_ids().len() + usize::from(self.will_append(&whole));
        if length <= options.max_length {
            return Ok(whole);
        }
        if !options.truncate {
            return Err(TextError::TooLong {
                length,
                max: options.max_length,
            });
        }
        let truncated = |room: usize| {
            let params = TruncationParams {
                max_length: options.max_length.saturating_sub(special + room),
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: match options.direction {
                    Direction::Left => TruncationDirection::Left,
                    Direction::Right => TruncationDirection::Right,
                },
            };
            let (a, b) = truncate_encodings(a.clone(), b.clone(), &params)
                .map_err(|e| TextError::Tokenizer(e.to_string()))?;
            post_process(a, b)
        };
        let reserved = truncated(room)?;
        // Room was left for the token, and the cut kept the input's own (a text that ends
        // with it, cut from the left): that room is the input's, as without the token.
        if room == 1 && !self.will_append(&reserved) {
            let full = truncated(0)?;
            if !self.will_append(&full) {
                return Ok(full);
            }
        }
        Ok(reserved)
    }

    /// Whether `encoding` gets the appended token: there is one and it does not end so.
    fn will_append(&self, encoding: &Encoding) -> bool {
        self.appended
            .is_some_and(|id| encoding.get_ids().last() != Some(&id))
    }
}

/// Token ids a client sent, as an encoding to fit like tokenized text.
fn ids_encoding(ids: &[u32]) -> Encoding {
    let tokens = ids
        .iter()
        .map(|&id| Token::new(id, String::new(), (0, 0)))
        .collect();
    Encoding::from_tokens(tokens, 0)
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const REWARD_TOKEN: &str = "[UNUSED_TOKEN_130]";

    /// The internlm2-rm fixture's encoder, which appends its reward token.
    fn internlm2() -> (TextEncoder, u32) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/internlm2-rm");
        let mut encoder = super::super::load_text_encoder(&dir).expect("the fixture's tokenizer");
        let id = encoder
            .tokenizer()
            .token_to_id(REWARD_TOKEN)
            .expect("the fixture has the reward token");
        encoder.append_token(id);
        (encoder, id)
    }

    fn text(s: &str) -> Input {
        Input::Text(s.to_string())
    }

    const TEXT: &str = "The assistant explained the long report with care, step by step.";

    /// An input that ends with the appended token is as long as its own tokens: it fits a
    /// limit of exactly that, and a cut from the left keeps the token and fills the limit.
    #[test]
    fn a_text_that_ends_with_the_appended_token_spends_no_room_on_it() {
        let (encoder, id) = internlm2();
        let unlimited = EncodeOptions::up_to(usize::MAX, false, Direction::Left);
        let own = format!("{TEXT}{REWARD_TOKEN}");
        let whole = encoder.encode(&text(&own), &unlimited).unwrap().ids;
        let n = whole.len();
        assert_eq!(whole.last(), Some(&id));
        assert_eq!(whole.iter().filter(|&&t| t == id).count(), 1);
        // The same ids as the server appending the token itself.
        assert_eq!(encoder.encode(&text(TEXT), &unlimited).unwrap().ids, whole);

        let exact = encoder.encode(
            &text(&own),
            &EncodeOptions::up_to(n, false, Direction::Left),
        );
        assert_eq!(exact.unwrap().ids, whole);
        match encoder.encode(
            &text(&own),
            &EncodeOptions::up_to(n - 1, false, Direction::Left),
        ) {
            Err(TextError::TooLong { length, max }) => assert_eq!((length, max), (n, n - 1)),
            other => panic!("{other:?}"),
        }

        let left = encoder
            .encode(
                &text(&own),
                &EncodeOptions::up_to(n - 3, true, Direction::Left),
            )
            .unwrap()
            .ids;
        assert_eq!(left.len(), n - 3);
        assert_eq!(left[0], whole[0], "the BOS token is kept");
        assert_eq!(left[1..], whole[4..], "the end is kept, the token once");
    }

    /// Without the token in the text, or when the cut takes it (from the right), the room
    /// for it is kept and it is appended: still the limit's length, ending with it.
    #[test]
    fn room_is_kept_for_the_token_the_encoder_appends() {
        let (encoder, id) = internlm2();
        let unlimited = EncodeOptions::up_to(usize::MAX, false, Direction::Left);
        let whole = encoder.encode(&text(TEXT), &unlimited).unwrap().ids;
        let n = whole.len();
        assert_eq!(
            encoder
                .encode(
                    &text(TEXT),
                    &EncodeOptions::up_to(n, false, Direction::Left)
                )
                .unwrap()
                .ids,
            whole
        );
        assert!(matches!(
            encoder.encode(&text(TEXT), &EncodeOptions::up_to(n - 1, false, Direction::Left)),
            Err(TextError::TooLong { length, .. }) if length == n
        ));
        let left = encoder
            .encode(
                &text(TEXT),
                &EncodeOptions::up_to(n - 3, true, Direction::Left),
            )
            .unwrap()
            .ids;
        assert_eq!(left.len(), n - 3);
        assert_eq!((left[0], &left[1..]), (whole[0], &whole[4..]));

        let own = format!("{TEXT}{REWARD_TOKEN}");
        let right = encoder
            .encode(
                &text(&own),
                &EncodeOptions::up_to(n - 3, true, Direction::Right),
            )
            .unwrap()
            .ids;
        assert_eq!(right.len(), n - 3);
        assert_eq!(right[..n - 4], whole[..n - 4]);
        assert_eq!(right.last(), Some(&id));
    }

    /// Token ids are taken as they are: no special tokens added, the appended token once,
    /// truncated as text is.
    #[test]
    fn token_ids_get_the_appended_token_once_and_are_cut_alike() {
        let (encoder, id) = internlm2();
        let unlimited = EncodeOptions::up_to(usize::MAX, false, Direction::Left);
        let whole = encoder.encode(&text(TEXT), &unlimited).unwrap().ids;
        let n = whole.len();
        let without = whole[..n - 1].to_vec();
        for given in [&without, &whole] {
            let ids = Input::Ids(given.clone());
            assert_eq!(encoder.encode(&ids, &unlimited).unwrap().ids, whole);
            let exact = EncodeOptions::up_to(n, false, Direction::Left);
            assert_eq!(encoder.encode(&ids, &exact).unwrap().ids, whole);
            let left = encoder
                .encode(&ids, &EncodeOptions::up_to(n - 3, true, Direction::Left))
                .unwrap()
                .ids;
            assert_eq!(left, whole[3..], "the end is kept, the token once");
            let right = encoder
                .encode(&ids, &EncodeOptions::up_to(n - 3, true, Direction::Right))
                .unwrap()
                .ids;
            assert_eq!(
                (&right[..n - 4], right.last()),
                (&whole[..n - 4], Some(&id))
            );
        }
        assert!(matches!(
            encoder.encode(&Input::Ids(vec![]), &unlimited),
            Err(TextError::Empty)
        ));
        assert!(matches!(
            encoder.encode(&Input::Ids(without), &EncodeOptions::up_to(n - 1, false, Direction::Left)),
            Err(TextError::TooLong { length, .. }) if length == n
        ));
    }
}
