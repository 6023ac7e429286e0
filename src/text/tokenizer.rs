//! The tokenizer files of a checkpoint: tokenizer.json (run by the `tokenizers` crate, the
//! engine behind transformers' fast tokenizers) and tokenizer_config.json (special tokens,
//! chat template).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::TextError;

/// What warm needs from tokenizer_config.json (and special_tokens_map.json).
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    /// `bos_token`, `eos_token`, ... as strings, passed to chat templates.
    pub special_tokens: BTreeMap<String, String>,
    pub model_max_length: Option<usize>,
}

const SPECIAL_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl TokenizerConfig {
    pub fn read(dir: &Path) -> Result<Self, TextError> {
        let mut config = Self::default();
        // special_tokens_map.json first: tokenizer_config.json wins where both speak.
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let text =
                std::fs::read(&path).map_err(|e| TextError::Io(path.display().to_string(), e))?;
            let value: Value = serde_json::from_slice(&text)
                .map_err(|e| TextError::Config(format!("{}: {e}", path.display())))?;
            config.absorb(&value);
        }
        // Newer transformers save the template beside tokenizer_config.json.
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            config.chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| TextError::Io(jinja.display().to_string(), e))?,
            );
        }
        Ok(config)
    }

    fn absorb(&mut self, value: &Value) {
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(token) = value.get(*key).and_then(token_content) {
                self.special_tokens.insert(key.to_string(), token);
            }
        }
        match value.get("chat_template") {
            Some(Value::String(s)) => self.chat_template = Some(s.clone()),
            // A list of named templates: transformers uses the one named "default".
            Some(Value::Array(named)) => {
                self.chat_template = named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            _ => {}
        }
        if let Some(n) = value.get("model_max_length").and_then(Value::as_u64) {
            // transformers writes a huge sentinel when there is no limit.
            self.model_max_length = (n < 1 << 40).then_some(n as usize);
        }
    }
}

/// A special token given as a string or as an AddedToken object.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Loads tokenizer.json with any padding or truncation it carries switched off:
/// transformers ignores them unless asked (all-MiniLM-L6-v2's file pads to 128), and so
/// must we.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, TextError> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| TextError::Config(format!("{}: {e}", path.display())))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| TextError::Config(format!("{}: {e}", path.display())))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_and_named_templates() {
        let mut c = TokenizerConfig::default();
        c.absorb(&serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "model_max_length": 1_000_000_000_000_000_019_884_624_838_656u128 as f64,
        }));
        assert_eq!(c.special_tokens["bos_token"], "<s>");
        assert_eq!(c.special_tokens["eos_token"], "</s>");
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert_eq!(c.model_max_length, None);
    }
}
