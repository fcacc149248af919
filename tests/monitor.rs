//! Metrics sinks, and TensorBoard event files as TensorBoard itself reads them.
//!
//! The read-back tests run `tests/support/tb_read.py` with the project's Python
//! venv (installed by `make setup`), which loads the directory with
//! TensorBoard's own `EventAccumulator`.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};

use medzero::infra::monitor::{
    Fanout, Metrics, MonitorError, Null, Record, Recorder, TensorBoard, Value, crc32c,
    masked_crc32c,
};
use serde_json::Value as Json;

mod support;
use support::tb_read;

/// A JSON number, or tb_read.py's spelling of a non-finite one.
fn num(v: &Json) -> f64 {
    match v {
        Json::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
        _ => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

/// Equal, or one f64 ulp apart (serde_json's default float parsing is not
/// always correctly rounded).
fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= f64::EPSILON * a.abs().max(b.abs())
}

fn tags(section: &Json) -> BTreeSet<&str> {
    section
        .as_object()
        .expect("a tag map")
        .keys()
        .map(String::as_str)
        .collect()
}

/// Sum, sum of squares, min, max and count of the finite values.
fn stats(values: &[f64]) -> (f64, f64, f64, f64, f64) {
    let finite: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (
        finite.len() as f64,
        finite.iter().sum(),
        finite.iter().map(|x| x * x).sum(),
        min,
        max,
    )
}

#[test]
fn tensorboard_reads_back_scalars_histograms_and_text() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("runs/exp1");
    let mut tb = TensorBoard::create(&dir).unwrap();
    let path = tb.path().unwrap().to_owned();
    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    assert!(
        name.contains(&format!(".{}.", std::process::id())),
        "{name}"
    );
    assert_eq!(path.parent(), Some(dir.as_path()));

    // Interleaved tags, as a training loop writes them.
    let mut scalars: Vec<(&str, u64, f64)> = Vec::new();
    for step in 0..6u64 {
        scalars.push(("train/loss", step, 2.0 / (step as f64 + 3.0)));
        if step % 2 == 0 {
            scalars.push(("perf/tokens_per_s", step * 10, 12_345.678_9 + step as f64));
        }
    }
    scalars.extend([
        ("debug/nonfinite", 1, f64::NAN),
        ("debug/nonfinite", 2, f64::INFINITY),
        ("debug/nonfinite", 3, f64::NEG_INFINITY),
        ("debug/huge", 7, 1e300),
        ("unicode/ζ-λ tag", u64::from(u32::MAX) + 5, -0.1),
    ]);
    for &(tag, step, value) in &scalars {
        tb.scalar(tag, step, value);
    }

    let rewards: Vec<f64> = (0..100)
        .map(|i| ((i * 37) % 101) as f64 / 7.0 - 3.0)
        .collect();
    let with_nan = [1.0, f64::NAN, 2.0, f64::INFINITY, 4.0];
    let histograms: Vec<(&str, u64, Vec<f64>)> = vec![
        ("policy/reward", 1, rewards.clone()),
        (
            "policy/reward",
            2,
            rewards.iter().map(|r| r * 2.0).collect(),
        ),
        ("policy/constant", 1, vec![3.0; 4]),
        ("policy/with_nan", 1, with_nan.to_vec()),
        ("policy/empty", 1, Vec::new()),
    ];
    for (tag, step, values) in &histograms {
        tb.histogram(tag, *step, values);
    }

    let texts = [
        (
            "samples/completion",
            3,
            "**Dx:** pneumonia\n\n| a | b |\n|---|---|\n| 1 | 2 |",
        ),
        ("samples/completion", 4, "second — ünïcödé ✓"),
        ("samples/empty", 4, ""),
    ];
    for (tag, step, text) in texts {
        tb.text(tag, step, text);
    }
    tb.flush().unwrap();
    drop(tb);

    let got = tb_read(&tmp.path().join("runs/exp1"));

    let files = got["files"].as_object().unwrap();
    assert_eq!(files.len(), 1);
    let file = &files[&name];
    assert_eq!(file["file_version"], "brain.Event:2");
    let writes = scalars.len() + histograms.len() + texts.len();
    assert_eq!(file["records"].as_u64(), Some(1 + writes as u64));

    // Scalars: every tag, step and value, exactly as f32.
    let want_tags: BTreeSet<&str> = scalars.iter().map(|s| s.0).collect();
    assert_eq!(tags(&got["scalars"]), want_tags);
    for tag in want_tags {
        let want: Vec<(u64, f64)> = scalars
            .iter()
            .filter(|s| s.0 == tag)
            .map(|s| (s.1, s.2))
            .collect();
        let series = got["scalars"][tag].as_array().unwrap();
        assert_eq!(series.len(), want.len(), "{tag}");
        for (point, &(step, value)) in series.iter().zip(&want) {
            assert_eq!(point[0].as_u64(), Some(step), "{tag}");
            let read = num(&point[1]) as f32;
            let sent = value as f32;
            assert!(
                read.to_bits() == sent.to_bits() || (read.is_nan() && sent.is_nan()),
                "{tag}@{step}: read {read}, sent {sent}"
            );
        }
    }

    // Histograms: count, sum, sum of squares, range; buckets cover all values.
    let want_tags: BTreeSet<&str> = histograms.iter().map(|h| h.0).collect();
    assert_eq!(tags(&got["histograms"]), want_tags);
    for tag in want_tags {
        let want: Vec<&(&str, u64, Vec<f64>)> = histograms.iter().filter(|h| h.0 == tag).collect();
        let series = got["histograms"][tag].as_array().unwrap();
        assert_eq!(series.len(), want.len(), "{tag}");
        for (point, (_, step, values)) in series.iter().zip(want) {
            assert_eq!(point[0].as_u64(), Some(*step), "{tag}");
            let h = &point[1];
            let (n, sum, sum_squares, min, max) = stats(values);
            assert_eq!(num(&h["num"]), n, "{tag}");
            assert!(close(num(&h["sum"]), sum), "{tag}: sum {}", h["sum"]);
            assert!(close(num(&h["sum_squares"]), sum_squares), "{tag}");
            let buckets: f64 = h["bucket"].as_array().unwrap().iter().map(num).sum();
            assert_eq!(buckets, n, "{tag}");
            if n > 0.0 {
                assert!(
                    close(num(&h["min"]), min) && close(num(&h["max"]), max),
                    "{tag}"
                );
                let limits: Vec<f64> = h["bucket_limit"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(num)
                    .collect();
                assert!(close(*limits.last().unwrap(), max), "{tag}");
                assert!(limits.windows(2).all(|w| w[0] < w[1]), "{tag}: {limits:?}");
            }
        }
    }

    // Text: read through the text plugin's metadata, byte for byte.
    let want_tags: BTreeSet<&str> = texts.iter().map(|t| t.0).collect();
    assert_eq!(tags(&got["text"]), want_tags);
    assert_eq!(tags(&got["tensors"]), BTreeSet::new());
    for tag in want_tags {
        let want: Vec<Json> = texts
            .iter()
            .filter(|t| t.0 == tag)
            .map(|t| serde_json::json!([t.1, t.2]))
            .collect();
        assert_eq!(got["text"][tag].as_array().unwrap(), &want, "{tag}");
    }
}

#[test]
fn every_writer_gets_its_own_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = TensorBoard::create(tmp.path()).unwrap();
    let mut b = TensorBoard::create(tmp.path()).unwrap();
    assert_ne!(a.path(), b.path());
    a.scalar("x", 1, 1.0);
    b.scalar("x", 2, 2.0);
    a.flush().unwrap();
    b.flush().unwrap();
    drop((a, b));

    let got = tb_read(tmp.path());
    assert_eq!(got["files"].as_object().unwrap().len(), 2);
    let mut steps: Vec<u64> = got["scalars"]["x"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    steps.sort_unstable();
    assert_eq!(steps, [1, 2]);
}

#[test]
fn event_file_is_framed_tfrecords() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tb = TensorBoard::create(tmp.path()).unwrap();
    tb.scalar("a", 1, 0.5);
    tb.histogram("b", 2, &[1.0, 2.0]);
    tb.text("c", 3, "hi");
    tb.flush().unwrap();
    let bytes = fs::read(tb.path().unwrap()).unwrap();

    let mut rest = &bytes[..];
    let mut records = 0;
    while !rest.is_empty() {
        let len: [u8; 8] = rest[..8].try_into().unwrap();
        assert_eq!(rest[8..12], masked_crc32c(&len).to_le_bytes());
        let n = u64::from_le_bytes(len) as usize;
        let data = &rest[12..12 + n];
        assert_eq!(rest[12 + n..16 + n], masked_crc32c(data).to_le_bytes());
        rest = &rest[16 + n..];
        records += 1;
    }
    assert_eq!(records, 4);
}

#[test]
fn crc32c_matches_known_values() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(crc32c(b""), 0);
    // RFC 3720 B.4: 32 zero bytes.
    assert_eq!(crc32c(&[0; 32]), 0x8a91_36aa);
    // TFRecord's masking, as computed by TensorBoard's own reader.
    assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    assert_eq!(masked_crc32c(&[0; 8]), 0x0798_0329);
}

#[test]
fn create_reports_an_unusable_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    fs::write(&file, b"").unwrap();

    let err = TensorBoard::create(&file.join("run")).unwrap_err();
    assert!(matches!(err, MonitorError::CreateDir { .. }), "{err:?}");
    let err = TensorBoard::create(&file).unwrap_err();
    assert!(matches!(err, MonitorError::CreateDir { .. }), "{err:?}");
}

/// Accepts `budget` bytes, then fails every write and flush.
struct Failing {
    budget: usize,
}

impl Write for Failing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.budget);
        self.budget -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.budget == 0 {
            Err(io::Error::other("disk on fire"))
        } else {
            Ok(())
        }
    }
}

#[test]
fn write_errors_are_kept_counted_and_reported_by_flush() {
    // Room for the header (40 bytes) and one scalar (39): the second fails mid-record.
    let mut tb = TensorBoard::from_writer(Failing { budget: 100 });
    tb.scalar("a", 1, 1.0);
    tb.scalar("a", 2, 2.0);
    tb.histogram("h", 3, &[1.0, 2.0, 3.0]);
    tb.text("t", 4, "dropped");
    assert_eq!(tb.dropped(), 3);

    for _ in 0..2 {
        match tb.flush() {
            Err(MonitorError::Write { source, dropped }) => {
                assert_eq!(source.to_string(), "disk on fire");
                assert_eq!(dropped, 3);
            }
            other => panic!("expected a write error, got {other:?}"),
        }
    }
    tb.scalar("a", 5, 5.0);
    assert_eq!(tb.dropped(), 4);
    let err = tb.flush().unwrap_err();
    assert!(err.to_string().contains("4 record(s) dropped"), "{err}");
    // Dropping a failed writer is quiet.
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_surfaces_from_flush() {
    let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
    let mut tb = TensorBoard::from_writer(BufWriter::new(full));
    tb.scalar("train/loss", 1, 0.5);
    let err = tb.flush().unwrap_err();
    let MonitorError::Write { source, .. } = &err else {
        panic!("expected a write error, got {err:?}");
    };
    assert_eq!(source.raw_os_error(), Some(28), "ENOSPC: {source}");
    tb.scalar("train/loss", 2, 0.25);
    assert_eq!(tb.dropped(), 1);
    assert!(tb.flush().is_err());
}

#[test]
fn recorder_captures_what_was_written_through_a_fanout() {
    let recorder = Recorder::new();
    let other = Recorder::new();
    let mut sink: Box<dyn Metrics> = Box::new(Fanout::new(vec![
        Box::new(recorder.clone()),
        Box::new(Null),
        Box::new(other.clone()),
    ]));
    sink.scalar("train/loss", 1, 0.5);
    sink.histogram("policy/reward", 1, &[1.0, -1.0]);
    sink.scalar("train/loss", 2, f64::NAN);
    sink.text("samples", 2, "hello");
    sink.flush().unwrap();

    assert_eq!(recorder.scalars("train/loss")[0], (1, 0.5));
    assert!(recorder.scalars("train/loss")[1].1.is_nan());
    assert_eq!(recorder.histograms("policy/reward"), [(1, vec![1.0, -1.0])]);
    assert_eq!(recorder.texts("samples"), [(2, "hello".to_owned())]);
    assert!(recorder.scalars("samples").is_empty());
    assert_eq!(
        recorder.records()[3],
        Record {
            tag: "samples".into(),
            step: 2,
            value: Value::Text("hello".into()),
        }
    );
    assert_eq!(recorder.records().len(), 4);
    assert_eq!(other.records().len(), 4);
}

#[test]
fn fanout_flushes_every_sink_and_returns_the_first_error() {
    let recorder = Recorder::new();
    let mut sink = Fanout::new(vec![
        Box::new(TensorBoard::from_writer(Failing { budget: 0 })),
        Box::new(recorder.clone()),
    ]);
    sink.scalar("x", 1, 1.0);
    assert!(matches!(
        sink.flush(),
        Err(MonitorError::Write { dropped: 2, .. })
    ));
    assert_eq!(recorder.scalars("x"), [(1, 1.0)]);
}
