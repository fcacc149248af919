//! The HTTP teacher client against a real loopback server with scripted
//! faults: a hand-written HTTP/1.1 responder on 127.0.0.1 that answers each
//! request as a per-test script says (delay, status, headers, body, or hang
//! up), and records what it saw.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use medzero::teacher::openai::{HttpError, HttpTeacher, HttpTeacherConfig, Message};
use serde_json::{Value, json};

// ---------------------------------------------------------------- server

/// What the server does with one request.
#[derive(Clone)]
struct Act {
    delay: Duration,
    /// `None`: close the connection without answering.
    response: Option<Response>,
}

#[derive(Clone)]
struct Response {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Act {
    fn status(code: u16, body: impl Into<String>) -> Act {
        Act {
            delay: Duration::ZERO,
            response: Some(Response {
                code,
                headers: Vec::new(),
                body: body.into(),
            }),
        }
    }

    fn answer(content: &str) -> Act {
        let body = json!({
            "id": "cmpl-1",
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop"
            }]
        });
        Act::status(200, body.to_string())
    }

    fn hang_up() -> Act {
        Act {
            delay: Duration::ZERO,
            response: None,
        }
    }

    fn after(mut self, delay: Duration) -> Act {
        self.delay = delay;
        self
    }

    fn header(mut self, name: &str, value: &str) -> Act {
        if let Some(response) = &mut self.response {
            response.headers.push((name.into(), value.into()));
        }
        self
    }
}

/// The answer every echo server gives: ties a reply to its request.
fn echo_of(body: &Value) -> String {
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("?");
    format!("echo: {last}")
}

fn echo(_: usize, body: &Value) -> Act {
    Act::answer(&echo_of(body))
}

/// Arguments: the request's 0-based arrival index at this server, its JSON body.
type Script = Arc<dyn Fn(usize, &Value) -> Act + Send + Sync>;

struct Seen {
    at: Instant,
    authorization: Option<String>,
    body: Value,
}

#[derive(Default)]
struct Record {
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

struct Server {
    addr: SocketAddr,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start(script: impl Fn(usize, &Value) -> Act + Send + Sync + 'static) -> Server {
        Self::start_on("127.0.0.1:0".parse().unwrap(), Arc::new(script))
    }

    fn start_on(addr: SocketAddr, script: Script) -> Server {
        // std sets SO_REUSEADDR on Unix, so a restart can take the same port back.
        let listener = TcpListener::bind(addr).expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Record::default());
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (record, stop) = (record.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break; // drops the listener: connections are refused from now on
                    }
                    let Ok(stream) = stream else { continue };
                    let (record, script) = (record.clone(), script.clone());
                    thread::spawn(move || serve(stream, &record, &*script));
                }
            })
        };
        Server {
            addr,
            record,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn requests(&self) -> usize {
        self.record.seen.lock().unwrap().len()
    }

    fn max_in_flight(&self) -> usize {
        self.record.max_in_flight.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes the listening socket.
    fn kill(&mut self) {
        if let Some(accept) = self.accept.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the blocking accept so it sees the flag.
            let _ = TcpStream::connect(self.addr);
            accept.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(
    stream: TcpStream,
    record: &Record,
    script: &(dyn Fn(usize, &Value) -> Act + Send + Sync),
) {
    let now = record.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    record.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let mut in_flight = Some(&record.in_flight);
    let mut leave = || {
        if let Some(c) = in_flight.take() {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let Some((authorization, body)) = read_request(&stream) else {
        leave(); // the wake-up connection of `kill`, or a client that gave up
        return;
    };
    let index = {
        let mut seen = record.seen.lock().unwrap();
        seen.push(Seen {
            at: Instant::now(),
            authorization,
            body: body.clone(),
        });
        seen.len() - 1
    };
    let act = script(index, &body);
    thread::sleep(act.delay);
    // Leaves before writing: the client holds its concurrency slot until it
    // has read the reply, so every counted interval nests inside a slot.
    leave();
    let Some(Response {
        code,
        headers,
        body,
    }) = act.response
    else {
        return; // dropping the stream hangs up
    };
    let mut out = format!(
        "HTTP/1.1 {code} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    let mut stream = stream;
    // The client may have timed out and gone; that is part of the script.
    let _ = stream.write_all(out.as_bytes());
}

/// Reads one POST with a Content-Length body: (Authorization, JSON body).
fn read_request(stream: &TcpStream) -> Option<(Option<String>, Value)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    if !line.starts_with("POST /v1/chat/completions ") {
        return None;
    }
    let (mut length, mut authorization) = (0, None);
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((authorization, serde_json::from_slice(&body).ok()?))
}

// ---------------------------------------------------------------- helpers

const KEYS: usize = 4;

/// Sets every test's key variable once, before any test reads the
/// environment: setting variables while other threads read them is unsound.
fn key_var(n: usize) -> (String, String) {
    static SET: OnceLock<()> = OnceLock::new();
    let var = |i: usize| {
        (
            format!("MEDZERO_TEST_KEY_{i}"),
            format!("sk-medzero-secret-{i}-7f3a9c"),
        )
    };
    SET.get_or_init(|| {
        for i in 0..KEYS {
            let (name, value) = var(i);
            // SAFETY: runs once, inside OnceLock, before any thread of this
            // binary reads these variables (every test calls this first).
            unsafe { std::env::set_var(name, value) };
        }
    });
    assert!(n < KEYS);
    var(n)
}

fn config(url: &str) -> HttpTeacherConfig {
    HttpTeacherConfig {
        base_url: url.into(),
        model: "teacher-72b".into(),
        api_key_env: "MEDZERO_TEST_KEY_UNSET".into(),
        temperature: 0.0,
        max_tokens: 64,
        timeout_s: 2.0,
        max_retries: 3,
        backoff_initial_ms: 10,
        backoff_max_ms: 50,
        max_concurrency: 4,
        cache_dir: None,
    }
}

fn ask(text: &str) -> Vec<Message> {
    vec![
        Message::system("You are a clinical teacher."),
        Message::user(text),
    ]
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

// ---------------------------------------------------------------- tests

#[test]
fn client_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<HttpTeacher>();
}

#[test]
fn success_sends_the_request_and_key_and_caches_without_the_key() {
    let (var, key) = key_var(0);
    let server = Server::start(echo);
    let cache = tempfile::tempdir().unwrap();
    let teacher = HttpTeacher::new(HttpTeacherConfig {
        api_key_env: var.clone(),
        temperature: 0.3,
        cache_dir: Some(cache.path().into()),
        ..config(&server.url())
    })
    .unwrap();

    let reply = teacher.chat(&ask("why is the sky blue")).unwrap();
    assert_eq!(reply.content, "echo: why is the sky blue");
    assert!(!reply.cached);
    assert_eq!(reply.attempts, 1);
    {
        let seen = server.record.seen.lock().unwrap();
        assert_eq!(
            seen[0].authorization.as_deref(),
            Some(format!("Bearer {key}").as_str())
        );
        assert_eq!(
            seen[0].body,
            json!({
                "model": "teacher-72b",
                "messages": [
                    {"role": "system", "content": "You are a clinical teacher."},
                    {"role": "user", "content": "why is the sky blue"}
                ],
                "temperature": 0.3,
                "max_tokens": 64
            })
        );
    }

    let again = teacher.chat(&ask("why is the sky blue")).unwrap();
    assert_eq!(
        (again.content.as_str(), again.cached, again.attempts),
        (reply.content.as_str(), true, 0)
    );
    assert_eq!(
        server.requests(),
        1,
        "a cached answer must not touch the network"
    );
    let stats = teacher.stats();
    assert_eq!(
        (
            stats.requests_sent,
            stats.cache_hits,
            stats.retries,
            stats.failures
        ),
        (1, 1, 0, 0)
    );

    let cached = files(cache.path());
    assert_eq!(cached.len(), 1, "{cached:?}");
    for path in &cached {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("why is the sky blue"));
        assert!(
            !text.contains(&key),
            "the API key leaked into {}",
            path.display()
        );
    }
    assert!(!format!("{teacher:?}").contains(&key));
    assert!(!format!("{:?}", teacher.config()).contains(&key));
}

#[test]
fn key_never_appears_in_errors_even_when_the_server_echoes_it() {
    let (var, key) = key_var(1);
    // A hostile proxy that quotes the request's Authorization header back.
    let server = Server::start(|_, _| {
        Act::status(
            500,
            format!(
                "internal error; request had Authorization: Bearer {}",
                key_var(1).1
            ),
        )
    });
    let teacher = HttpTeacher::new(HttpTeacherConfig {
        api_key_env: var,
        max_retries: 1,
        ..config(&server.url())
    })
    .unwrap();
    let err = teacher.chat(&ask("q")).unwrap_err();
    assert!(
        matches!(
            err,
            HttpError::Status {
                code: 500,
                attempts: 2,
                ..
            }
        ),
        "{err:?}"
    );
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(&key), "key leaked: {text}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(text.contains(&server.url()), "{text}");
    }
}

#[test]
fn slow_server_times_out_after_retries() {
    let server = Server::start(|_, b| echo(0, b).after(Duration::from_millis(700)));
    let teacher = HttpTeacher::new(HttpTeacherConfig {
        timeout_s: 0.2,
        max_retries: 1,
        ..config(&server.url())
    })
    .unwrap();
    let t0 = Instant::now();
    let err = teacher.chat(&ask("q")).unwrap_err();
    assert!(
        matches!(err, HttpError::Timeout { attempts: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&server.url()), "{err}");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(server.requests(), 2);
    assert_eq!(teacher.stats().failures, 1);
}

#[test]
fn slow_then_fast_server_succeeds_on_retry() {
    let server = Server::start(|i, b| {
        let delay = if i == 0 { 700 } else { 0 };
        echo(i, b).after(Duration::from_millis(delay))
    });
    let teacher = HttpTeacher::new(HttpTeacherConfig {
        timeout_s: 0.2,
        ..config(&server.url())
    })
    .unwrap();
    let reply = teacher.chat(&ask("q")).unwrap();
    assert_eq!((reply.content.as_str(), reply.attempts), ("echo: q", 2));
}

#[test]
fn server_error_then_success_takes_two_attempts() {
    let server = Server::start(|i, b| {
        if i == 0 {
            Act::status(500, "boom")
        } else {
            echo(i, b)
        }
    });
    let teacher = HttpTeacher::new(config(&server.url())).unwrap();
    let reply = teacher.chat(&ask("q")).unwrap();
    assert_eq!(
        (reply.content.as_str(), reply.attempts, reply.cached),
        ("echo: q", 2, false)
    );
    let stats = teacher.stats();
    assert_eq!(
        (stats.requests_sent, stats.retries, stats.failures),
        (2, 1, 0)
    );
}

#[test]
fn too_many_requests_honours_retry_after() {
    let server = Server::start(|i, b| {
        if i == 0 {
            Act::status(429, r#"{"error":{"message":"slow down"}}"#).header("Retry-After", "1")
        } else {
            echo(i, b)
        }
    });
    // Backoff alone would wait ~10 ms; the cap (4 x 500 ms) leaves room for 1 s.
    let teacher = HttpTeacher::new(HttpTeacherConfig {
        backoff_max_ms: 500,
        ..config(&server.url())
    })
    .unwrap();
    let reply = teacher.chat(&ask("q")).unwrap();
    assert_eq!(reply.attempts, 2);
    let seen = server.record.seen.lock().unwrap();
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    assert!(gap < Duration::from_millis(1800), "retried after {gap:?}");
}

#[test]
fn retry_after_is_capped() {
    let server = Server::start(|i, b| {
        if i == 0 {
            Act::status(503, "maintenance").header("Retry-After", "3600")
        } else {
            echo(i, b)
        }
    });
    // Cap: 4 x backoff_max_ms = 200 ms instead of an hour.
    let teacher = HttpTeacher::new(config(&server.url())).unwrap();
    let t0 = Instant::now();
    assert_eq!(teacher.chat(&ask("q")).unwrap().attempts, 2);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn malformed_replies_are_errors_retried_once() {
    let bodies = [
        "<html>502 from a proxy</html>",
        r#"{"choices": []}"#,
        r#"{"object": "chat.completion"}"#,
        r#"{"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "length"}]}"#,
        r#"{"choices": [{"message": {"role": "assistant", "content": "cut"#,
    ];
    for body in bodies {
        let server = Server::start(move |_, _| Act::status(200, body));
        let cache = tempfile::tempdir().unwrap();
        let teacher = HttpTeacher::new(HttpTeacherConfig {
            cache_dir: Some(cache.path().into()),
            ..config(&server.url())
        })
        .unwrap();
        let err = teacher.chat(&ask("q")).unwrap_err();
        assert!(
            matches!(err, HttpError::Malformed { attempts: 2, .. }),
            "{body}: {err:?}"
        );
        assert!(err.to_string().contains(&server.url()), "{err}");
        assert_eq!(server.requests(), 2, "{body}: one retry, then give up");
        assert!(
            files(cache.path()).is_empty(),
            "a failure must not be cached"
        );
    }

    // A garbled reply followed by a good one is a success.
    let server = Server::start(|i, b| {
        if i == 0 {
            Act::status(200, "{trunc")
        } else {
            echo(i, b)
        }
    });
    let teacher = HttpTeacher::new(config(&server.url())).unwrap();
    assert_eq!(teacher.chat(&ask("q")).unwrap().attempts, 2);
}

#[test]
fn refused_connection_names_the_url() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let teacher = HttpTeacher::new(HttpTeacherConfig {
        max_retries: 2,
        ..config(&url)
    })
    .unwrap();
    let err = teacher.chat(&ask("q")).unwrap_err();
    assert!(
        matches!(err, HttpError::Unreachable { attempts: 3, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&format!("{url}/chat/completions")), "{msg}");
    assert!(msg.contains("is the server running"), "{msg}");
    assert_eq!(teacher.stats().requests_sent, 3);
}

#[test]
fn unauthorized_fails_at_once_and_names_the_variable() {
    let (var, key) = key_var(2);
    let server =
        Server::start(|_, _| Act::status(401, r#"{"error":{"message":"Invalid API key"}}"#));
    let teacher = HttpTeacher::new(HttpTeacherConfig {
        api_key_env: var.clone(),
        max_retries: 5,
        ..config(&server.url())
    })
    .unwrap();
    let err = teacher.chat(&ask("q")).unwrap_err();
    assert!(
        matches!(
            err,
            HttpError::Unauthorized {
                code: 401,
                key_set: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.requests(), 1, "401 must not be retried");
    let msg = err.to_string();
    assert!(msg.contains(&var) && msg.contains(&server.url()), "{msg}");
    assert!(!msg.contains(&key) && !format!("{err:?}").contains(&key));

    // With the variable unset the message says so.
    let teacher = HttpTeacher::new(config(&server.url())).unwrap();
    let msg = teacher.chat(&ask("q")).unwrap_err().to_string();
    assert!(msg.contains("MEDZERO_TEST_KEY_UNSET is not set"), "{msg}");
}

#[test]
fn bad_request_fails_at_once() {
    let server =
        Server::start(|_, _| Act::status(400, r#"{"error":{"message":"max_tokens too large"}}"#));
    let teacher = HttpTeacher::new(config(&server.url())).unwrap();
    let err = teacher.chat(&ask("q")).unwrap_err();
    assert!(
        matches!(
            err,
            HttpError::Status {
                code: 400,
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_tokens too large"), "{err}");
    assert_eq!(server.requests(), 1);
}

#[test]
fn corrupt_cache_file_is_a_miss_and_is_overwritten() {
    let server = Server::start(echo);
    let cache = tempfile::tempdir().unwrap();
    let cfg = HttpTeacherConfig {
        cache_dir: Some(cache.path().into()),
        ..config(&server.url())
    };
    let teacher = HttpTeacher::new(cfg).unwrap();
    teacher.chat(&ask("q")).unwrap();
    let [path] = files(cache.path()).try_into().unwrap();
    for garbage in ["", "{\"format\": \"medzero-http", "not json at all"] {
        std::fs::write(&path, garbage).unwrap();
        let before = server.requests();
        let reply = teacher.chat(&ask("q")).unwrap();
        assert_eq!(
            (reply.content.as_str(), reply.cached),
            ("echo: q", false),
            "{garbage:?}"
        );
        assert_eq!(server.requests(), before + 1);
        assert!(
            teacher.chat(&ask("q")).unwrap().cached,
            "rewritten after {garbage:?}"
        );
    }
    assert_eq!(files(cache.path()).len(), 1, "no temp files left behind");
}

#[test]
fn server_restart_mid_run_then_resume_costs_nothing() {
    const N: usize = 8;
    const K: usize = 3;
    // The first server answers K requests, then hangs up on everything.
    let mut first = Server::start(|i, b| if i < K { echo(i, b) } else { Act::hang_up() });
    let addr = first.addr;
    let cache = tempfile::tempdir().unwrap();
    let cfg = HttpTeacherConfig {
        cache_dir: Some(cache.path().into()),
        max_retries: 30,
        backoff_initial_ms: 20,
        backoff_max_ms: 100,
        ..config(&first.url())
    };
    let questions: Vec<String> = (0..N).map(|i| format!("question {i}")).collect();

    let run = {
        let (cfg, questions) = (cfg.clone(), questions.clone());
        thread::spawn(move || {
            let teacher = HttpTeacher::new(cfg).unwrap();
            let replies: Vec<_> = questions.iter().map(|q| teacher.chat(&ask(q))).collect();
            (replies, teacher.stats())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.requests() <= K {
        assert!(
            Instant::now() < deadline,
            "client never reached request {K}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    first.kill();
    // Down long enough for several refused retries.
    thread::sleep(Duration::from_millis(300));
    let second = Server::start_on(addr, Arc::new(echo));
    let (replies, stats) = run.join().unwrap();

    for (q, reply) in questions.iter().zip(&replies) {
        let reply = reply.as_ref().unwrap();
        assert_eq!(reply.content, format!("echo: {q}"));
        assert!(!reply.cached);
    }
    assert!(stats.retries >= 2, "{stats:?}");
    assert_eq!(second.requests(), N - K);
    assert_eq!(files(cache.path()).len(), N, "every answer is cached");

    // A resumed run (a fresh client on the same cache) sends nothing.
    let teacher = HttpTeacher::new(cfg).unwrap();
    for q in &questions {
        let reply = teacher.chat(&ask(q)).unwrap();
        assert_eq!((reply.content, reply.cached), (format!("echo: {q}"), true));
    }
    assert_eq!(
        second.requests(),
        N - K,
        "the second pass touched the network"
    );
    assert_eq!(teacher.stats().requests_sent, 0);
    assert_eq!(teacher.stats().cache_hits, N as u64);
}

#[test]
fn concurrency_limit_holds_across_threads() {
    let observe = |limit: usize| {
        let server = Server::start(|i, b| echo(i, b).after(Duration::from_millis(40)));
        let teacher = Arc::new(
            HttpTeacher::new(HttpTeacherConfig {
                max_concurrency: limit,
                ..config(&server.url())
            })
            .unwrap(),
        );
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let teacher = teacher.clone();
                thread::spawn(move || {
                    for r in 0..2 {
                        let q = format!("thread {t} request {r}");
                        assert_eq!(
                            teacher.chat(&ask(&q)).unwrap().content,
                            format!("echo: {q}")
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(server.requests(), 16);
        server.max_in_flight()
    };
    let limited = observe(2);
    assert!(
        limited <= 2,
        "{limited} requests in flight with max_concurrency = 2"
    );
    // The measurement can see more when allowed: the limit is what held it.
    let free = observe(8);
    assert!(free > 2, "only {free} in flight with max_concurrency = 8");
}

// ------------------------------------------------- teachers and MedThink

/// A teacher server that answers MedThink's prompts in their formats: YES to
/// screening, the first option's text with a knowledge point to explanations,
/// a one-step chain to corrections; `malformed` questions get prose instead.
fn medthink_server(malformed: &'static str) -> Server {
    Server::start(medthink_script(malformed))
}

fn medthink_script(malformed: &'static str) -> impl Fn(usize, &Value) -> Act + Send + Sync {
    move |_, body: &Value| {
        let user = body["messages"][1]["content"].as_str().unwrap_or_default();
        if !malformed.is_empty()
            && user.contains(malformed)
            && user.contains("Answer on the first line")
        {
            return Act::answer("I would rather not say.");
        }
        if user.contains("YES or NO") {
            return Act::answer("YES");
        }
        let first = user
            .lines()
            .find_map(|l| l.strip_prefix("A. "))
            .unwrap_or("nothing");
        if user.contains("Answer on the first line") {
            Act::answer(&format!("Answer: {first}\n\n1. A fact about {first}."))
        } else {
            Act::answer(&format!(
                "Step 1: Consider the options.\n\nStep 2: The answer is {first}."
            ))
        }
    }
}

fn medthink_config(dir: &Path, url: &str) -> std::path::PathBuf {
    let text = format!(
        r#"[run]
name = "mt"
out_dir = "{runs}"
threads = 1
[data.synthclinic]
train = 12
test = 4
[teacher]
kind = "http"
[teacher.http]
base_url = "{url}"
model = "teacher-72b"
api_key_env = "MEDZERO_TEST_KEY_UNSET"
timeout_s = 2.0
max_retries = 1
backoff_initial_ms = 10
backoff_max_ms = 20
cache_dir = "{cache}"
[student]
hidden_size = 32
layers = 1
heads = 2
kv_heads = 1
intermediate_size = 64
[[stages]]
kind = "medthink_knowledge"
name = "medthink-1"
[stages.sft]
epochs = 1
batch_size = 4
"#,
        runs = dir.join("runs").display(),
        cache = dir.join("cache").display(),
    );
    let path = dir.join("mt.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn run_medzero(config: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_medzero"))
        .arg("run")
        .arg(config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn medthink_knowledge_runs_on_an_http_teacher_and_reruns_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = medthink_server("");
    let config = medthink_config(dir.path(), &server.url());
    let out = run_medzero(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Screening and an explanation per training question.
    assert_eq!(server.requests(), 24);
    let stage = dir.path().join("runs/mt/stages/0-medthink-1");
    let records: Vec<Value> = std::fs::read_to_string(stage.join("sharegpt.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 12);
    for r in &records {
        assert_eq!(r["conversations"][0]["from"], "user");
        assert!(
            r["conversations"][1]["value"]
                .as_str()
                .unwrap()
                .starts_with("Answer: ")
        );
    }
    // The server is gone: a rerun of the stage from scratch asks nothing.
    server.kill();
    std::fs::remove_dir_all(&stage).unwrap();
    let out = run_medzero(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(stage.join("sharegpt.jsonl"))
            .unwrap()
            .lines()
            .count(),
        12
    );
}

#[test]
fn a_malformed_teacher_reply_skips_its_question_and_a_dead_teacher_stops_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    // Every question whose text mentions a woman gets prose, not an answer.
    let server = medthink_server("woman");
    let config = medthink_config(dir.path(), &server.url());
    let out = run_medzero(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("malformed teacher reply"), "{err}");
    let kept = std::fs::read_to_string(
        dir.path()
            .join("runs/mt/stages/0-medthink-1/sharegpt.jsonl"),
    )
    .unwrap()
    .lines()
    .count();
    assert!(kept > 0 && kept < 12, "{kept} of 12 kept");

    // No server at all: a clear error naming the URL, a non-zero exit, no panic.
    let dead = tempfile::tempdir().unwrap();
    let config = medthink_config(dead.path(), "http://127.0.0.1:9/v1");
    let out = run_medzero(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_malformed_reply_is_not_cached_so_a_fixed_server_is_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    // Prose instead of an answer for some questions, until the server is fixed.
    let fixed = Arc::new(AtomicBool::new(false));
    let (bad, good) = (medthink_script("woman"), medthink_script(""));
    let server = {
        let fixed = fixed.clone();
        Server::start(move |i, b| {
            if fixed.load(Ordering::SeqCst) {
                good(i, b)
            } else {
                bad(i, b)
            }
        })
    };
    let config = medthink_config(dir.path(), &server.url());
    let out = run_medzero(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stage = dir.path().join("runs/mt/stages/0-medthink-1");
    let lines = |stage: &Path| {
        std::fs::read_to_string(stage.join("sharegpt.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    let kept = lines(&stage);
    assert!(kept > 0 && kept < 12, "{kept} of 12 kept");
    // Fixed: the rerun asks again exactly what came back malformed; every
    // well-formed reply comes from the cache.
    fixed.store(true, Ordering::SeqCst);
    std::fs::remove_dir_all(&stage).unwrap();
    let before = server.requests();
    let out = run_medzero(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.requests() - before, 12 - kept);
    assert_eq!(lines(&stage), 12);
}

#[test]
fn a_teacher_killed_mid_stage_stops_it_and_the_rerun_asks_only_the_rest() {
    const K: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    // Answers K requests, then hangs up on everything, like a crashed server,
    // until it is brought back up. (It keeps its listening socket: binding
    // the port again after a kill races with other tests' servers for it.)
    let up = Arc::new(AtomicBool::new(false));
    let script = medthink_script("");
    let server = {
        let up = up.clone();
        Server::start(move |i, b| {
            if i < K || up.load(Ordering::SeqCst) {
                script(i, b)
            } else {
                Act::hang_up()
            }
        })
    };
    let config = medthink_config(dir.path(), &server.url());
    let out = run_medzero(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&server.addr.to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let stage = dir.path().join("runs/mt/stages/0-medthink-1");
    assert!(!stage.join("sharegpt.jsonl").exists());

    // Back up: the rerun completes, asking only what the first run did not
    // get answered.
    let before = server.requests();
    up.store(true, Ordering::SeqCst);
    let out = run_medzero(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.requests() - before, 24 - K);
    assert_eq!(
        std::fs::read_to_string(stage.join("sharegpt.jsonl"))
            .unwrap()
            .lines()
            .count(),
        12
    );
}
