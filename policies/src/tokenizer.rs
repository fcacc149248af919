//! Tokenizers and prompt templates.
//!
//! One [`Tokenizer`] type serves real Hugging Face models (their
//! `tokenizer.json`) and SynthClinic's small world (a word-level vocabulary
//! built from the environment's texts and saved as a `tokenizer.json` too), so
//! loading, encoding and decoding have one path. The word-level pipeline is
//! made of the `tokenizers` crate's own components, so the saved file loads in
//! Python's `tokenizers` / `transformers` and gives the same ids there.
//!
//! [`PromptTemplate`] says how a question becomes a prompt and what ends the
//! model's turn.

use crate::chat_template::ChatTemplate;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

const PAD: &str = "<pad>";
const UNK: &str = "<unk>";
const ENDOFTEXT: &str = "<|endoftext|>";
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// The word-level vocabulary starts with these, at ids 0 to 4.
const WORD_LEVEL_SPECIALS: [&str; 5] = [PAD, UNK, ENDOFTEXT, IM_START, IM_END];
const WORD_LEVEL_PAD_ID: u32 = 0;
const WORD_LEVEL_EOS_ID: u32 = 2;

/// Always in a word-level vocabulary whatever the texts: every ASCII
/// whitespace character (so any run of whitespace round-trips), the blank line
/// between steps, and ChatML's role names (so both templates encode without
/// `<unk>` even when the texts were not rendered with them). Digits and ASCII
/// punctuation, bare and after a space, are added to these (see
/// [`always_pieces`]), so every number encodes, whatever the texts held.
const WORD_LEVEL_BASE: [&str; 10] = [
    " ",
    "\t",
    "\n",
    "\r",
    "\x0B",
    "\x0C",
    "\n\n",
    "system",
    "user",
    "assistant",
];

/// Word-level pieces, in order of preference: a line break (a blank line is
/// one piece, as steps are separated by one), a run of ASCII letters with the
/// single space before it, one digit or one other character (punctuation,
/// non-ASCII) with the space before it, or any other whitespace character
/// alone. Numbers are therefore read digit by digit, so "above the range" can
/// be learned as a comparison rather than memorised per value, and a word's
/// punctuation is its own piece (`" axis"` and `"."`), so the option text in a
/// question and in an answer are the same ids. Every character falls in one
/// piece, so concatenating the pieces gives the text back. Whitespace is
/// spelled out (not `\s`) so Oniguruma (Python) and fancy-regex (Rust) split
/// identically.
const WORD_PATTERN: &str = r"\n\n?| ?[A-Za-z]+| ?[^A-Za-z \t\n\r\x0B\x0C]|[ \t\r\x0B\x0C]";

/// The digits and ASCII punctuation, each bare and after a space.
fn always_pieces() -> impl Iterator<Item = String> {
    (b'!'..=b'~')
        .filter(|b| !b.is_ascii_alphabetic())
        .flat_map(|b| [(b as char).to_string(), format!(" {}", b as char)])
}

/// Tried in order when no `tokenizer_config.json` names the EOS token.
const EOS_CANDIDATES: [&str; 4] = [ENDOFTEXT, IM_END, "</s>", "<eos>"];

/// What went wrong, naming the file and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "cannot read tokenizer file {path}: {source}; check the path (a model folder holds \
         tokenizer.json; SynthClinic's is written with Tokenizer::word_level(..).save(..))"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not JSON ({source}); expected a Hugging Face tokenizer.json \
         (the file shipped with the model, not tokenizer.model or vocab.txt)"
    )]
    NotJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} is JSON but not a tokenizer the `tokenizers` crate can load ({message}); \
         expected a Hugging Face tokenizer.json: re-save it with a recent `tokenizers` \
         (Tokenizer.from_file(..).save(..) in Python)"
    )]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "no EOS token for {path}: neither generation_config.json nor config.json beside it \
         gives `eos_token_id`, no tokenizer_config.json names `eos_token`, and none of \
         {candidates} is an added token; write a tokenizer_config.json next to it with \
         {{\"eos_token\": \"...\"}}",
        candidates = EOS_CANDIDATES.join(", ")
    )]
    NoEos { path: PathBuf },
    #[error("{0}")]
    ChatTemplate(String),
    #[error("cannot write tokenizer to {path}: {source}; check the folder exists and is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error(
        "token id {id} is outside the vocabulary (0..{vocab_size}); mask logits at and beyond \
         vocab_size before sampling"
    )]
    BadId { id: i64, vocab_size: usize },
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// A `tokenizers` tokenizer with its EOS and PAD ids resolved once.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: u32,
    pad: u32,
    /// Every id that ends a sequence: EOS first, then the other ids the
    /// model's generation config names (transformers stops at any of them).
    stops: Vec<u32>,
    /// The model folder's own chat template, when it has one.
    chat_template: Option<Arc<ChatTemplate>>,
    vocab_size: usize,
    canonical: Option<Arc<Canonical>>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`. EOS and PAD come from a `tokenizer_config.json`
    /// beside it when it names them (`eos_token` / `pad_token`, a string or
    /// `{"content": ...}`); else EOS is the first id of `eos_token_id` in the
    /// model folder's `generation_config.json` or `config.json` (as
    /// transformers resolves it; every id of that list also ends a sequence,
    /// see [`Self::is_stop`]); else the first added token among
    /// `<|endoftext|>`, `<|im_end|>`, `</s>`, `<eos>`, and PAD is `<pad>` when
    /// that is an added token, else EOS (padding is masked, so any id serves;
    /// Qwen2 pads with `<|endoftext|>` too). No EOS is an error: generation
    /// would never stop. Truncation and padding stored in the file are
    /// switched off, so `encode` always returns every token of the text.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            match e.downcast::<serde_json::Error>() {
                Ok(json) if json.is_syntax() || json.is_eof() => TokenizerError::NotJson {
                    path: path.to_path_buf(),
                    source: *json,
                },
                Ok(json) => TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    message: json.to_string(),
                },
                Err(other) => TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    message: other.to_string(),
                },
            }
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;

        let config = SpecialConfig::beside(path)?;
        let added: HashMap<String, u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, token)| (token.content, id))
            .collect();
        let first_added =
            |candidates: &[&str]| candidates.iter().find_map(|&c| added.get(c).copied());
        let generation = generation_eos(path, vocab_len(&inner))?;
        let eos = match config.named(&inner, "eos_token")? {
            Some(id) => id,
            None => match generation.first() {
                Some(&id) => id,
                None => first_added(&EOS_CANDIDATES).ok_or_else(|| TokenizerError::NoEos {
                    path: path.to_path_buf(),
                })?,
            },
        };
        let pad = match config.named(&inner, "pad_token")? {
            Some(id) => id,
            None => first_added(&[PAD]).unwrap_or(eos),
        };
        let mut tokenizer = Self::with_specials(inner, eos, pad);
        let dir = path.parent().unwrap_or(Path::new("."));
        tokenizer.chat_template = ChatTemplate::from_folder(dir)
            .map_err(|e| TokenizerError::ChatTemplate(e.to_string()))?
            .map(Arc::new);
        tokenizer.stops = std::iter::once(eos)
            .chain(generation.into_iter().filter(|&id| id != eos))
            .collect();
        Ok(tokenizer)
    }

    /// A word-level tokenizer over the pieces of `texts` (SynthClinic's: the
    /// training split and the textbook, never the test split, whose unseen
    /// words would be ids that are never inputs or targets). A piece is a run
    /// of letters with the space before it, one digit or punctuation mark
    /// with the space before it, or whitespace (see `WORD_PATTERN`), so a
    /// prompt costs one token per word, digit and mark. Lossless:
    /// `decode(encode(t)) == t` for any text made of known words and any
    /// digits, punctuation and whitespace. Words seen fewer than `min_count`
    /// times map to `<unk>`, a special token: it decodes to nothing, is never
    /// sampled (see [`Canonical`]) and never trained on. Ids: `<pad>` 0,
    /// `<unk>` 1, `<|endoftext|>` 2 (EOS), `<|im_start|>` 3, `<|im_end|>` 4,
    /// then pieces by descending count and bytewise, so the same texts give a
    /// byte-identical `tokenizer.json`.
    pub fn word_level<'a>(texts: impl IntoIterator<Item = &'a str>, min_count: usize) -> Self {
        // Count pieces with a tokenizer that has the final pipeline, so the
        // counted pieces are exactly what `encode` will look up: special
        // tokens split out of the text first, then the pattern.
        let base: Vec<String> = WORD_LEVEL_SPECIALS
            .iter()
            .chain(&WORD_LEVEL_BASE)
            .map(|w| w.to_string())
            .collect();
        let probe = word_level_pipeline(&base);
        let always: Vec<String> = WORD_LEVEL_BASE
            .iter()
            .map(|w| w.to_string())
            .chain(always_pieces())
            .collect();
        let mut counts: HashMap<String, usize> = always.iter().map(|w| (w.clone(), 0)).collect();
        for text in texts {
            let encoding = probe
                .encode(text, false)
                .expect("word-level encoding cannot fail: <unk> is in the vocabulary");
            for &(start, end) in encoding.get_offsets() {
                let Some(piece) = text.get(start..end) else {
                    continue;
                };
                match counts.get_mut(piece) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(piece.to_string(), 1);
                    }
                }
            }
        }
        let mut words: Vec<(String, usize)> = counts
            .into_iter()
            .filter(|(w, n)| {
                !WORD_LEVEL_SPECIALS.contains(&w.as_str())
                    && (*n >= min_count || always.contains(w))
            })
            .collect();
        words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let vocab: Vec<String> = WORD_LEVEL_SPECIALS
            .iter()
            .map(|w| w.to_string())
            .chain(words.into_iter().map(|(w, _)| w))
            .collect();
        Self::with_specials(
            word_level_pipeline(&vocab),
            WORD_LEVEL_EOS_ID,
            WORD_LEVEL_PAD_ID,
        )
    }

    fn with_specials(inner: tokenizers::Tokenizer, eos: u32, pad: u32) -> Self {
        // One past the largest id: the rows an embedding needs, even if ids have gaps.
        let vocab_size = vocab_len(&inner);
        let canonical = match inner.get_model() {
            tokenizers::ModelWrapper::WordLevel(_) => {
                Some(Arc::new(Canonical::new(&inner, vocab_size)))
            }
            _ => None,
        };
        Tokenizer {
            inner,
            eos,
            pad,
            stops: vec![eos],
            chat_template: None,
            vocab_size,
            canonical,
        }
    }

    /// Which tokens may follow which so that sampled ids stay the encoding of
    /// their own text; `None` for tokenizers (BPE) whose models are trained
    /// on non-canonical merges too.
    pub fn canonical(&self) -> Option<&Canonical> {
        self.canonical.as_deref()
    }

    /// Writes `tokenizer.json` (pretty, as Python's `tokenizers` saves it) via
    /// a temporary sibling, fsynced and renamed, so a crash never leaves a
    /// half-written file where a run will look for it.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        let err = |source| TokenizerError::Write {
            path: path.to_path_buf(),
            source,
        };
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        medzero_envs::atomic::write(path, json.as_bytes()).map_err(err)?;
        // EOS and PAD by name, and the class that runs tokenizer.json as
        // written: without it transformers (and TRL) rebuild the model
        // family's own tokenizer from the vocabulary.
        let name = |id: u32| self.inner.id_to_token(id);
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": name(self.eos),
            "pad_token": name(self.pad),
        });
        // A model's chat template travels with its checkpoints, as
        // transformers saves it, with the special tokens it refers to.
        if let Some(t) = &self.chat_template {
            for (key, value) in t.specials() {
                if key != "eos_token" && key != "pad_token" {
                    config[key.as_str()] = serde_json::json!(value);
                }
            }
            let jinja = path.with_file_name("chat_template.jinja");
            medzero_envs::atomic::write(&jinja, t.source().as_bytes()).map_err(|source| {
                TokenizerError::Write {
                    path: jinja.clone(),
                    source,
                }
            })?;
        }
        let config_path = path.with_file_name("tokenizer_config.json");
        medzero_envs::atomic::write(&config_path, config.to_string().as_bytes()).map_err(|source| {
            TokenizerError::Write {
                path: config_path.clone(),
                source,
            }
        })
    }

    /// The model folder's own chat template, if it came with one.
    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.chat_template.as_ref()
    }

    /// Token ids of `text`; no BOS or EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// The text of `ids`, special tokens skipped. An id outside the
    /// vocabulary is an error rather than silently dropped (as `tokenizers`
    /// does): it means logits beyond the vocabulary were not masked.
    pub fn decode(&self, ids: &[i64]) -> Result<String, TokenizerError> {
        let ids = ids
            .iter()
            .map(|&id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&u| (u as usize) < self.vocab_size)
                    .ok_or(TokenizerError::BadId {
                        id,
                        vocab_size: self.vocab_size,
                    })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        self.inner
            .decode(&ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// One past the largest token id, added tokens included: the number of
    /// embedding rows a model needs (the token count when ids are contiguous).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn eos_id(&self) -> i64 {
        i64::from(self.eos)
    }

    /// Whether `id` ends a sequence: EOS or another id of the generation
    /// config's `eos_token_id` list.
    pub fn is_stop(&self, id: i64) -> bool {
        self.stops.iter().any(|&s| i64::from(s) == id)
    }

    /// Every id that ends a sequence, EOS first.
    pub fn stop_ids(&self) -> Vec<i64> {
        self.stops.iter().map(|&s| i64::from(s)).collect()
    }

    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad)
    }

    /// The id of a token as spelled in the vocabulary (e.g. `"<|im_end|>"`).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
}

/// The pairs of word-level tokens whose decoded texts would merge into other
/// pieces when encoded again: a word after a word (`" of"` then `"Pulmonary"`
/// decodes to `" ofPulmonary"`), anything but whitespace after a lone space
/// (`" "` then `"5"` is `" 5"`), a line break after a single line break, and
/// the specials, which decode to nothing, except the EOS that ends a
/// completion (`<unk>`, `<pad>`, `<|im_start|>`; the sampler allows its stop
/// tokens too).
/// Sampling masks them, so `encode(decode(ids)) == ids` for every sequence a
/// run generates and the cached row of a sampled text is the row a fresh
/// prefill of that text builds (canonical sampling, as in arXiv:2506.07956).
/// Because of `WORD_PATTERN`'s shape, allowed pairs make allowed sequences.
#[derive(Debug)]
pub struct Canonical {
    /// Per token, bit k set when it ends the way rule k forbids a follower for.
    ends: Vec<u8>,
    /// Per rule k, the tokens it forbids after a token with bit k.
    forbids: [Vec<bool>; 3],
    /// Never sampled.
    never: Vec<bool>,
}

const ENDS_LETTER: u8 = 1;
const ENDS_LONE_SPACE: u8 = 2;
const ENDS_LONE_NEWLINE: u8 = 4;

impl Canonical {
    fn new(inner: &tokenizers::Tokenizer, vocab_size: usize) -> Self {
        let specials: HashMap<u32, String> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        let mut ends = vec![0u8; vocab_size];
        let mut forbids = [(); 3].map(|_| vec![false; vocab_size]);
        let mut never = vec![false; vocab_size];
        let ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C');
        for id in 0..vocab_size as u32 {
            let i = id as usize;
            if let Some(name) = specials.get(&id) {
                // Decoding drops specials, so one inside a completion would be
                // lost; only what ends it may be sampled (the sampler lets the
                // stop tokens through as well, e.g. ChatML's `<|im_end|>`).
                never[i] = name != ENDOFTEXT;
                continue;
            }
            let Some(piece) = inner.id_to_token(id) else {
                never[i] = true;
                continue;
            };
            let (Some(first), Some(last)) = (piece.chars().next(), piece.chars().last()) else {
                never[i] = true;
                continue;
            };
            let flag = |on: bool, bit: u8| if on { bit } else { 0 };
            ends[i] = flag(last.is_ascii_alphabetic(), ENDS_LETTER)
                | flag(piece == " ", ENDS_LONE_SPACE)
                | flag(piece == "\n", ENDS_LONE_NEWLINE);
            forbids[0][i] = first.is_ascii_alphabetic();
            forbids[1][i] = !ws(first);
            forbids[2][i] = first == '\n';
        }
        Canonical {
            ends,
            forbids,
            never,
        }
    }

    /// Whether `next` may be sampled right after `prev`.
    pub fn allows(&self, prev: i64, next: i64) -> bool {
        let Some(n) = usize::try_from(next).ok().filter(|&n| n < self.never.len()) else {
            return false;
        };
        let ends = self.ends_of(prev);
        !self.never[n] && (0..3).all(|k| ends & (1 << k) == 0 || !self.forbids[k][n])
    }

    fn ends_of(&self, prev: i64) -> u8 {
        usize::try_from(prev)
            .ok()
            .and_then(|p| self.ends.get(p))
            .copied()
            .unwrap_or(0)
    }

    /// The forbidden tokens after each of `prev`, row-major [rows, vocab],
    /// except the `stops` that end a completion.
    pub fn forbidden(&self, prev: &[i64], stops: &[i64]) -> Vec<bool> {
        let v = self.never.len();
        let mut out = Vec::with_capacity(prev.len() * v);
        for &p in prev {
            let ends = self.ends_of(p);
            let rules: Vec<&Vec<bool>> = (0..3)
                .filter(|k| ends & (1 << k) != 0)
                .map(|k| &self.forbids[k])
                .collect();
            out.extend((0..v).map(|n| {
                (self.never[n] && !stops.contains(&(n as i64))) || rules.iter().any(|r| r[n])
            }));
        }
        out
    }
}

/// The word-level tokenizer over `vocab` (ids in order): the piece pattern,
/// a WordLevel model, and a Fuse decoder that concatenates pieces unchanged.
fn word_level_pipeline(vocab: &[String]) -> tokenizers::Tokenizer {
    let model = WordLevel::builder()
        .vocab(
            vocab
                .iter()
                .zip(0u32..)
                .map(|(w, id)| (w.clone(), id))
                .collect(),
        )
        .unk_token(UNK.to_string())
        .build()
        .expect("a WordLevel model built from an in-memory vocabulary cannot fail");
    let split = Split::new(
        SplitPattern::Regex(WORD_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .expect("WORD_PATTERN is a valid regex");
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(split))
        .with_decoder(Some(Fuse::new()));
    let specials: Vec<AddedToken> = [PAD, UNK, ENDOFTEXT, IM_START, IM_END]
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    tokenizer
}

/// `tokenizer_config.json` beside a `tokenizer.json`, if there is one.
struct SpecialConfig {
    path: PathBuf,
    json: Option<Value>,
}

impl SpecialConfig {
    fn beside(tokenizer_json: &Path) -> Result<Self, TokenizerError> {
        let path = tokenizer_json.with_file_name("tokenizer_config.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SpecialConfig { path, json: None });
            }
            Err(e) => {
                return Err(TokenizerError::Config {
                    message: format!("cannot read it ({e}); fix its permissions or remove it"),
                    path,
                });
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(json) => Ok(SpecialConfig {
                path,
                json: Some(json),
            }),
            Err(e) => Err(TokenizerError::Config {
                message: format!(
                    "not valid JSON ({e}); fix it or remove it to fall back to the usual EOS tokens"
                ),
                path,
            }),
        }
    }

    /// The id of the token the config names in `field`, if it names one.
    fn named(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        field: &str,
    ) -> Result<Option<u32>, TokenizerError> {
        let bad = |message: String| TokenizerError::Config {
            path: self.path.clone(),
            message,
        };
        let name = match self.json.as_ref().and_then(|j| j.get(field)) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s,
            Some(Value::Object(o)) => match o.get("content") {
                Some(Value::String(s)) => s,
                _ => {
                    return Err(bad(format!(
                        "`{field}` is an object without a string \"content\"; write \
                         \"{field}\": \"<token>\""
                    )));
                }
            },
            Some(other) => {
                return Err(bad(format!(
                    "`{field}` is {other}, not a token; write \"{field}\": \"<token>\""
                )));
            }
        };
        tokenizer.token_to_id(name).map(Some).ok_or_else(|| {
            bad(format!(
                "`{field}` is {name:?}, which is not in the tokenizer.json beside it; \
                 fix `{field}` or use the tokenizer.json this config belongs with"
            ))
        })
    }
}

/// One past the largest id of `tokenizer`, added tokens included.
fn vocab_len(tokenizer: &tokenizers::Tokenizer) -> usize {
    tokenizer
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, |id| id as usize + 1)
}

/// The EOS ids the model folder of `tokenizer_json` gives generation, as
/// transformers resolves them: `eos_token_id` (an id or a list of ids) of
/// `generation_config.json`, else of `config.json`; empty when neither
/// gives one. An id outside the vocabulary is an error naming the file.
fn generation_eos(tokenizer_json: &Path, vocab: usize) -> Result<Vec<u32>, TokenizerError> {
    for name in ["generation_config.json", "config.json"] {
        let path = tokenizer_json.with_file_name(name);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let bad = |message: String| TokenizerError::Config {
            path: path.clone(),
            message,
        };
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("not valid JSON ({e}); fix it or remove it")))?;
        let ids = match json.get("eos_token_id") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(items)) => items.clone(),
            Some(one) => vec![one.clone()],
        };
        return ids
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| (id as usize) < vocab)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        bad(format!(
                            "`eos_token_id` holds {v}, not an id of the tokenizer's {vocab} \
                             tokens; fix it or remove the field"
                        ))
                    })
            })
            .collect();
    }
    Ok(Vec::new())
}

/// How a question becomes a prompt, and where the model's completion begins
/// (right after the rendered prompt).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptTemplate {
    /// The question, then a blank line: for base models and SynthClinic.
    Plain,
    /// ChatML as Qwen2 renders one user turn with the generation prompt.
    ChatMl,
    /// The model folder's own chat template, as transformers renders it.
    Model(Arc<ChatTemplate>),
}

impl PromptTemplate {
    /// Plain: `"{user}\n\n"`. ChatML:
    /// `"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"`, which
    /// is Qwen2's chat template minus the system turn it inserts by default
    /// ("You are a helpful assistant."); use [`Self::render_with_system`] to
    /// reproduce that exactly. Model: one user turn with the generation
    /// prompt, as `apply_chat_template` renders it (a default system message
    /// the template defines included).
    pub fn render(&self, user: &str) -> String {
        match self {
            PromptTemplate::Plain => format!("{user}\n\n"),
            PromptTemplate::ChatMl => {
                format!("{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n")
            }
            PromptTemplate::Model(t) => t.render_user(user),
        }
    }

    /// As [`Self::render`], after a system message: Plain puts it first,
    /// followed by a blank line; ChatML and Model give it its own `system` turn.
    pub fn render_with_system(&self, system: &str, user: &str) -> String {
        match self {
            PromptTemplate::Plain => format!("{system}\n\n{}", self.render(user)),
            PromptTemplate::ChatMl => {
                format!("{IM_START}system\n{system}{IM_END}\n{}", self.render(user))
            }
            PromptTemplate::Model(t) => t.render_system_user(system, user),
        }
    }

    /// As [`Self::render`], after worked examples (`shots`: question and
    /// answer pairs): Plain writes each as `"{q}\n\n{a}\n\n"`; ChatML and
    /// Model as user and assistant turns (lm-eval's few-shot as multi-turn).
    pub fn render_shots(
        &self,
        shots: &[(String, String)],
        user: &str,
    ) -> Result<String, crate::chat_template::ChatTemplateError> {
        Ok(match self {
            PromptTemplate::Plain => {
                let mut s: String = shots
                    .iter()
                    .map(|(q, a)| format!("{q}\n\n{a}\n\n"))
                    .collect();
                s.push_str(&self.render(user));
                s
            }
            PromptTemplate::ChatMl => {
                let mut s: String = shots
                    .iter()
                    .map(|(q, a)| {
                        format!("{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n")
                    })
                    .collect();
                s.push_str(&self.render(user));
                s
            }
            PromptTemplate::Model(t) => {
                use crate::chat_template::Message;
                let mut messages: Vec<Message> = shots
                    .iter()
                    .flat_map(|(q, a)| [Message::new("user", q), Message::new("assistant", a)])
                    .collect();
                messages.push(Message::new("user", user));
                t.apply(&messages, true)?
            }
        })
    }

    /// The token text that ends an assistant turn: generation stops there and
    /// SFT targets end with it. A model's own template ends turns with the
    /// tokenizer's EOS (`None`: see [`Tokenizer::end_of_turn_id`]).
    pub fn end_of_turn(&self) -> Option<&'static str> {
        match self {
            PromptTemplate::Plain => Some(ENDOFTEXT),
            PromptTemplate::ChatMl => Some(IM_END),
            PromptTemplate::Model(_) => None,
        }
    }
}

/// How prompts are rendered (`student.template`, `--template`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChoice {
    /// The model folder's own chat template when it has one, else plain.
    #[default]
    Auto,
    /// The question, then a blank line.
    Plain,
    /// ChatML's user turn (Qwen2's, without its default system turn).
    ChatMl,
    /// The model folder's own chat template (`chat_template.jinja` or
    /// `chat_template` in `tokenizer_config.json`), as transformers renders it.
    Model,
}

/// `template = "model"` for a folder without a chat template.
#[derive(Debug, thiserror::Error)]
#[error(
    "template \"model\": the model folder has no chat template (chat_template.jinja, or \
     chat_template in tokenizer_config.json); use \"plain\" or \"chat_ml\""
)]
pub struct NoChatTemplate;

impl TemplateChoice {
    /// The template for a model with chat template `own` (its folder's).
    pub fn resolve(
        self,
        own: Option<&Arc<ChatTemplate>>,
    ) -> Result<PromptTemplate, NoChatTemplate> {
        Ok(match self {
            TemplateChoice::Plain => PromptTemplate::Plain,
            TemplateChoice::ChatMl => PromptTemplate::ChatMl,
            TemplateChoice::Auto => {
                own.map_or(PromptTemplate::Plain, |t| PromptTemplate::Model(t.clone()))
            }
            TemplateChoice::Model => PromptTemplate::Model(own.ok_or(NoChatTemplate)?.clone()),
        })
    }
}

impl std::str::FromStr for TemplateChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(Value::String(s.to_string()))
            .map_err(|_| format!("unknown template {s:?}; known: auto, plain, chat_ml, model"))
    }
}

impl Tokenizer {
    /// The token that ends an assistant turn under `template` (`<|im_end|>`
    /// for ChatML), or EOS when the vocabulary lacks it: what completions are
    /// trained to end with and what generation stops at.
    pub fn end_of_turn_id(&self, template: &PromptTemplate) -> i64 {
        template
            .end_of_turn()
            .and_then(|t| self.token_id(t))
            .unwrap_or(self.eos_id())
    }
}
