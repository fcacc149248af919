//! A model's own chat template, rendered as transformers'
//! `apply_chat_template` renders it: the Jinja source from
//! `chat_template.jinja` (or `chat_template` in `tokenizer_config.json`),
//! `trim_blocks` and `lstrip_blocks` on, loop controls, Python's string
//! methods, `raise_exception`, and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, ...) as variables.
//!
//! Prompts of one user turn (and of a system and a user turn) are what every
//! stage renders, per question and often; they are rendered once at load
//! around a sentinel and kept as prefix and suffix, which also checks that
//! the template places the content verbatim.

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{origin}: the chat template does not parse as Jinja: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: the chat template failed to render {what}: {message}")]
    Render {
        origin: String,
        what: String,
        message: String,
    },
    #[error(
        "{origin}: the chat template does not place a message's content verbatim (it \
         rewrites or drops it); use student.template = \"chat_ml\" or \"plain\" instead"
    )]
    NotVerbatim { origin: String },
}

/// One turn of a conversation, as transformers' `messages` hold them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model folder's chat template, ready to render.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// The source parsed once, configured as transformers configures Jinja.
    env: Environment<'static>,
    /// Where the source came from, for errors.
    origin: String,
    /// `bos_token`, `eos_token`, ... by name, as the template sees them.
    specials: BTreeMap<String, String>,
    /// One user turn with the generation prompt: before and after the content.
    user: (String, String),
    /// A system turn then a user turn: before, between and after the
    /// contents; `None` when the template takes no system turn (Gemma's
    /// refuses one), or rewrites it.
    system_user: Option<(String, String, String)>,
}

impl PartialEq for ChatTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.specials == other.specials
    }
}

/// Stands in for a message's content when the single-turn shapes are cut.
const SENTINEL: &str = "\u{1}medzero-content\u{1}";
const SENTINEL_2: &str = "\u{1}medzero-content-2\u{1}";

impl ChatTemplate {
    /// The template of the model folder `dir`: `chat_template.jinja`, else
    /// `chat_template` in `tokenizer_config.json` (a string, or a list of
    /// named templates of which `default` is used); `None` when it has none.
    pub fn from_folder(dir: &Path) -> Result<Option<ChatTemplate>, ChatTemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ChatTemplateError::File {
                path: config_path.clone(),
                message: format!("not valid JSON ({e})"),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let specials = special_tokens(&config);
        let jinja = dir.join("chat_template.jinja");
        if let Ok(source) = std::fs::read_to_string(&jinja) {
            return ChatTemplate::new(&source, &jinja.display().to_string(), specials).map(Some);
        }
        let origin = format!("{} (chat_template)", config_path.display());
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string))
                .ok_or_else(|| ChatTemplateError::File {
                    path: config_path.clone(),
                    message: "`chat_template` is a list without a template named \"default\""
                        .into(),
                })?,
            Some(other) => {
                return Err(ChatTemplateError::File {
                    path: config_path,
                    message: format!("`chat_template` is {other}, not a Jinja string"),
                });
            }
        };
        ChatTemplate::new(&source, &origin, specials).map(Some)
    }

    /// A template from its source; `specials` are the tokenizer's special
    /// tokens by name (`bos_token`, `eos_token`, ...).
    pub fn new(
        source: &str,
        origin: &str,
        specials: BTreeMap<String, String>,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let env = environment(source).map_err(|e| ChatTemplateError::Syntax {
            origin: origin.to_string(),
            message: describe(&e),
        })?;
        let mut t = ChatTemplate {
            source: source.to_string(),
            env,
            origin: origin.to_string(),
            specials,
            user: Default::default(),
            system_user: Default::default(),
        };
        let whole = t.apply(&[Message::new("user", SENTINEL)], true)?;
        t.user = t.cut2(&whole)?;
        let whole = t.apply(
            &[
                Message::new("system", SENTINEL),
                Message::new("user", SENTINEL_2),
            ],
            true,
        );
        t.system_user = whole.ok().and_then(|whole| {
            let (before, rest) = whole.split_once(SENTINEL)?;
            let (between, after) = rest.split_once(SENTINEL_2)?;
            (!after.contains(SENTINEL) && !after.contains(SENTINEL_2))
                .then(|| (before.to_string(), between.to_string(), after.to_string()))
        });
        Ok(t)
    }

    /// The conversation rendered as `apply_chat_template(messages,
    /// add_generation_prompt=..., tokenize=False)` renders it.
    pub fn apply(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self.env.get_template("chat").expect("added at load");
        let mut ctx: BTreeMap<String, Value> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        template.render(ctx).map_err(|e| ChatTemplateError::Render {
            origin: self.origin.clone(),
            what: roles(messages),
            message: describe(&e),
        })
    }

    /// The Jinja source, as the folder holds it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens the template sees, by name (`bos_token`, ...).
    pub fn specials(&self) -> &BTreeMap<String, String> {
        &self.specials
    }

    /// One user turn with the generation prompt.
    pub fn render_user(&self, user: &str) -> String {
        format!("{}{user}{}", self.user.0, self.user.1)
    }

    /// A system turn, then a user turn, with the generation prompt; for a
    /// template without system turns, the system text opens the user turn.
    pub fn render_system_user(&self, system: &str, user: &str) -> String {
        match &self.system_user {
            Some((a, b, c)) => format!("{a}{system}{b}{user}{c}"),
            None => self.render_user(&format!("{system}\n\n{user}")),
        }
    }

    fn cut2(&self, whole: &str) -> Result<(String, String), ChatTemplateError> {
        match whole.split_once(SENTINEL) {
            Some((before, after)) if !after.contains(SENTINEL) => {
                Ok((before.to_string(), after.to_string()))
            }
            _ => Err(self.not_verbatim()),
        }
    }

    fn not_verbatim(&self) -> ChatTemplateError {
        ChatTemplateError::NotVerbatim {
            origin: self.origin.clone(),
        }
    }
}

/// Jinja as transformers configures it for chat templates.
fn environment(source: &str) -> Result<Environment<'static>, JinjaError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<Value, _> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, message))
    });
    // transformers' `strftime_now`; a fixed date keeps prompts reproducible.
    env.add_function("strftime_now", |_format: String| "26 Jul 2024".to_string());
    env.add_template_owned("chat".to_string(), source.to_string())?;
    Ok(env)
}

/// The special tokens a `tokenizer_config.json` names, as strings.
fn special_tokens(config: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
    ] {
        let name = match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(name) = name {
            out.insert(key.to_string(), name);
        }
    }
    out
}

fn roles(messages: &[Message]) -> String {
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    format!("a conversation of roles [{}]", roles.join(", "))
}

/// The error with its causes (a raised exception's message is one).
fn describe(e: &JinjaError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn folder_templates_load_from_either_file_and_bad_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_folder(dir.path()).unwrap().is_none());
        // tokenizer_config.json: a list of named templates, "default" used.
        let config = serde_json::json!({"eos_token": "<|im_end|>", "chat_template": [
            {"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::from_folder(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.render_user("Hi"),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.specials()["eos_token"], "<|im_end|>");
        // chat_template.jinja wins over the config's.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ messages[0]['content'] }}!",
        )
        .unwrap();
        let t = ChatTemplate::from_folder(dir.path()).unwrap().unwrap();
        assert_eq!(t.render_user("Hi"), "Hi!");
        // It takes no system turn: the system text opens the user turn.
        assert_eq!(t.render_system_user("Be brief.", "Hi"), "Be brief.\n\nHi!");

        let err = ChatTemplate::new("{% for m in messages %}", "t", BTreeMap::new()).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{err}");
        let upper = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}";
        let err = ChatTemplate::new(upper, "t", BTreeMap::new()).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::NotVerbatim { .. }),
            "{err}"
        );
        // A template that refuses a conversation says so, with its message.
        let strict = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif %}{{ messages[-1]['content'] }}";
        let t = ChatTemplate::new(strict, "t", BTreeMap::new()).unwrap();
        let err = t
            .apply(&[Message::new("assistant", "x")], true)
            .unwrap_err();
        assert!(err.to_string().contains("user first"), "{err}");
    }
}
