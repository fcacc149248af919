//! A blocking client for OpenAI-compatible chat-completions servers (vLLM,
//! SGLang, OpenAI) that teachers use to ask a large model for explanations,
//! corrections and judgements.
//!
//! Long pipelines run against servers that restart, overload and time out,
//! so the client is built to be robust and cheap:
//!
//! - **Retries.** 429, 5xx, timeouts and connection failures are retried up to
//!   `max_retries` times with exponential backoff and *deterministic* equal
//!   jitter: the wait before retry `r` is drawn from `[d/2, d]`, where
//!   `d = min(backoff_max_ms, backoff_initial_ms · 2^(r-1))`, by a hash of the
//!   request's cache key and `r`. Threads that fail together spread out, yet a
//!   rerun waits exactly as long as the run before it. A `Retry-After` header
//!   in seconds on a 429 or 503 replaces the backoff, capped at
//!   [`RETRY_AFTER_CAP_FACTOR`] · `backoff_max_ms` so a confused server cannot
//!   park an actor for an hour. Other 4xx fail at once: resending the same
//!   request cannot fix it.
//! - **Malformed replies** (not JSON, no `choices`, no content) are errors,
//!   never panics, and are retried once: a torn or garbled body from a proxy
//!   hiccup usually comes back whole, while a server that always answers in
//!   another format would only waste the retry budget.
//! - **Cache.** Answers are stored under `cache_dir` keyed by
//!   (`base_url`, `model`, `messages`, `temperature`, `max_tokens`), never the
//!   API key, and returned without any network request, so reruns and resumes
//!   cost nothing. Sampling at `temperature > 0` therefore returns the first
//!   answer again on a rerun: that is the point. See [`HttpTeacher`] for the
//!   file layout.
//! - **Concurrency.** The client is `Send + Sync`; `max_concurrency` bounds the
//!   requests in flight across all threads sharing it. A thread gives its slot
//!   back while it sleeps between retries.
//!
//! The API key is read once from the environment variable named by
//! `api_key_env` and only ever sent as `Authorization: Bearer`: it is not in
//! any error, Debug output or cache file, and is cut out of error bodies the
//! server echoes back.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A `Retry-After` wait is capped at this many times `backoff_max_ms`.
pub const RETRY_AFTER_CAP_FACTOR: u64 = 4;

/// Replies larger than this are refused as malformed (a chat answer is a few KiB).
const MAX_REPLY_BYTES: u64 = 16 << 20;
/// How much of an error body is read for its excerpt.
const ERROR_BODY_BYTES: u64 = 8 << 10;
/// Characters of a body quoted in an error message.
const EXCERPT_CHARS: usize = 300;
/// Tags the cache key and file format; bump it when either changes so old
/// files read as misses instead of wrong answers.
const CACHE_FORMAT: &str = "medzero-http-teacher-cache/1";

/// One chat message, as the chat-completions API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (sent as given).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Where and how to ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTeacherConfig {
    /// The API root, e.g. `http://127.0.0.1:8000/v1`; requests go to
    /// `{base_url}/chat/completions`. A trailing `/` is ignored.
    pub base_url: String,
    /// The model name the server serves. Empty by default, which `validate`
    /// rejects: a teacher must say which model it asks.
    pub model: String,
    /// Name of the environment variable holding the API key. Unset or empty:
    /// no `Authorization` header (a local vLLM without `--api-key`).
    pub api_key_env: String,
    pub temperature: f64,
    pub max_tokens: u32,
    /// Per attempt, from connecting to the last byte of the reply.
    pub timeout_s: f64,
    /// Retries after the first attempt (0: one attempt only).
    pub max_retries: u32,
    /// Backoff before the first retry; doubles per retry up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Requests in flight at once across all threads sharing the client.
    pub max_concurrency: usize,
    /// Response cache directory (created if missing); `None`: no cache.
    pub cache_dir: Option<PathBuf>,
}

impl Default for HttpTeacherConfig {
    fn default() -> Self {
        HttpTeacherConfig {
            base_url: "http://127.0.0.1:8000/v1".into(),
            model: String::new(),
            api_key_env: "OPENAI_API_KEY".into(),
            temperature: 0.0,
            max_tokens: 1024,
            timeout_s: 120.0,
            max_retries: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            max_concurrency: 8,
            cache_dir: None,
        }
    }
}

impl HttpTeacherConfig {
    pub fn validate(&self) -> Result<(), HttpError> {
        let bad = |msg: String| Err(HttpError::Config(msg));
        let url = self.base_url.trim_end_matches('/');
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        if rest.is_none_or(str::is_empty) {
            return bad(format!(
                "base_url {:?} must start with http:// or https:// and name a host, e.g. http://127.0.0.1:8000/v1",
                self.base_url
            ));
        }
        if self.model.trim().is_empty() {
            return bad(format!(
                "model is empty: set it to the name the server serves (GET {url}/models lists them)"
            ));
        }
        if self.api_key_env.is_empty() || self.api_key_env.contains(['=', '\0']) {
            return bad(format!(
                "api_key_env {:?} is not an environment variable name",
                self.api_key_env
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad(format!(
                "temperature {} must be within [0, 2]",
                self.temperature
            ));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be positive".into());
        }
        // An upper bound keeps the Duration conversion in range.
        if !(self.timeout_s > 0.0 && self.timeout_s <= 86_400.0) {
            return bad(format!(
                "timeout_s {} must be within (0, 86400]",
                self.timeout_s
            ));
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return bad(format!(
                "backoff_initial_ms {} exceeds backoff_max_ms {}",
                self.backoff_initial_ms, self.backoff_max_ms
            ));
        }
        if self.max_concurrency == 0 {
            return bad("max_concurrency must be positive".into());
        }
        if self
            .cache_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return bad("cache_dir is empty: leave it out to disable the cache".into());
        }
        Ok(())
    }
}

/// An answer, and how it was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `choices[0].message.content`.
    pub content: String,
    /// Read from the cache: no request was sent.
    pub cached: bool,
    /// HTTP attempts made (0 when cached).
    pub attempts: u32,
}

/// Counters since the client was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// HTTP requests sent, retries included.
    pub requests_sent: u64,
    /// Calls answered from the cache.
    pub cache_hits: u64,
    /// Attempts after the first of a call.
    pub retries: u64,
    /// Calls that returned an error.
    pub failures: u64,
}

/// Why a call failed. Messages name the URL and say what to do; none holds
/// the API key.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http teacher config: {0}")]
    Config(String),
    #[error(
        "no complete reply from {url} within timeout_s = {timeout_s} ({attempts} attempt(s)); the server may be overloaded: raise timeout_s or lower max_concurrency"
    )]
    Timeout {
        url: String,
        timeout_s: f64,
        attempts: u32,
    },
    #[error(
        "cannot connect to {url} ({detail}; {attempts} attempt(s)): is the server running at {url}?"
    )]
    Unreachable {
        url: String,
        detail: String,
        attempts: u32,
    },
    #[error(
        "connection to {url} broke before the reply was complete ({detail}; {attempts} attempt(s)); the server may have crashed or restarted"
    )]
    Transport {
        url: String,
        detail: String,
        attempts: u32,
    },
    #[error(
        "{url} answered HTTP {code}: the API key was refused; {}",
        auth_hint(api_key_env, *key_set)
    )]
    Unauthorized {
        url: String,
        code: u16,
        api_key_env: String,
        key_set: bool,
        body: String,
    },
    #[error(
        "{url} answered HTTP {code} ({attempts} attempt(s)){}: {body}",
        status_hint(*code)
    )]
    Status {
        url: String,
        code: u16,
        body: String,
        attempts: u32,
    },
    #[error("malformed reply from {url}: {why} ({attempts} attempt(s)); body: {body}")]
    Malformed {
        url: String,
        why: String,
        body: String,
        attempts: u32,
    },
    #[error("cannot send a request to {url}: {detail}")]
    Request { url: String, detail: String },
    #[error("response cache {}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
}

fn auth_hint(env: &str, key_set: bool) -> String {
    if key_set {
        format!("check that environment variable {env} holds a key this server accepts")
    } else {
        format!("environment variable {env} is not set: export it with the server's API key")
    }
}

fn status_hint(code: u16) -> &'static str {
    match code {
        300..=399 => "; the server redirects: point base_url at the final address",
        400 => "; the server rejected the request: check model, max_tokens and the messages",
        404 => "; check that base_url ends in /v1 and that model is served there",
        429 => "; rate limited: lower max_concurrency or raise max_retries",
        500..=599 => "; the server failed: check its logs",
        _ => "",
    }
}

/// The API key, kept out of Debug output.
struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A counting semaphore bounding the requests in flight.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn acquire(&self) -> Slot<'_> {
        // The count stays consistent even if a holder panicked, so poison is ignored.
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self
                .freed
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}

#[derive(Default)]
struct Counters {
    requests_sent: AtomicU64,
    cache_hits: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
}

/// Why one attempt failed, before the retry policy decides what it becomes.
enum Fault {
    Timeout,
    Unreachable(String),
    Transport(String),
    Status {
        code: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    Malformed {
        why: String,
        body: String,
    },
    Request(String),
}

/// Serialised request body; borrows so nothing is copied.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [Message],
    temperature: f64,
    max_tokens: u32,
}

/// One cache file: the request in full (so a hash collision reads as a miss,
/// and the cache can be audited) and the answer.
#[derive(Serialize, Deserialize)]
struct CacheEntry {
    format: String,
    key: String,
    base_url: String,
    model: String,
    temperature: f64,
    max_tokens: u32,
    messages: Vec<Message>,
    content: String,
}

/// The client. Share it between threads by reference or `Arc`.
///
/// Cache layout: `{cache_dir}/{key[0..2]}/{key}.json`, where `key` is 32 hex
/// digits: two FNV-1a 64 hashes (the standard offset basis, then a second
/// one) of a length-prefixed encoding of the format tag, `base_url` (without
/// a trailing `/`), `model`, each message's role and content,
/// `temperature`'s IEEE-754 bits and `max_tokens`. The file is JSON holding
/// the request and `content`; one that does not parse or whose request
/// differs is a miss and is overwritten by the next answer. Files are written
/// to `.{key}.{pid}.{n}.tmp` in the same directory, synced, then renamed.
pub struct HttpTeacher {
    cfg: HttpTeacherConfig,
    base_url: String,
    url: String,
    api_key: Option<ApiKey>,
    agent: ureq::Agent,
    slots: Slots,
    counters: Counters,
}

impl fmt::Debug for HttpTeacher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTeacher")
            .field("url", &self.url)
            .field("model", &self.cfg.model)
            .field("api_key", &self.api_key)
            .field("cache_dir", &self.cfg.cache_dir)
            .finish_non_exhaustive()
    }
}

impl HttpTeacher {
    /// Validates `cfg`, reads the API key from the environment, and creates
    /// the cache directory and writes a probe file in it, so an unwritable
    /// cache fails here rather than after the first paid answer.
    pub fn new(cfg: HttpTeacherConfig) -> Result<Self, HttpError> {
        cfg.validate()?;
        let base_url = cfg.base_url.trim_end_matches('/').to_string();
        let url = format!("{base_url}/chat/completions");
        let api_key = match std::env::var(&cfg.api_key_env) {
            Ok(key) if !key.trim().is_empty() => {
                // Keys pasted from files often end in a newline.
                let key = key.trim().to_string();
                if !key.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(HttpError::Config(format!(
                        "environment variable {} holds characters an HTTP header cannot carry",
                        cfg.api_key_env
                    )));
                }
                Some(ApiKey(key))
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(HttpError::Config(format!(
                    "environment variable {} is not valid UTF-8",
                    cfg.api_key_env
                )));
            }
        };
        if let Some(dir) = &cfg.cache_dir {
            fs::create_dir_all(dir).map_err(|source| HttpError::Io {
                path: dir.clone(),
                action: "create the directory",
                source,
            })?;
            static PROBES: AtomicU64 = AtomicU64::new(0);
            let n = PROBES.fetch_add(1, Ordering::Relaxed);
            let probe = dir.join(format!(".write-probe.{}.{n}", std::process::id()));
            File::create(&probe)
                .and_then(|_| fs::remove_file(&probe))
                .map_err(|source| HttpError::Io {
                    path: dir.clone(),
                    action: "write in the directory",
                    source,
                })?;
        }
        let timeout = Duration::try_from_secs_f64(cfg.timeout_s)
            .map_err(|e| HttpError::Config(format!("timeout_s {}: {e}", cfg.timeout_s)))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Statuses are the retry policy's input, not errors.
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            // A POST is not replayed across redirects; report them instead.
            .max_redirects(0)
            .user_agent(concat!("medzero/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(HttpTeacher {
            slots: Slots {
                free: Mutex::new(cfg.max_concurrency),
                freed: Condvar::new(),
            },
            cfg,
            base_url,
            url,
            api_key,
            agent,
            counters: Counters::default(),
        })
    }

    pub fn config(&self) -> &HttpTeacherConfig {
        &self.cfg
    }

    pub fn stats(&self) -> HttpStats {
        let c = &self.counters;
        HttpStats {
            requests_sent: c.requests_sent.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }

    /// Asks the model; answers from the cache when it can.
    ///
    /// A failure to store a fresh answer in the cache is an error: `new`
    /// found the directory writable, so it means a full disk or the like,
    /// and carrying on would silently make every resume pay again.
    pub fn chat(&self, messages: &[Message]) -> Result<Reply, HttpError> {
        self.chat_accepting(messages, &|_| true)
    }

    /// [`chat`](Self::chat), caching only replies `valid` accepts (the
    /// caller's own parse): a reply in the wrong form is returned but never
    /// stored, and a stored one `valid` refuses counts as a miss, so a rerun
    /// against a fixed server asks again instead of failing again.
    pub fn chat_accepting(
        &self,
        messages: &[Message],
        valid: &dyn Fn(&str) -> bool,
    ) -> Result<Reply, HttpError> {
        let key = self.cache_key(messages);
        if let Some(content) = self.cache_read(&key, messages).filter(|c| valid(c)) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Reply {
                content,
                cached: true,
                attempts: 0,
            });
        }
        let result = self.fetch(messages, &key).and_then(|(content, attempts)| {
            if valid(&content) {
                self.cache_write(&key, messages, &content)?;
            }
            Ok(Reply {
                content,
                cached: false,
                attempts,
            })
        });
        if result.is_err() {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Attempts until an answer, a fault that must not be retried, or the
    /// retry budget is spent. Returns the content and the attempts made.
    fn fetch(&self, messages: &[Message], key: &CacheKey) -> Result<(String, u32), HttpError> {
        let body = serde_json::to_vec(&ChatRequest {
            model: &self.cfg.model,
            messages,
            temperature: self.cfg.temperature,
            max_tokens: self.cfg.max_tokens,
        })
        .map_err(|e| HttpError::Request {
            url: self.url.clone(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        let max_attempts = self.cfg.max_retries.saturating_add(1);
        let mut malformed_retried = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = {
                let _slot = self.slots.acquire();
                self.counters.requests_sent.fetch_add(1, Ordering::Relaxed);
                self.attempt(&body)
            };
            let fault = match outcome {
                Ok(content) => return Ok((content, attempt)),
                Err(fault) => fault,
            };
            let retryable = match &fault {
                Fault::Timeout | Fault::Unreachable(_) | Fault::Transport(_) => true,
                Fault::Status { code, .. } => *code == 429 || (500..600).contains(code),
                // Only the first malformed reply of a call is retried.
                Fault::Malformed { .. } => !std::mem::replace(&mut malformed_retried, true),
                Fault::Request(_) => false,
            };
            if !retryable || attempt >= max_attempts {
                return Err(self.error(fault, attempt));
            }
            let wait = match &fault {
                Fault::Status {
                    code: 429 | 503,
                    retry_after: Some(after),
                    ..
                } => (*after).min(Duration::from_millis(
                    self.cfg
                        .backoff_max_ms
                        .saturating_mul(RETRY_AFTER_CAP_FACTOR),
                )),
                _ => self.backoff(attempt, key.lo),
            };
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(wait);
        }
    }

    /// Equal jitter: uniform in `[d/2, d]` for the capped exponential `d`,
    /// drawn from the request's key so it is reproducible.
    fn backoff(&self, retry: u32, seed: u64) -> Duration {
        let doubling = 1u64
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u64::MAX);
        let d = self
            .cfg
            .backoff_initial_ms
            .saturating_mul(doubling)
            .min(self.cfg.backoff_max_ms);
        let half = d / 2;
        let jitter = splitmix64(seed ^ u64::from(retry)) % (d - half + 1);
        Duration::from_millis(half + jitter)
    }

    fn attempt(&self, body: &[u8]) -> Result<String, Fault> {
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(ApiKey(key)) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request.send(body).map_err(classify)?;
        let code = response.status().as_u16();
        if !(200..300).contains(&code) {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let mut buf = Vec::new();
            // Only an excerpt is reported, and the status alone decides what
            // happens next, so a body that cannot be read is left empty.
            let _ = response
                .body_mut()
                .as_reader()
                .take(ERROR_BODY_BYTES)
                .read_to_end(&mut buf);
            return Err(Fault::Status {
                code,
                body: self.excerpt(&buf),
                retry_after,
            });
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(limit) => Fault::Malformed {
                    why: format!("reply longer than {limit} bytes"),
                    body: String::new(),
                },
                e => classify(e),
            })?;
        parse_content(&bytes).map_err(|why| Fault::Malformed {
            why,
            body: self.excerpt(&bytes),
        })
    }

    fn error(&self, fault: Fault, attempts: u32) -> HttpError {
        let url = self.url.clone();
        match fault {
            Fault::Timeout => HttpError::Timeout {
                url,
                timeout_s: self.cfg.timeout_s,
                attempts,
            },
            Fault::Unreachable(detail) => HttpError::Unreachable {
                url,
                detail,
                attempts,
            },
            Fault::Transport(detail) => HttpError::Transport {
                url,
                detail,
                attempts,
            },
            Fault::Status {
                code: code @ (401 | 403),
                body,
                ..
            } => HttpError::Unauthorized {
                url,
                code,
                api_key_env: self.cfg.api_key_env.clone(),
                key_set: self.api_key.is_some(),
                body,
            },
            Fault::Status { code, body, .. } => HttpError::Status {
                url,
                code,
                body,
                attempts,
            },
            Fault::Malformed { why, body } => HttpError::Malformed {
                url,
                why,
                body,
                attempts,
            },
            Fault::Request(detail) => HttpError::Request { url, detail },
        }
    }

    /// The start of a body, readable, with the API key cut out in case the
    /// server echoes request headers. The key is replaced before truncating,
    /// so a cut cannot leave part of it behind.
    fn excerpt(&self, bytes: &[u8]) -> String {
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        if let Some(ApiKey(key)) = &self.api_key {
            text = text.replace(key.as_str(), "<redacted>");
        }
        match text.char_indices().nth(EXCERPT_CHARS) {
            Some((at, _)) => format!("{}…", &text[..at]),
            None => text,
        }
    }

    fn cache_key(&self, messages: &[Message]) -> CacheKey {
        let mut bytes = Vec::new();
        let mut field = |b: &[u8]| {
            bytes.extend_from_slice(&(b.len() as u64).to_le_bytes());
            bytes.extend_from_slice(b);
        };
        field(CACHE_FORMAT.as_bytes());
        field(self.base_url.as_bytes());
        field(self.cfg.model.as_bytes());
        field(&(messages.len() as u64).to_le_bytes());
        for m in messages {
            field(m.role.as_bytes());
            field(m.content.as_bytes());
        }
        field(&self.cfg.temperature.to_bits().to_le_bytes());
        field(&self.cfg.max_tokens.to_le_bytes());
        CacheKey {
            hi: crate::infra::fnv1a64(crate::infra::FNV_OFFSET, &bytes),
            lo: crate::infra::fnv1a64(FNV_OFFSET_2, &bytes),
        }
    }

    fn cache_path(&self, key: &CacheKey) -> Option<PathBuf> {
        let hex = key.hex();
        let dir = self.cfg.cache_dir.as_ref()?;
        Some(dir.join(&hex[..2]).join(format!("{hex}.json")))
    }

    /// Any failure to read or match is a miss: the cache only saves requests.
    fn cache_read(&self, key: &CacheKey, messages: &[Message]) -> Option<String> {
        let bytes = fs::read(self.cache_path(key)?).ok()?;
        let entry: CacheEntry = serde_json::from_slice(&bytes).ok()?;
        let same = entry.format == CACHE_FORMAT
            && entry.key == key.hex()
            && entry.base_url == self.base_url
            && entry.model == self.cfg.model
            && entry.temperature.to_bits() == self.cfg.temperature.to_bits()
            && entry.max_tokens == self.cfg.max_tokens
            && entry.messages == messages;
        same.then_some(entry.content)
    }

    fn cache_write(
        &self,
        key: &CacheKey,
        messages: &[Message],
        content: &str,
    ) -> Result<(), HttpError> {
        let Some(path) = self.cache_path(key) else {
            return Ok(());
        };
        let entry = CacheEntry {
            format: CACHE_FORMAT.into(),
            key: key.hex(),
            base_url: self.base_url.clone(),
            model: self.cfg.model.clone(),
            temperature: self.cfg.temperature,
            max_tokens: self.cfg.max_tokens,
            messages: messages.to_vec(),
            content: content.into(),
        };
        let json = serde_json::to_vec(&entry).map_err(|e| HttpError::Io {
            path: path.clone(),
            action: "encode the entry",
            source: io::Error::other(e),
        })?;
        write_atomic(&path, &json)
    }
}

/// Maps a transport error to a fault; only network trouble is retryable.
fn classify(e: ureq::Error) -> Fault {
    match e {
        ureq::Error::Timeout(_) => Fault::Timeout,
        // Kinds that mean an open connection broke; the rest (refused,
        // unreachable, failed name lookups) mean none was made.
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Fault::Timeout,
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => Fault::Transport(io.to_string()),
            _ => Fault::Unreachable(io.to_string()),
        },
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => {
            Fault::Unreachable(e.to_string())
        }
        ureq::Error::Protocol(_) | ureq::Error::BodyStalled => Fault::Transport(e.to_string()),
        e => Fault::Request(e.to_string()),
    }
}

/// Delay-seconds only (integer or decimal); an HTTP-date falls back to the backoff.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// `choices[0].message.content`, or why it is missing.
fn parse_content(bytes: &[u8]) -> Result<String, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    if let Some(err) = v.get("error") {
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(format!("the server returned an error object: {msg}"));
    }
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or("no `choices` array")?
        .first()
        .ok_or("`choices` is empty")?;
    match choice.get("message").and_then(|m| m.get("content")) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => {
            let finish = choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .unwrap_or("none");
            Err(format!(
                "`choices[0].message.content` is missing or not a string (finish_reason: {finish}; if `length`, raise max_tokens)"
            ))
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HttpError> {
    medzero_envs::atomic::write(path, bytes).map_err(|source| HttpError::Io {
        path: path.to_path_buf(),
        action: "write",
        source,
    })
}

struct CacheKey {
    hi: u64,
    lo: u64,
}

impl CacheKey {
    fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.hi, self.lo)
    }
}

/// The low half of FNV-1a 128's offset basis: a second, independent start.
const FNV_OFFSET_2: u64 = 0x6295_c58d_62b8_2175;

/// Mixes the jitter seed so neighbouring retries get unrelated fractions.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn teacher(cfg: HttpTeacherConfig) -> HttpTeacher {
        HttpTeacher::new(HttpTeacherConfig {
            model: "m".into(),
            api_key_env: "MEDZERO_HTTP_TEACHER_UNIT_UNSET".into(),
            ..cfg
        })
        .expect("valid config")
    }

    #[test]
    fn cache_key_is_stable() {
        // Pinned: a change here orphans every cache on disk, so bump
        // CACHE_FORMAT instead of editing this value.
        let t = teacher(HttpTeacherConfig::default());
        let key = t
            .cache_key(&[Message::system("s"), Message::user("u")])
            .hex();
        assert_eq!(key, "9af858010d45eabdc02b40afd68cb5ed");
    }

    #[test]
    fn cache_key_covers_every_field_and_ignores_trailing_slash() {
        let base = HttpTeacherConfig::default();
        let msgs = [Message::user("u")];
        let key = |cfg: HttpTeacherConfig, m: &[Message]| teacher(cfg).cache_key(m).hex();
        let k0 = key(base.clone(), &msgs);
        let slash = HttpTeacherConfig {
            base_url: format!("{}/", base.base_url),
            ..base.clone()
        };
        assert_eq!(key(slash, &msgs), k0);
        let variants = [
            HttpTeacherConfig {
                base_url: "http://other:1/v1".into(),
                ..base.clone()
            },
            HttpTeacherConfig {
                temperature: 0.5,
                ..base.clone()
            },
            HttpTeacherConfig {
                max_tokens: 7,
                ..base.clone()
            },
        ];
        for cfg in variants {
            assert_ne!(key(cfg, &msgs), k0);
        }
        assert_ne!(key(base.clone(), &[Message::system("u")]), k0);
        // Length prefixes keep field boundaries apart.
        assert_ne!(
            key(base.clone(), &[Message::user("ab"), Message::user("c")]),
            key(base, &[Message::user("a"), Message::user("bc")])
        );
    }

    #[test]
    fn backoff_doubles_within_equal_jitter_bounds_and_is_deterministic() {
        let t = teacher(HttpTeacherConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            ..Default::default()
        });
        for (retry, d) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (70, 1000),
        ] {
            for seed in 0..50 {
                let w = t.backoff(retry, seed).as_millis() as u64;
                assert!((d / 2..=d).contains(&w), "retry {retry}: {w} ms");
                assert_eq!(t.backoff(retry, seed), Duration::from_millis(w));
            }
        }
    }

    #[test]
    fn retry_after_takes_seconds_only() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn validate_rejects_what_cannot_work() {
        let ok = HttpTeacherConfig {
            model: "m".into(),
            ..Default::default()
        };
        ok.validate().expect("valid");
        let bad = [
            HttpTeacherConfig::default(),
            HttpTeacherConfig {
                base_url: "127.0.0.1:8000/v1".into(),
                ..ok.clone()
            },
            HttpTeacherConfig {
                temperature: f64::NAN,
                ..ok.clone()
            },
            HttpTeacherConfig {
                timeout_s: 0.0,
                ..ok.clone()
            },
            HttpTeacherConfig {
                backoff_initial_ms: 10,
                backoff_max_ms: 5,
                ..ok.clone()
            },
            HttpTeacherConfig {
                max_concurrency: 0,
                ..ok.clone()
            },
            HttpTeacherConfig {
                api_key_env: String::new(),
                ..ok
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let err = serde_json::from_str::<HttpTeacherConfig>(r#"{"model":"m","api_key":"x"}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("api_key"), "{err}");
    }

    #[test]
    fn excerpt_redacts_the_key_even_when_cut() {
        let mut t = teacher(HttpTeacherConfig::default());
        let key = "sk-abcdefghijklmnop";
        t.api_key = Some(ApiKey(key.into()));
        let whole = t.excerpt(format!("echo: Bearer {key} end").as_bytes());
        assert!(
            !whole.contains(key) && whole.contains("<redacted>"),
            "{whole}"
        );
        let pad = "x".repeat(EXCERPT_CHARS - 8);
        let cut = t.excerpt(format!("{pad}{key}").as_bytes());
        assert!(!cut.contains("sk-abcde"), "{cut}");
    }

    #[test]
    fn parse_content_explains_what_is_missing() {
        let ok = br#"{"choices":[{"message":{"role":"assistant","content":"hi"}}]}"#;
        assert_eq!(parse_content(ok).as_deref(), Ok("hi"));
        for (body, why) in [
            (&b"<html>"[..], "not JSON"),
            (b"{}", "no `choices`"),
            (br#"{"choices":[]}"#, "empty"),
            (
                br#"{"choices":[{"message":{"content":null},"finish_reason":"length"}]}"#,
                "length",
            ),
            (br#"{"error":{"message":"boom"}}"#, "boom"),
        ] {
            let err = parse_content(body).expect_err("malformed");
            assert!(err.contains(why), "{err}");
        }
    }
}
