//! The input of a process reward model whose steps are tokenized apart: TRL's PRMTrainer
//! (the tokenizer's BOS token when it has one, the prompt, then each step followed by the
//! separator's tokens, every piece tokenized alone without special tokens) and Skywork's
//! o1-Open-PRM (the same with "\n" after the prompt). The step rewards are read at each
//! separator's last token; those positions are recorded here, since they cannot be found
//! in the ids afterwards (the separator also occurs inside steps, and tokenizing the whole
//! text would merge it with the text before it).

use std::borrow::Cow;

use super::encode::{Direction, EncodeOptions, Encoded, Input};
use super::TextError;

/// How steps are laid out for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeparatedSteps {
    /// The text after every step, and its ids tokenized alone.
    pub separator: String,
    pub separator_ids: Vec<u32>,
    /// The tokenizer's BOS token id (`tokenizer.bos_token_id`), put first when there is one.
    pub bos: Option<u32>,
    /// Text after the prompt, tokenized with it ("\n" in Skywork's layout, none in TRL's).
    pub prompt_suffix: String,
}

/// A response given whole, cut into steps at each separator; a last piece left empty (the
/// response ended with the separator, as TRL's layout does) is no step.
pub fn split_steps(response: &str, separator: &str) -> Vec<String> {
    let mut steps: Vec<String> = response.split(separator).map(str::to_string).collect();
    if steps.last().is_some_and(String::is_empty) {
        steps.pop();
    }
    steps
}

impl SeparatedSteps {
    /// Encodes `input` (a prompt with its steps, or with a response cut at each separator)
    /// with `tokenize` (a text's ids without special tokens); truncation keeps the BOS
    /// token and drops the steps whose separator it cuts.
    pub fn encode(
        &self,
        input: &Input,
        options: &EncodeOptions,
        tokenize: impl Fn(&str) -> Result<Vec<u32>, TextError>,
    ) -> Result<Encoded, TextError> {
        let (prompt, steps): (&str, Cow<[String]>) = match input {
            Input::Steps { prompt, steps } => (prompt, Cow::Borrowed(steps)),
            Input::Pair { prompt, response } => {
                (prompt, Cow::Owned(split_steps(response, &self.separator)))
            }
            Input::Text(_) | Input::Messages(_) | Input::Ids(_) => {
                return Err(TextError::Unscorable(format!(
                    "this process reward model (TRL's PRMTrainer layout) reads a plain prompt \
                     and the steps of its response, each tokenized apart and followed by \
                     {:?}: send {{\"prompt\", \"steps\": [...]}}, or {{\"prompt\", \
                     \"response\"}} to cut the response into steps at each {:?}",
                    self.separator, self.separator
                )))
            }
        };
        if steps.is_empty() {
            return Err(TextError::Unscorable(
                "the response has no step to score".into(),
            ));
        }
        // Each step's end is the separator's last token: there must be one.
        if self.separator_ids.is_empty() {
            return Err(TextError::Config(format!(
                "the step separator {:?} has no token ids",
                self.separator
            )));
        }
        let mut content = tokenize(&format!("{prompt}{}", self.prompt_suffix))?;
        let mut ends = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            content.extend(tokenize(step)?);
            content.extend_from_slice(&self.separator_ids);
            ends.push(content.len() - 1);
        }
        let bos: &[u32] = match &self.bos {
            Some(bos) => std::slice::from_ref(bos),
            None => &[],
        };
        let room = options.max_length.saturating_sub(bos.len());
        if content.len() > room {
            if !options.truncate {
                return Err(TextError::TooLong {
                    length: content.len() + bos.len(),
                    max: options.max_length,
                });
            }
            match options.direction {
                Direction::Right => {
                    content.truncate(room);
                    ends.retain(|&end| end < room);
                }
                Direction::Left => {
                    let cut = content.len() - room;
                    content.drain(..cut);
                    ends = ends
                        .into_iter()
                        .filter_map(|end| end.checked_sub(cut))
                        .collect();
                }
            }
            if ends.is_empty() {
                return Err(TextError::Unscorable(
                    "truncation left no step's separator, so no step can be scored".into(),
                ));
            }
        }
        let ids: Vec<u32> = bos.iter().chain(&content).copied().collect();
        Ok(Encoded {
            type_ids: vec![0; ids.len()],
            ids,
            read_at: Some(ends.into_iter().map(|end| end + bos.len()).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each character its own token: 'a' -> 97.
    fn chars(text: &str) -> Result<Vec<u32>, TextError> {
        Ok(text.chars().map(u32::from).collect())
    }

    fn layout(bos: Option<u32>) -> SeparatedSteps {
        SeparatedSteps {
            separator: "\n".into(),
            separator_ids: vec![10],
            bos,
            prompt_suffix: String::new(),
        }
    }

    fn steps(prompt: &str, steps: &[&str]) -> Input {
        Input::Steps {
            prompt: prompt.into(),
            steps: steps.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn steps_follow_the_prompt_each_with_the_separator() {
        let wide = EncodeOptions::up_to(100, false, Direction::Right);
        let got = layout(Some(1))
            .encode(&steps("q", &["ab", "c"]), &wide, chars)
            .unwrap();
        assert_eq!(got.ids, vec![1, 113, 97, 98, 10, 99, 10]);
        assert_eq!(got.read_at, Some(vec![4, 6]));
        // A response cut at each separator is the same input.
        let pair = Input::Pair {
            prompt: "q".into(),
            response: "ab\nc\n".into(),
        };
        assert_eq!(layout(Some(1)).encode(&pair, &wide, chars).unwrap(), got);
        let unended = Input::Pair {
            prompt: "q".into(),
            response: "ab\nc".into(),
        };
        assert_eq!(layout(Some(1)).encode(&unended, &wide, chars).unwrap(), got);
        // Without a BOS token.
        let plain = layout(None).encode(&steps("q", &["ab"]), &wide, chars);
        assert_eq!(plain.unwrap().read_at, Some(vec![3]));
        // With a line after the prompt (Skywork's).
        let lined = SeparatedSteps {
            prompt_suffix: "\n".into(),
            ..layout(Some(1))
        };
        let got = lined.encode(&steps("q", &["ab"]), &wide, chars).unwrap();
        assert_eq!(got.ids, vec![1, 113, 10, 97, 98, 10]);
        assert_eq!(got.read_at, Some(vec![5]));
    }

    #[test]
    fn truncation_keeps_bos_and_the_steps_it_leaves_whole() {
        let input = steps("q", &["ab", "c", "d"]);
        // [bos] q a b \n c \n d \n: nine tokens.
        let right = layout(Some(1))
            .encode(
                &input,
                &EncodeOptions::up_to(6, true, Direction::Right),
                chars,
            )
            .unwrap();
        assert_eq!(right.ids, vec![1, 113, 97, 98, 10, 99]);
        assert_eq!(right.read_at, Some(vec![4]));
        let left = layout(Some(1))
            .encode(
                &input,
                &EncodeOptions::up_to(5, true, Direction::Left),
                chars,
            )
            .unwrap();
        assert_eq!(left.ids, vec![1, 99, 10, 100, 10]);
        assert_eq!(left.read_at, Some(vec![2, 4]));
        let refused = layout(Some(1)).encode(
            &input,
            &EncodeOptions::up_to(8, false, Direction::Left),
            chars,
        );
        assert!(matches!(
            refused,
            Err(TextError::TooLong { length: 9, max: 8 })
        ));
        let none_left = layout(Some(1)).encode(
            &input,
            &EncodeOptions::up_to(4, true, Direction::Right),
            chars,
        );
        assert!(matches!(none_left, Err(TextError::Unscorable(_))));
    }

    #[test]
    fn text_conversations_and_empty_responses_are_refused() {
        let wide = EncodeOptions::up_to(100, false, Direction::Right);
        for input in [
            Input::Text("q\na\n".into()),
            Input::Messages(vec![]),
            steps("q", &[]),
            Input::Pair {
                prompt: "q".into(),
                response: String::new(),
            },
        ] {
            let got = layout(None).encode(&input, &wide, chars);
            assert!(matches!(got, Err(TextError::Unscorable(_))), "{input:?}");
        }
    }

    #[test]
    fn responses_are_cut_at_each_separator() {
        assert_eq!(split_steps("a\nb\n", "\n"), vec!["a", "b"]);
        assert_eq!(split_steps("a\n\nb", "\n"), vec!["a", "", "b"]);
        assert_eq!(split_steps("a ки b ки", " ки"), vec!["a", " b"]);
        assert!(split_steps("", "\n").is_empty());
    }
}
