//! Loaders for the benchmark and training-data formats medzero reads.
//!
//! Every malformed record is an error that names the file and the record
//! (`MedQA.json: record 17 (id 17): missing eval.answer`, `train.jsonl:12:
//! ...`, `MedQA.json:20391:5: ...` for broken JSON), so a bad file is fixed
//! rather than silently shrunk. Skipping is opt-in ([`LoadOptions`]), and the
//! skipped records are returned with their errors.
//!
//! The container (JSON array, JSON lines, or one JSON object) is read from the
//! file; the record format is told by the first record's keys
//! ([`detect_format`]) or given explicitly.

use crate::problem::{Choice, Gold, Problem};
use crate::verify;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::error::Category;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A record format. Containers are independent of the format: every format
/// but `pubmedqa` may be a JSON array or JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// MedS3's release: `{"id", "conversations": [human, gpt?], "eval": {"answer", "type"?, ...}}`.
    Meds3,
    /// The original MedQA release: `{"question", "options": {"A": ..}, "answer_idx", "answer"?, "meta_info"?}`.
    MedqaJsonl,
    /// The original MedMCQA release: `{"id", "question", "opa".."opd", "cop": 1..=4, "subject_name"?}`.
    Medmcqa,
    /// The original PubMedQA release: one object `{PMID: {"QUESTION", "final_decision", ...}}`.
    Pubmedqa,
    /// ShareGPT conversations without `eval` (MedThink): the answer is in the assistant turn.
    Sharegpt,
    /// Alpaca `{"instruction", "input"?, "output"}`: the answer is in the output.
    Alpaca,
    /// medzero's own: one serialised [`Problem`] per record.
    MedzeroJsonl,
}

impl Format {
    pub const ALL: [Format; 7] = [
        Format::Meds3,
        Format::MedqaJsonl,
        Format::Medmcqa,
        Format::Pubmedqa,
        Format::Sharegpt,
        Format::Alpaca,
        Format::MedzeroJsonl,
    ];

    /// Stable name, as used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::Meds3 => "meds3",
            Format::MedqaJsonl => "medqa-jsonl",
            Format::Medmcqa => "medmcqa",
            Format::Pubmedqa => "pubmedqa",
            Format::Sharegpt => "sharegpt",
            Format::Alpaca => "alpaca",
            Format::MedzeroJsonl => "medzero-jsonl",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown format {s:?}; known formats: {}", format_names()))
    }
}

fn format_names() -> String {
    Format::ALL.map(Format::name).join(", ")
}

/// Where a record sits in its file, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordAt {
    /// 0-based position in a JSON array, and the record's id if it has one.
    Index { index: usize, id: Option<String> },
    /// 1-based line of a JSON-lines file, and the record's id if it has one.
    Line { line: usize, id: Option<String> },
    /// Key of an entry in a JSON object (PubMedQA's PMID).
    Key(String),
}

/// Formats as the part after the file name: `: record 17 (id 17)`, `:12`,
/// `:12: id abc`, `: entry "21645374"`.
impl fmt::Display for RecordAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordAt::Index { index, id: None } => write!(f, ": record {index}"),
            RecordAt::Index {
                index,
                id: Some(id),
            } => write!(f, ": record {index} (id {id})"),
            RecordAt::Line { line, id: None } => write!(f, ":{line}"),
            RecordAt::Line { line, id: Some(id) } => write!(f, ":{line}: id {id}"),
            RecordAt::Key(key) => write!(f, ": entry {key:?}"),
        }
    }
}

/// Why a file, or one record of it, could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid JSON (or JSON lines) at `line:column`: 1-based line, column
    /// in bytes as serde_json counts it (0 when the file ends at a line start).
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Valid JSON, but not a valid record of the format.
    #[error("{}{at}: {message}", .path.display())]
    Record {
        path: PathBuf,
        at: RecordAt,
        message: String,
    },
    /// The file as a whole is unusable: empty, unknown format, wrong container.
    #[error("{}: {message}", .path.display())]
    File { path: PathBuf, message: String },
}

/// How tolerant loading is. The default skips nothing.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Drop malformed records (reporting them in [`Loaded::skipped`]) instead
    /// of failing. Unreadable files and broken JSON arrays still fail.
    pub skip_malformed: bool,
}

/// The result of [`load_problems_with`].
#[derive(Debug)]
pub struct Loaded {
    pub problems: Vec<Problem>,
    /// One error per dropped record; empty unless skipping was asked for.
    pub skipped: Vec<LoadError>,
    /// The format used, detected or given.
    pub format: Format,
}

/// The format of the file at `path`, told from its first record's keys.
pub fn detect_format(path: impl AsRef<Path>) -> Result<Format, LoadError> {
    let path = path.as_ref();
    let text = read_text(path)?;
    let doc = parse(path, &text, None)?;
    detect(path, &doc)
}

/// All problems in the file, format detected; fails on the first bad record.
pub fn load_problems(path: impl AsRef<Path>) -> Result<Vec<Problem>, LoadError> {
    load_problems_with(path, None, &LoadOptions::default()).map(|l| l.problems)
}

/// All problems in the file, read as `format`; fails on the first bad record.
pub fn load_problems_as(path: impl AsRef<Path>, format: Format) -> Result<Vec<Problem>, LoadError> {
    load_problems_with(path, Some(format), &LoadOptions::default()).map(|l| l.problems)
}

/// Loads with an explicit or detected (`None`) format and the given options.
pub fn load_problems_with(
    path: impl AsRef<Path>,
    format: Option<Format>,
    options: &LoadOptions,
) -> Result<Loaded, LoadError> {
    let path = path.as_ref();
    let text = read_text(path)?;
    let mut skipped = Vec::new();
    let doc = parse(path, &text, options.skip_malformed.then_some(&mut skipped))?;
    let format = match format {
        Some(f) => f,
        None => detect(path, &doc)?,
    };
    let file_error = |message: String| LoadError::File {
        path: path.to_path_buf(),
        message,
    };
    match (format, doc.object) {
        (Format::Pubmedqa, false) => {
            return Err(file_error(
                "pubmedqa expects one JSON object keyed by PMID, but this file is a JSON array or JSON lines"
                    .into(),
            ));
        }
        (f, true) if f != Format::Pubmedqa => {
            return Err(file_error(format!(
                "{f} expects a JSON array or JSON lines, but this file is a single JSON object"
            )));
        }
        _ => {}
    }
    let source = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut problems = Vec::with_capacity(doc.records.len());
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for raw in &doc.records {
        let converted =
            to_problem(format, raw, &source).and_then(|p| match first_seen.get(&p.id) {
                Some(&earlier) => Err(format!(
                    "duplicate id {:?}, first used by {}",
                    p.id,
                    doc.describe(earlier)
                )),
                None => {
                    first_seen.insert(p.id.clone(), raw.ordinal);
                    Ok(p)
                }
            });
        match converted {
            Ok(p) => problems.push(p),
            Err(message) => {
                let err = LoadError::Record {
                    path: path.to_path_buf(),
                    at: raw.at(),
                    message,
                };
                if options.skip_malformed {
                    skipped.push(err);
                } else {
                    return Err(err);
                }
            }
        }
    }
    Ok(Loaded {
        problems,
        skipped,
        format,
    })
}

/// Summary counts of a problem set, for `medzero data inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub records: usize,
    /// Gold letter → count; free-text golds count under `(free text)`.
    pub answer_distribution: BTreeMap<String, usize>,
    /// `task` → count.
    pub tasks: BTreeMap<String, usize>,
    /// Number of options → count of problems with that many (0 = free text).
    pub option_counts: BTreeMap<usize, usize>,
}

/// Counts answers, tasks and option counts over `problems`.
pub fn stats(problems: &[Problem]) -> Stats {
    let mut s = Stats {
        records: problems.len(),
        ..Stats::default()
    };
    for p in problems {
        let answer = match &p.gold {
            Gold::Option(letter) => letter.as_str(),
            Gold::Text(_) => "(free text)",
        };
        *s.answer_distribution.entry(answer.to_string()).or_default() += 1;
        *s.tasks.entry(p.task.clone()).or_default() += 1;
        *s.option_counts.entry(p.options.len()).or_default() += 1;
    }
    s
}

// ---------------------------------------------------------------- containers

/// One parsed record: its JSON and where it came from.
struct Raw {
    value: Value,
    /// 0-based count of records before it (including unparsable JSONL lines),
    /// used as the id by formats that have none.
    ordinal: usize,
    pos: Pos,
}

enum Pos {
    Index,
    Line(usize),
    Key(String),
}

impl Raw {
    fn at(&self) -> RecordAt {
        let id = record_id(&self.value);
        match &self.pos {
            Pos::Index => RecordAt::Index {
                index: self.ordinal,
                id,
            },
            Pos::Line(line) => RecordAt::Line { line: *line, id },
            Pos::Key(key) => RecordAt::Key(key.clone()),
        }
    }
}

struct Doc {
    records: Vec<Raw>,
    /// A single JSON object keyed by record id (PubMedQA) rather than records.
    object: bool,
    /// For JSON lines, the line of each ordinal (for "first used by line N").
    lines: Vec<usize>,
}

impl Doc {
    /// Names the record at `ordinal` the way a person finds it in the file.
    fn describe(&self, ordinal: usize) -> String {
        match self.lines.get(ordinal) {
            Some(line) => format!("line {line}"),
            None if self.object => format!("entry {ordinal}"),
            None => format!("record {ordinal}"),
        }
    }
}

/// The best-effort id of a record for messages; `None` if it has no usable one.
fn record_id(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn read_text(path: &Path) -> Result<String, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_col(&e.as_bytes()[..e.utf8_error().valid_up_to()]);
        LoadError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: "not UTF-8 text".into(),
        }
    })?;
    let mut text = text;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    if text.trim().is_empty() {
        return Err(LoadError::File {
            path: path.to_path_buf(),
            message: "file is empty".into(),
        });
    }
    Ok(text)
}

/// 1-based line and byte column just after `prefix`.
fn line_col(prefix: &[u8]) -> (usize, usize) {
    let line = prefix.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = prefix.len()
        - prefix
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    (line, column)
}

/// Parses the container. With `skipped` set, unparsable JSON lines are
/// recorded there instead of failing (a broken array or object still fails).
fn parse(path: &Path, text: &str, skipped: Option<&mut Vec<LoadError>>) -> Result<Doc, LoadError> {
    let body = text.trim_start();
    match body.chars().next() {
        Some('[') => parse_array(path, text),
        Some('{') => {
            let first_line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            match serde_json::from_str::<Value>(first_line) {
                // A one-line PubMedQA object, not JSON lines.
                Ok(Value::Object(m))
                    if text.trim() == first_line.trim() && looks_like_pubmedqa(&m) =>
                {
                    parse_object(path, text)
                }
                Ok(_) => parse_lines(path, text, skipped),
                // The first line is not a whole value: one pretty-printed object.
                Err(e) if e.classify() == Category::Eof => parse_object(path, text),
                Err(_) => parse_lines(path, text, skipped),
            }
        }
        _ => {
            let (line, column) = line_col(&text.as_bytes()[..text.len() - body.len()]);
            Err(LoadError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: "not JSON: expected a JSON array `[`, JSON lines, or a JSON object `{`"
                    .into(),
            })
        }
    }
}

fn looks_like_pubmedqa(m: &Map<String, Value>) -> bool {
    m.values()
        .next()
        .is_some_and(|v| v.get("QUESTION").is_some())
}

/// A JSON-syntax error at serde's position (or on JSONL line `line`),
/// prefixed with `context` (which record).
fn syntax_error(
    path: &Path,
    e: &serde_json::Error,
    context: Option<String>,
    line: Option<usize>,
) -> LoadError {
    let message = if e.classify() == Category::Eof {
        let container = if line.is_some() { "line" } else { "file" };
        format!("{container} ends in the middle of a record (truncated?)")
    } else {
        // serde_json appends " at line L column C", which we print up front.
        let full = e.to_string();
        match full.rfind(" at line ") {
            Some(i) => full[..i].to_string(),
            None => full,
        }
    };
    LoadError::Syntax {
        path: path.to_path_buf(),
        line: line.unwrap_or(e.line()),
        column: e.column(),
        message: match context {
            Some(c) => format!("{c}: {message}"),
            None => message,
        },
    }
}

fn parse_array(path: &Path, text: &str) -> Result<Doc, LoadError> {
    let mut values = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    if let Err(e) = Elements(&mut values).deserialize(&mut de) {
        let n = values.len();
        if e.classify() == Category::Eof && closes_with(text, ']') {
            return Err(LoadError::Syntax {
                path: path.to_path_buf(),
                line: e.line(),
                column: e.column(),
                message: format!(
                    "file ends after {n} records, without the closing `]` (truncated?)"
                ),
            });
        }
        return Err(syntax_error(path, &e, Some(format!("record {n}")), None));
    }
    de.end().map_err(|e| syntax_error(path, &e, None, None))?;
    Ok(Doc {
        records: values
            .into_iter()
            .enumerate()
            .map(|(ordinal, value)| Raw {
                value,
                ordinal,
                pos: Pos::Index,
            })
            .collect(),
        object: false,
        lines: Vec::new(),
    })
}

fn parse_object(path: &Path, text: &str) -> Result<Doc, LoadError> {
    let mut entries = Vec::new();
    let mut pending = None;
    let mut de = serde_json::Deserializer::from_str(text);
    if let Err(e) = (Entries {
        entries: &mut entries,
        pending: &mut pending,
    })
    .deserialize(&mut de)
    {
        let n = entries.len();
        if e.classify() == Category::Eof && closes_with(text, '}') {
            return Err(LoadError::Syntax {
                path: path.to_path_buf(),
                line: e.line(),
                column: e.column(),
                message: format!(
                    "file ends after {n} entries, without the closing `}}` (truncated?)"
                ),
            });
        }
        let context = match pending {
            Some(key) => format!("entry {key:?}"),
            None => format!("after {n} entries"),
        };
        return Err(syntax_error(path, &e, Some(context), None));
    }
    de.end().map_err(|e| syntax_error(path, &e, None, None))?;
    Ok(Doc {
        records: entries
            .into_iter()
            .enumerate()
            .map(|(ordinal, (key, value))| Raw {
                value,
                ordinal,
                pos: Pos::Key(key),
            })
            .collect(),
        object: true,
        lines: Vec::new(),
    })
}

/// Whether truncated `text` stopped between records: it parses once the
/// container is closed. Only called on the error path.
fn closes_with(text: &str, close: char) -> bool {
    let body = text.trim_end();
    let body = body.strip_suffix(',').unwrap_or(body);
    serde_json::from_str::<serde::de::IgnoredAny>(&format!("{body}{close}")).is_ok()
}

fn parse_lines(
    path: &Path,
    text: &str,
    mut skipped: Option<&mut Vec<LoadError>>,
) -> Result<Doc, LoadError> {
    let mut records = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ordinal = lines.len();
        lines.push(i + 1);
        match serde_json::from_str::<Value>(line) {
            Ok(value) => records.push(Raw {
                value,
                ordinal,
                pos: Pos::Line(i + 1),
            }),
            Err(e) => {
                let err = syntax_error(path, &e, None, Some(i + 1));
                match skipped.as_deref_mut() {
                    Some(s) => s.push(err),
                    None => return Err(err),
                }
            }
        }
    }
    Ok(Doc {
        records,
        object: false,
        lines,
    })
}

/// Reads a JSON array element by element into the vector, so that on a
/// syntax error its length says which record was being read.
struct Elements<'a>(&'a mut Vec<Value>);

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of records")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element()? {
            self.0.push(v);
        }
        Ok(())
    }
}

/// Reads a JSON object entry by entry, keeping duplicate keys (a `Map` would
/// silently keep only the last) and the key being read when an error occurs.
struct Entries<'a> {
    entries: &'a mut Vec<(String, Value)>,
    pending: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of records")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            *self.pending = Some(key);
            let value = map.next_value()?;
            if let Some(key) = self.pending.take() {
                self.entries.push((key, value));
            }
        }
        Ok(())
    }
}

fn detect(path: &Path, doc: &Doc) -> Result<Format, LoadError> {
    let file_error = |message: String| LoadError::File {
        path: path.to_path_buf(),
        message,
    };
    let first = doc.records.first().ok_or_else(|| {
        file_error("no records to tell the format from; give the format explicitly".into())
    })?;
    if doc.object {
        return if first.value.get("QUESTION").is_some() {
            Ok(Format::Pubmedqa)
        } else {
            Err(file_error(format!(
                "a single JSON object whose first entry has no QUESTION; the only object format is \
                 PubMedQA's {{PMID: {{\"QUESTION\", \"final_decision\", ...}}}} (known formats: {})",
                format_names()
            )))
        };
    }
    let Value::Object(m) = &first.value else {
        return Err(LoadError::Record {
            path: path.to_path_buf(),
            at: first.at(),
            message: format!("record is {}, not a JSON object", kind(&first.value)),
        });
    };
    let has = |k: &str| m.contains_key(k);
    let format = if has("conversations") {
        if has("eval") {
            Format::Meds3
        } else {
            Format::Sharegpt
        }
    } else if has("instruction") && has("output") {
        Format::Alpaca
    } else if has("opa") {
        Format::Medmcqa
    } else if has("question") && has("answer_idx") {
        Format::MedqaJsonl
    } else if has("question") && has("gold") {
        Format::MedzeroJsonl
    } else {
        let keys = m.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
        return Err(file_error(format!(
            "cannot tell the format from the first record's keys ({keys}); known formats: {}",
            format_names()
        )));
    };
    Ok(format)
}

// ------------------------------------------------------------------- records

type Obj = Map<String, Value>;

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn field<'a>(o: &'a Obj, key: &str, name: &str) -> Result<&'a Value, String> {
    o.get(key).ok_or_else(|| format!("missing {name}"))
}

fn string<'a>(v: &'a Value, name: &str) -> Result<&'a str, String> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(format!("{name} must be a string, not {}", kind(other))),
    }
}

/// A required string field that must not be blank.
fn nonblank<'a>(o: &'a Obj, key: &str, name: &str) -> Result<&'a str, String> {
    let s = string(field(o, key, name)?, name)?;
    if s.trim().is_empty() {
        return Err(format!("{name} is empty"));
    }
    Ok(s)
}

/// An optional string field; `null` counts as absent.
fn opt_string<'a>(o: &'a Obj, key: &str, name: &str) -> Result<Option<&'a str>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => string(v, name).map(Some),
    }
}

fn object<'a>(v: &'a Value, name: &str) -> Result<&'a Obj, String> {
    match v {
        Value::Object(o) => Ok(o),
        other => Err(format!("{name} must be a JSON object, not {}", kind(other))),
    }
}

/// An id given as a string or an integer.
fn id_value(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        other => Err(format!(
            "id must be a non-empty string or an integer, not {other}"
        )),
    }
}

/// The record's `id`, or its position in the file for formats that may lack one.
fn id_or_ordinal(o: &Obj, ordinal: usize) -> Result<String, String> {
    o.get("id")
        .map_or_else(|| Ok(ordinal.to_string()), id_value)
}

/// The remaining fields of `o`, for `Problem::metadata`.
fn rest(o: &Obj, used: &[&str]) -> BTreeMap<String, Value> {
    o.iter()
        .filter(|(k, _)| !used.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn letters(options: &[Choice]) -> String {
    options
        .iter()
        .map(|c| c.letter.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `eval.answer`-style gold: exactly one of the option letters.
fn letter_gold(options: &[Choice], answer: &str, name: &str) -> Result<Gold, String> {
    if options.iter().any(|c| c.letter == answer) {
        Ok(Gold::Option(answer.to_string()))
    } else {
        Err(format!(
            "{name} {answer:?} is not one of the option letters ({})",
            letters(options)
        ))
    }
}

/// Gold from an answer written in a response: free text without options,
/// otherwise the one option it names (see [`verify::resolve_option`]).
fn stated_gold(options: &[Choice], answer: &str) -> Result<Gold, String> {
    if options.is_empty() {
        return Ok(Gold::Text(answer.to_string()));
    }
    verify::resolve_option(options, answer)
        .map(Gold::Option)
        .ok_or_else(|| {
            format!(
                "the stated answer {answer:?} does not name exactly one of the options ({})",
                letters(options)
            )
        })
}

/// The answer a training response states: its first line if that is
/// `Answer: ...` (MedThink), else what [`verify::extract_answer`] finds.
fn stated_answer(response: &str) -> Option<String> {
    let first = response.trim_start().lines().next().unwrap_or_default();
    let labelled = first
        .trim_start_matches(['*', '#', ' '])
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("answer:"));
    verify::extract_answer(if labelled { first } else { response })
}

/// Splits a question with option lines into stem and options.
///
/// The options are the last lines, `A. text`, `B. text`, ... in order; only
/// blank or `"`-only lines may follow them (52 MedQA records of the MedS3
/// release end in a stray `\n"`). Earlier lines are the stem, even if one
/// looks like an option (`E. coli was isolated.`). A question with no option
/// line is all stem; option lines that do not form such a block are an error.
fn split_options(question: &str) -> Result<(String, Vec<Choice>), String> {
    let lines: Vec<&str> = question
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut end = lines.len();
    while end > 0 && lines[end - 1].trim().chars().all(|c| c == '"') {
        end -= 1;
    }
    let mut block_error = None;
    for start in (0..end).filter(|&i| lines[i].starts_with("A. ")) {
        match option_block(&lines[start..end]) {
            Ok(options) => {
                let stem = lines[..start].join("\n").trim().to_string();
                if stem.is_empty() {
                    return Err("the question has options but no text before them".into());
                }
                return Ok((stem, options));
            }
            Err(e) => block_error = Some(e),
        }
    }
    if let Some(e) = block_error {
        return Err(e);
    }
    match lines.iter().find(|l| option_line(l).is_some()) {
        Some(line) => Err(format!(
            "the option lines do not start with `A. `; the first is {line:?}"
        )),
        None => Ok((question.trim().to_string(), Vec::new())),
    }
}

/// Reads `lines` as the options A, B, C, ..., one per line, each with text.
fn option_block(lines: &[&str]) -> Result<Vec<Choice>, String> {
    let mut options = Vec::with_capacity(lines.len());
    for (k, line) in lines.iter().enumerate() {
        let Some((letter, text)) = option_line(line) else {
            return Err(format!(
                "line {line:?} comes after the options but is not an option line `X. text`"
            ));
        };
        if usize::from(letter - b'A') != k {
            return Err(format!(
                "options must be lettered A, B, C, ... in order, but option {} is {}",
                k + 1,
                char::from(letter)
            ));
        }
        if text.trim().is_empty() {
            return Err(format!("option {} has no text", char::from(letter)));
        }
        options.push(Choice {
            letter: char::from(letter).to_string(),
            text: text.trim().to_string(),
        });
    }
    Ok(options)
}

/// `X. text` with X in A-Z: the letter (as a byte) and the text.
fn option_line(line: &str) -> Option<(u8, &str)> {
    match line.as_bytes() {
        [l @ b'A'..=b'Z', b'.', b' ', ..] => Some((*l, &line[3..])),
        _ => None,
    }
}

fn to_problem(format: Format, raw: &Raw, source: &str) -> Result<Problem, String> {
    let o = object(&raw.value, "the record")?;
    match format {
        Format::Meds3 => meds3(o, source),
        Format::MedqaJsonl => medqa(o, raw.ordinal, source),
        Format::Medmcqa => medmcqa(o, source),
        Format::Pubmedqa => match &raw.pos {
            Pos::Key(pmid) => pubmedqa(pmid, o, source),
            _ => Err("PubMedQA entries must be keyed by PMID".into()),
        },
        Format::Sharegpt => sharegpt(o, raw.ordinal, source),
        Format::Alpaca => alpaca(o, raw.ordinal, source),
        Format::MedzeroJsonl => medzero(&raw.value),
    }
}

/// The ShareGPT role names: `human`/`user`, `gpt`/`assistant`, `system`.
fn role(from: &str) -> &str {
    match from {
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        other => other,
    }
}

/// A ShareGPT conversation: optional system turn, the question, optional answer.
struct Turns<'a> {
    system: Option<&'a str>,
    question: &'a str,
    response: Option<&'a str>,
}

fn turns(o: &Obj) -> Result<Turns<'_>, String> {
    let Value::Array(list) = field(o, "conversations", "conversations")? else {
        return Err("conversations must be an array of turns".into());
    };
    let mut roles = Vec::with_capacity(list.len());
    for (i, turn) in list.iter().enumerate() {
        let text = |key| turn.get(key).and_then(Value::as_str);
        let (Some(from), Some(value)) = (text("from"), text("value")) else {
            return Err(format!(
                "conversations[{i}] must be an object with string `from` and `value`, not {turn}"
            ));
        };
        roles.push((from, value));
    }
    let shape: Vec<&str> = roles.iter().map(|(f, _)| role(f)).collect();
    let (system, rest) = match roles.split_first() {
        Some(((f, v), rest)) if role(f) == "system" => (Some(*v), rest),
        _ => (None, &roles[..]),
    };
    let (question, response) = match rest {
        [(q, question)] if role(q) == "user" => (*question, None),
        [(q, question), (a, response)] if role(q) == "user" && role(a) == "assistant" => {
            (*question, Some(*response))
        }
        _ => {
            return Err(format!(
                "conversations must be [system,] human[, gpt], not [{}]",
                shape.join(", ")
            ));
        }
    };
    if question.trim().is_empty() {
        return Err("the human turn is empty".into());
    }
    Ok(Turns {
        system,
        question,
        response,
    })
}

fn meds3(o: &Obj, source: &str) -> Result<Problem, String> {
    let id = id_value(field(o, "id", "id")?)?;
    let turns = turns(o)?;
    let eval = object(field(o, "eval", "eval")?, "eval")?;
    let answer = string(field(eval, "answer", "eval.answer")?, "eval.answer")?.trim();
    let task = opt_string(eval, "type", "eval.type")?.unwrap_or_default();
    let (question, options) = split_options(turns.question)?;
    let gold = if !options.is_empty() {
        letter_gold(&options, answer, "eval.answer")?
    } else if answer.is_empty() {
        return Err("eval.answer is empty".into());
    } else if answer.len() == 1 && answer.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "eval.answer is the option letter {answer:?} but the question has no option lines `X. text`"
        ));
    } else {
        Gold::Text(answer.to_string())
    };
    let mut metadata = rest(o, &["id", "conversations", "eval"]);
    for (k, v) in rest(eval, &["answer", "type"]) {
        if metadata.insert(k.clone(), v).is_some() {
            return Err(format!("field {k:?} is both in the record and in eval"));
        }
    }
    for (key, value) in [("system", turns.system), ("response", turns.response)] {
        if let Some(v) = value {
            metadata.insert(key.into(), Value::String(v.into()));
        }
    }
    Ok(Problem {
        id,
        question,
        options,
        gold,
        task: task.to_string(),
        source: source.to_string(),
        metadata,
    })
}

fn medqa(o: &Obj, ordinal: usize, source: &str) -> Result<Problem, String> {
    let id = id_or_ordinal(o, ordinal)?;
    let question = nonblank(o, "question", "question")?;
    let raw_options = object(field(o, "options", "options")?, "options")?;
    let mut entries: Vec<(&String, &Value)> = raw_options.iter().collect();
    entries.sort_by_key(|(k, _)| *k);
    let mut options = Vec::with_capacity(entries.len());
    for (k, (letter, value)) in entries.into_iter().enumerate() {
        let expected = char::from_u32('A' as u32 + k as u32).unwrap_or('?');
        if letter.as_str() != expected.encode_utf8(&mut [0; 4]) {
            return Err(format!(
                "options must be keyed A, B, C, ... with no gaps, but key {} is {letter:?}",
                k + 1
            ));
        }
        let name = format!("options.{letter}");
        let t = string(value, &name)?.trim();
        if t.is_empty() {
            return Err(format!("{name} is empty"));
        }
        options.push(Choice {
            letter: letter.clone(),
            text: t.to_string(),
        });
    }
    if options.is_empty() {
        return Err("options is empty".into());
    }
    let answer_idx = string(field(o, "answer_idx", "answer_idx")?, "answer_idx")?.trim();
    let gold = letter_gold(&options, answer_idx, "answer_idx")?;
    let answer = opt_string(o, "answer", "answer")?;
    let gold_option = options.iter().find(|c| c.letter == answer_idx);
    if let (Some(answer), Some(Choice { text: expected, .. })) = (answer, gold_option)
        && answer.trim() != expected
    {
        return Err(format!(
            "answer {answer:?} is not the text of option {answer_idx} ({expected:?})"
        ));
    }
    let task = opt_string(o, "meta_info", "meta_info")?.unwrap_or_default();
    Ok(Problem {
        id,
        question: question.trim().to_string(),
        options,
        gold,
        task: task.to_string(),
        source: source.to_string(),
        metadata: rest(
            o,
            &[
                "id",
                "question",
                "options",
                "answer_idx",
                "answer",
                "meta_info",
            ],
        ),
    })
}

fn medmcqa(o: &Obj, source: &str) -> Result<Problem, String> {
    let id = id_value(field(o, "id", "id")?)?;
    let question = nonblank(o, "question", "question")?;
    let mut options = Vec::with_capacity(4);
    for (letter, key) in [("A", "opa"), ("B", "opb"), ("C", "opc"), ("D", "opd")] {
        options.push(Choice {
            letter: letter.into(),
            text: nonblank(o, key, key)?.trim().to_string(),
        });
    }
    // The original release numbers the correct option from 1 (1 = opa);
    // 0-based exports would be silently shifted, so 0 is rejected, not guessed.
    let cop = match o.get("cop") {
        None | Some(Value::Null) => {
            return Err("missing cop (MedMCQA's test split has no answers)".into());
        }
        Some(v) => v,
    };
    let letter = match cop.as_u64() {
        Some(n @ 1..=4) => options[(n - 1) as usize].letter.clone(),
        _ => {
            return Err(format!(
                "cop must be 1-4 (1 = opa, as in the original MedMCQA release), not {cop}; \
                 a 0-based export (such as Hugging Face's) needs 1 added to cop"
            ));
        }
    };
    let task = opt_string(o, "subject_name", "subject_name")?.unwrap_or_default();
    Ok(Problem {
        id,
        question: question.trim().to_string(),
        options,
        gold: Gold::Option(letter),
        task: task.to_string(),
        source: source.to_string(),
        metadata: rest(
            o,
            &[
                "id",
                "question",
                "opa",
                "opb",
                "opc",
                "opd",
                "cop",
                "subject_name",
            ],
        ),
    })
}

/// PubMedQA without its abstract, as MedS3 evaluates it: the question with
/// options yes / no / maybe. The abstract (`CONTEXTS`) stays in metadata.
fn pubmedqa(pmid: &str, o: &Obj, source: &str) -> Result<Problem, String> {
    let question = nonblank(o, "QUESTION", "QUESTION")?;
    let decision = string(
        field(o, "final_decision", "final_decision")?,
        "final_decision",
    )?;
    let letter = match decision {
        "yes" => "A",
        "no" => "B",
        "maybe" => "C",
        other => {
            return Err(format!(
                "final_decision must be yes, no or maybe, not {other:?}"
            ));
        }
    };
    let options = [("A", "yes"), ("B", "no"), ("C", "maybe")]
        .map(|(letter, text)| Choice {
            letter: letter.into(),
            text: text.into(),
        })
        .into();
    Ok(Problem {
        id: pmid.to_string(),
        question: question.trim().to_string(),
        options,
        gold: Gold::Option(letter.into()),
        task: String::new(),
        source: source.to_string(),
        metadata: rest(o, &["QUESTION", "final_decision"]),
    })
}

fn sharegpt(o: &Obj, ordinal: usize, source: &str) -> Result<Problem, String> {
    let id = id_or_ordinal(o, ordinal)?;
    let turns = turns(o)?;
    let response = turns
        .response
        .ok_or("no assistant turn to take the answer from")?;
    let answer = stated_answer(response).ok_or(
        "the assistant turn states no answer (expected a first line `Answer: ...` or `The answer is ...`)",
    )?;
    let (question, options) = split_options(turns.question)?;
    let gold = stated_gold(&options, &answer)?;
    let mut metadata = rest(o, &["id", "conversations"]);
    metadata.insert("response".into(), Value::String(response.into()));
    if let Some(system) = turns.system {
        metadata.insert("system".into(), Value::String(system.into()));
    }
    Ok(Problem {
        id,
        question,
        options,
        gold,
        task: String::new(),
        source: source.to_string(),
        metadata,
    })
}

fn alpaca(o: &Obj, ordinal: usize, source: &str) -> Result<Problem, String> {
    let id = id_or_ordinal(o, ordinal)?;
    let instruction = nonblank(o, "instruction", "instruction")?;
    let input = opt_string(o, "input", "input")?.unwrap_or_default();
    let output = string(field(o, "output", "output")?, "output")?;
    let full = if input.trim().is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n{input}")
    };
    let answer = stated_answer(output).ok_or(
        "output states no answer (expected a first line `Answer: ...` or `The answer is ...`)",
    )?;
    let (question, options) = split_options(&full)?;
    let gold = stated_gold(&options, &answer)?;
    let mut metadata = rest(o, &["id", "instruction", "input", "output"]);
    metadata.insert("response".into(), Value::String(output.into()));
    Ok(Problem {
        id,
        question,
        options,
        gold,
        task: String::new(),
        source: source.to_string(),
        metadata,
    })
}

fn medzero(v: &Value) -> Result<Problem, String> {
    let p = Problem::deserialize(v).map_err(|e| e.to_string())?;
    if p.id.trim().is_empty() {
        return Err("id is empty".into());
    }
    match &p.gold {
        Gold::Option(letter) if p.option(letter).is_none() => Err(format!(
            "gold {letter:?} is not one of the option letters ({})",
            letters(&p.options)
        )),
        _ => Ok(p),
    }
}
