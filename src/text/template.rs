//! Chat templates from tokenizer_config.json, rendered with minijinja the way transformers
//! renders them with Jinja2: trim_blocks and lstrip_blocks on, loop controls,
//! `raise_exception`, `strftime_now`, a `tojson` that writes what Python's `json.dumps`
//! writes, Python string methods (`.strip()`, `.startswith()`, ...) and the special tokens
//! (`bos_token`, `eos_token`, ...) in the context.

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use super::TextError;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message as transformers templates see it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `special_tokens` are passed to every render (`bos_token`, ...).
    pub fn new(source: &str, special_tokens: BTreeMap<String, String>) -> Result<Self, TextError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TextError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TextError::Template(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// Renders the conversation; errors raised by the template (`raise_exception`) come
    /// back as [`TextError::Rejected`] with the template's message.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TextError::Template(e.to_string()))?;
        let mut ctx: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert(
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        template
            .render(Value::from(ctx))
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => {
                    TextError::Rejected(e.detail().map_or_else(|| e.to_string(), str::to_string))
                }
                _ => TextError::Template(format!("chat template failed: {e}")),
            })
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: templates print today's date with it (e.g. Llama 3.1). Only
/// the common directives are supported; UTC is used.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    format
        .replace("%Y", &format!("{year:04}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", month_name)
        .replace("%b", &month_name[..3])
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, which is what
/// transformers installs as `tojson` (no HTML escaping, `", "` and `": "` separators).
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(out)
}

fn write_python_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_python_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ])
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn renders_with_trim_blocks_lstrip_blocks_and_special_tokens() {
        let source = "{{ bos_token }}\n{% for m in messages %}\n    {% if m['role'] == 'user' %}\n[INST] {{ m['content'] | trim }} [/INST]\n    {% else %}\n {{ m['content'].strip() }}{{ eos_token }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}GEN{% endif %}";
        let t = ChatTemplate::new(source, tokens()).unwrap();
        let out = t
            .render(&msgs(&[("user", "  hi "), ("assistant", " yo ")]), false)
            .unwrap();
        assert_eq!(out, "<s>\n[INST] hi [/INST]\n yo</s>\n");
        assert!(t
            .render(&msgs(&[("user", "x")]), true)
            .unwrap()
            .ends_with("GEN"));
    }

    #[test]
    fn loop_controls_and_raise_exception() {
        let source = "{% for m in messages %}{% if loop.first and m.role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% if not loop.last %}|{% endif %}{% endfor %}";
        let t = ChatTemplate::new(source, tokens()).unwrap();
        assert_eq!(
            t.render(
                &msgs(&[("user", "a"), ("system", "s"), ("assistant", "b")]),
                false
            )
            .unwrap(),
            "a|b"
        );
        match t.render(&msgs(&[("assistant", "b")]), false) {
            Err(TextError::Rejected(m)) => assert_eq!(
                m,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", tokens()).unwrap();
        let env = &t.env;
        let out = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(minijinja::context! { x => minijinja::value::Serde(serde_json::json!({"a": [1, "é<"], "b": {}})) })
            .unwrap();
        assert_eq!(out, "{\"a\": [1, \"é<\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    \"é<\"\n  ],\n  \"b\": {}\n}");
    }

    #[test]
    fn strftime_now_formats_a_date() {
        let s = strftime_now("%d %b %Y".into());
        assert_eq!(s.len(), 11, "{s}");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
    }
}
