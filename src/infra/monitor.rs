//! Training metrics: a small [`Metrics`] sink trait and its implementations.
//!
//! Training code writes scalars, histograms and text through `&mut dyn Metrics`
//! and never learns where they go: [`TensorBoard`] event files for people,
//! [`Recorder`] for tests, [`Fanout`] for both, [`Null`] for neither.
//!
//! Recording never fails and never panics, so a full disk cannot stop a
//! training run; the first I/O error is kept and reported by
//! [`Metrics::flush`], which the caller checks at checkpoints and at the end.
//!
//! [`TensorBoard`] writes the event-file format itself (TFRecord framing with
//! CRC32C, hand-encoded protobuf) rather than pulling in a protobuf stack for
//! the five messages it needs. Field numbers follow `tensorboard/compat/proto`
//! (`event.proto`, `summary.proto`, `histogram.proto`, `tensor.proto`).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where training metrics go.
///
/// Recording methods are infallible by design: an unwritable log must not stop
/// training. Sinks that can fail keep their first error and return it from
/// [`flush`](Metrics::flush).
pub trait Metrics: Send {
    /// Records one number. TensorBoard stores it as `f32`; NaN and ±inf are kept.
    fn scalar(&mut self, tag: &str, step: u64, value: f64);
    /// Records the distribution of `values` (e.g. rewards of a batch).
    fn histogram(&mut self, tag: &str, step: u64, values: &[f64]);
    /// Records a piece of text (TensorBoard renders it as Markdown).
    fn text(&mut self, tag: &str, step: u64, text: &str);
    /// Pushes buffered records to their destination and reports the first
    /// error the sink has hit since it was created, if any.
    fn flush(&mut self) -> Result<(), MonitorError>;
}

/// Why a metrics sink could not be created or could not write.
///
/// Sources are shared (`Arc`) because a failed sink reports the same error
/// from every later `flush`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MonitorError {
    /// The log directory could not be created.
    #[error("cannot create TensorBoard log directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// The event file could not be created or its header written.
    #[error("cannot create TensorBoard event file {}", path.display())]
    CreateFile {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// Writing failed; the sink has stopped writing. `dropped` counts the
    /// records discarded from the failed one on (records that were still
    /// buffered when the failure surfaced may be lost too).
    #[error("TensorBoard event writer failed; {dropped} record(s) dropped")]
    Write {
        #[source]
        source: Arc<io::Error>,
        dropped: u64,
    },
}

/// A sink that discards everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Null;

impl Metrics for Null {
    fn scalar(&mut self, _tag: &str, _step: u64, _value: f64) {}
    fn histogram(&mut self, _tag: &str, _step: u64, _values: &[f64]) {}
    fn text(&mut self, _tag: &str, _step: u64, _text: &str) {}
    fn flush(&mut self) -> Result<(), MonitorError> {
        Ok(())
    }
}

/// Sends every record to several sinks, e.g. TensorBoard plus a [`Recorder`].
pub struct Fanout {
    sinks: Vec<Box<dyn Metrics>>,
}

impl Fanout {
    pub fn new(sinks: Vec<Box<dyn Metrics>>) -> Self {
        Self { sinks }
    }
}

impl Metrics for Fanout {
    fn scalar(&mut self, tag: &str, step: u64, value: f64) {
        for sink in &mut self.sinks {
            sink.scalar(tag, step, value);
        }
    }

    fn histogram(&mut self, tag: &str, step: u64, values: &[f64]) {
        for sink in &mut self.sinks {
            sink.histogram(tag, step, values);
        }
    }

    fn text(&mut self, tag: &str, step: u64, text: &str) {
        for sink in &mut self.sinks {
            sink.text(tag, step, text);
        }
    }

    /// Flushes every sink, even after one fails, and returns the first error.
    fn flush(&mut self) -> Result<(), MonitorError> {
        self.sinks
            .iter_mut()
            .map(|sink| sink.flush())
            .fold(Ok(()), Result::and)
    }
}

/// One value captured by a [`Recorder`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(f64),
    Histogram(Vec<f64>),
    Text(String),
}

/// One call captured by a [`Recorder`].
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub tag: String,
    pub step: u64,
    pub value: Value,
}

/// Keeps every record in memory, in call order.
///
/// Clones share the same storage, so a test hands one clone to the code under
/// test (as `Box<dyn Metrics>`) and inspects another.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    records: Arc<Mutex<Vec<Record>>>,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded so far, in call order.
    pub fn records(&self) -> Vec<Record> {
        self.lock().clone()
    }

    /// `(step, value)` of every scalar recorded under `tag`.
    pub fn scalars(&self, tag: &str) -> Vec<(u64, f64)> {
        self.select(tag, |value| match value {
            Value::Scalar(x) => Some(*x),
            _ => None,
        })
    }

    /// `(step, values)` of every histogram recorded under `tag`.
    pub fn histograms(&self, tag: &str) -> Vec<(u64, Vec<f64>)> {
        self.select(tag, |value| match value {
            Value::Histogram(values) => Some(values.clone()),
            _ => None,
        })
    }

    /// `(step, text)` of every text recorded under `tag`.
    pub fn texts(&self, tag: &str) -> Vec<(u64, String)> {
        self.select(tag, |value| match value {
            Value::Text(text) => Some(text.clone()),
            _ => None,
        })
    }

    fn select<T>(&self, tag: &str, pick: impl Fn(&Value) -> Option<T>) -> Vec<(u64, T)> {
        self.lock()
            .iter()
            .filter(|record| record.tag == tag)
            .filter_map(|record| pick(&record.value).map(|x| (record.step, x)))
            .collect()
    }

    fn push(&self, tag: &str, step: u64, value: Value) {
        self.lock().push(Record {
            tag: tag.to_owned(),
            step,
            value,
        });
    }

    /// A panic elsewhere while holding the lock cannot leave a `Vec` push
    /// half-done, so the data stays usable and poisoning is ignored.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Metrics for Recorder {
    fn scalar(&mut self, tag: &str, step: u64, value: f64) {
        self.push(tag, step, Value::Scalar(value));
    }

    fn histogram(&mut self, tag: &str, step: u64, values: &[f64]) {
        self.push(tag, step, Value::Histogram(values.to_vec()));
    }

    fn text(&mut self, tag: &str, step: u64, text: &str) {
        self.push(tag, step, Value::Text(text.to_owned()));
    }

    fn flush(&mut self) -> Result<(), MonitorError> {
        Ok(())
    }
}

/// Writes a TensorBoard event file (`events.out.tfevents.*`).
///
/// Records are encoded and written on the caller's thread into `W` (a
/// `BufWriter<File>` for [`create`](TensorBoard::create)); the buffer is
/// flushed at least every [`AUTO_FLUSH`] while records arrive, so a live
/// TensorBoard follows the run. After the first I/O error nothing more is
/// written (a half-written record would corrupt the file for readers); later
/// records are counted as dropped and the error is returned by every
/// [`flush`](Metrics::flush). Dropping the writer flushes best-effort.
#[derive(Debug)]
pub struct TensorBoard<W: Write = BufWriter<File>> {
    out: W,
    path: Option<PathBuf>,
    error: Option<Arc<io::Error>>,
    dropped: u64,
    last_flush: Instant,
}

/// Longest time a record may sit in the write buffer while others are written.
pub const AUTO_FLUSH: Duration = Duration::from_secs(10);

/// Tells apart event files created by one process within the same second.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TensorBoard {
    /// Creates `dir` (and parents) and a new event file in it, named
    /// `events.out.tfevents.<unix_secs>.<hostname>.<pid>.<n>` as TensorBoard
    /// expects, and writes the file-version header through to the file so
    /// that an unwritable location fails here rather than later.
    pub fn create(dir: &Path) -> Result<Self, MonitorError> {
        fs::create_dir_all(dir).map_err(|e| MonitorError::CreateDir {
            path: dir.to_owned(),
            source: Arc::new(e),
        })?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let host = hostname();
        let pid = std::process::id();
        // `create_new` never clobbers an existing file (say, from a process
        // with a recycled pid); each retry takes a fresh counter value.
        let (file, path) = loop {
            let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{pid}.{n}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(MonitorError::CreateFile {
                        path,
                        source: Arc::new(e),
                    });
                }
            }
        };
        let mut writer = Self::from_writer(BufWriter::new(file));
        writer
            .flush_out()
            .map_err(|source| MonitorError::CreateFile {
                path: path.clone(),
                source,
            })?;
        writer.path = Some(path);
        Ok(writer)
    }
}

impl<W: Write> TensorBoard<W> {
    /// Writes an event stream into any writer (a file opened elsewhere, a
    /// socket, a test double). The file-version header is written at once;
    /// an error doing so surfaces from [`flush`](Metrics::flush).
    pub fn from_writer(out: W) -> Self {
        let mut writer = Self {
            out,
            path: None,
            error: None,
            dropped: 0,
            last_flush: Instant::now(),
        };
        let mut event = Pb::default();
        event.double(1, wall_time()); // Event.wall_time
        event.bytes(3, b"brain.Event:2"); // Event.file_version
        writer.write_record(&event.0);
        writer
    }

    /// The event file, when created by [`create`](TensorBoard::create).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Records discarded because the writer had failed.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Wraps one `Summary.Value` (already encoded) in an `Event` and writes it.
    fn write_summary(&mut self, step: u64, value: &Pb) {
        let mut summary = Pb::default();
        summary.bytes(1, &value.0); // Summary.value
        let mut event = Pb::default();
        event.double(1, wall_time()); // Event.wall_time
        event.varint_field(2, step); // Event.step (int64)
        event.bytes(5, &summary.0); // Event.summary
        self.write_record(&event.0);
    }

    /// Frames `data` as a TFRecord: length, masked CRC of the length, data,
    /// masked CRC of the data.
    fn write_record(&mut self, data: &[u8]) {
        if self.error.is_some() {
            self.dropped += 1;
            return;
        }
        let len = (data.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(data.len() + 16);
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        frame.extend_from_slice(data);
        frame.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        let written = self.out.write_all(&frame).and_then(|()| {
            if self.last_flush.elapsed() >= AUTO_FLUSH {
                self.last_flush = Instant::now();
                self.out.flush()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            self.error = Some(Arc::new(e));
            self.dropped += 1;
        }
    }

    /// Flushes unless already failed; returns the kept error, if any.
    fn flush_out(&mut self) -> Result<(), Arc<io::Error>> {
        if self.error.is_none() {
            self.last_flush = Instant::now();
            if let Err(e) = self.out.flush() {
                self.error = Some(Arc::new(e));
            }
        }
        self.error.as_ref().map_or(Ok(()), |e| Err(Arc::clone(e)))
    }
}

impl<W: Write + Send> Metrics for TensorBoard<W> {
    fn scalar(&mut self, tag: &str, step: u64, value: f64) {
        let mut v = Pb::default();
        v.bytes(1, tag.as_bytes()); // Summary.Value.tag
        v.float(2, value as f32); // Summary.Value.simple_value
        self.write_summary(step, &v);
    }

    fn histogram(&mut self, tag: &str, step: u64, values: &[f64]) {
        let h = Histogram::of(values);
        let mut histo = Pb::default();
        histo.double(1, h.min); // HistogramProto.min
        histo.double(2, h.max); // .max
        histo.double(3, h.num); // .num
        histo.double(4, h.sum); // .sum
        histo.double(5, h.sum_squares); // .sum_squares
        histo.packed_doubles(6, &h.bucket_limit); // .bucket_limit
        histo.packed_doubles(7, &h.bucket); // .bucket
        let mut v = Pb::default();
        v.bytes(1, tag.as_bytes()); // Summary.Value.tag
        v.bytes(5, &histo.0); // Summary.Value.histo
        self.write_summary(step, &v);
    }

    /// Written the way `tf.summary.text` does: a scalar `DT_STRING` tensor
    /// tagged for the text plugin.
    fn text(&mut self, tag: &str, step: u64, text: &str) {
        let mut tensor = Pb::default();
        tensor.varint_field(1, DT_STRING); // TensorProto.dtype; empty shape = scalar
        tensor.bytes(8, text.as_bytes()); // TensorProto.string_val
        let mut plugin = Pb::default();
        plugin.bytes(1, b"text"); // SummaryMetadata.PluginData.plugin_name
        let mut metadata = Pb::default();
        metadata.bytes(1, &plugin.0); // SummaryMetadata.plugin_data
        let mut v = Pb::default();
        v.bytes(1, tag.as_bytes()); // Summary.Value.tag
        v.bytes(8, &tensor.0); // Summary.Value.tensor
        v.bytes(9, &metadata.0); // Summary.Value.metadata
        self.write_summary(step, &v);
    }

    fn flush(&mut self) -> Result<(), MonitorError> {
        self.flush_out().map_err(|source| MonitorError::Write {
            source,
            dropped: self.dropped,
        })
    }
}

impl<W: Write> Drop for TensorBoard<W> {
    /// Best effort: there is no one left to report an error to.
    fn drop(&mut self) {
        let _ = self.flush_out();
    }
}

impl<W: Write> TensorBoard<W> {
    /// The run's hyperparameters for TensorBoard's HParams tab: one session
    /// start (`HParamsPluginData.session_start_info`) holding each value by
    /// name, as `hparams.hp.hparams` writes it.
    pub fn hparams(&mut self, hparams: &BTreeMap<String, HParam>) {
        let mut start = Pb::default();
        for (name, value) in hparams {
            let mut v = Pb::default(); // google.protobuf.Value
            match value {
                HParam::Number(x) => v.double(2, *x),
                HParam::Text(s) => v.bytes(3, s.as_bytes()),
                HParam::Bool(b) => v.varint_field(4, u64::from(*b)),
            }
            let mut entry = Pb::default(); // map<string, Value> entry
            entry.bytes(1, name.as_bytes());
            entry.bytes(2, &v.0);
            start.bytes(1, &entry.0); // SessionStartInfo.hparams
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        start.double(5, now); // SessionStartInfo.start_time_secs
        let mut data = Pb::default();
        data.bytes(3, &start.0); // HParamsPluginData.session_start_info
        let mut plugin = Pb::default();
        plugin.bytes(1, b"hparams"); // PluginData.plugin_name
        plugin.bytes(2, &data.0); // PluginData.content
        let mut metadata = Pb::default();
        metadata.bytes(1, &plugin.0);
        let mut tensor = Pb::default();
        tensor.varint_field(1, DT_FLOAT); // a scalar 0: the value is in the metadata
        tensor.float(5, 0.0);
        let mut v = Pb::default();
        v.bytes(1, b"_hparams_/session_start_info");
        v.bytes(8, &tensor.0);
        v.bytes(9, &metadata.0);
        self.write_summary(0, &v);
    }
}

/// One hyperparameter's value, as the HParams tab shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum HParam {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl HParam {
    /// `value` flattened into dotted names (`sft.lr`), arrays and nulls as
    /// their JSON text.
    pub fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, HParam>) {
        use serde_json::Value as J;
        let name = |k: &str| {
            if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            }
        };
        match value {
            J::Object(map) => {
                for (k, v) in map {
                    HParam::flatten(&name(k), v, out);
                }
            }
            J::Number(n) => {
                out.insert(
                    prefix.to_string(),
                    HParam::Number(n.as_f64().unwrap_or(f64::NAN)),
                );
            }
            J::Bool(b) => {
                out.insert(prefix.to_string(), HParam::Bool(*b));
            }
            J::String(s) => {
                out.insert(prefix.to_string(), HParam::Text(s.clone()));
            }
            other => {
                out.insert(prefix.to_string(), HParam::Text(other.to_string()));
            }
        }
    }
}

/// `tensorflow.DataType.DT_FLOAT`.
const DT_FLOAT: u64 = 1;

/// `tensorflow.DataType.DT_STRING`.
const DT_STRING: u64 = 7;

/// Linear buckets per histogram, as `tf.summary.histogram` uses by default.
const HISTOGRAM_BUCKETS: usize = 30;

/// A `HistogramProto` over the finite values.
///
/// NaN and ±inf have no place on the axis and would make min/max/sum useless
/// for plotting, so they are left out (num counts finite values only); log a
/// scalar if their count matters.
#[derive(Debug, PartialEq)]
struct Histogram {
    min: f64,
    max: f64,
    num: f64,
    sum: f64,
    sum_squares: f64,
    bucket_limit: Vec<f64>,
    bucket: Vec<f64>,
}

impl Histogram {
    fn of(values: &[f64]) -> Self {
        let finite = || values.iter().copied().filter(|x| x.is_finite());
        let (min, max) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        if min > max {
            // No finite values: an empty histogram TensorBoard can still show.
            return Self {
                min: 0.0,
                max: 0.0,
                num: 0.0,
                sum: 0.0,
                sum_squares: 0.0,
                bucket_limit: Vec::new(),
                bucket: Vec::new(),
            };
        }
        let (mut num, mut sum, mut sum_squares) = (0.0, 0.0, 0.0);
        for x in finite() {
            num += 1.0;
            sum += x;
            sum_squares += x * x;
        }
        let (bucket_limit, bucket) = if min == max {
            (vec![max], vec![num])
        } else {
            // Halves keep `max - min` finite even for values near ±f64::MAX.
            let half_range = max / 2.0 - min / 2.0;
            let mut bucket = vec![0.0; HISTOGRAM_BUCKETS];
            for x in finite() {
                let t = (x / 2.0 - min / 2.0) / half_range;
                let i = ((t * HISTOGRAM_BUCKETS as f64) as usize).min(HISTOGRAM_BUCKETS - 1);
                bucket[i] += 1.0;
            }
            // Right edges by interpolation, which cannot overflow; the last
            // is exactly `max`.
            let bucket_limit = (1..=HISTOGRAM_BUCKETS)
                .map(|i| {
                    let t = i as f64 / HISTOGRAM_BUCKETS as f64;
                    min * (1.0 - t) + max * t
                })
                .collect();
            (bucket_limit, bucket)
        };
        Self {
            min,
            max,
            num,
            sum,
            sum_squares,
            bucket_limit,
            bucket,
        }
    }
}

/// The few protobuf wire-format encodings the event messages need.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire_type: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire_type));
    }

    /// `int64`/`uint64`/enum (wire type 0). Into an `int64` field a `u64`
    /// above `i64::MAX` reads back negative; no real step gets there.
    fn varint_field(&mut self, field: u32, v: u64) {
        self.key(field, 0);
        self.varint(v);
    }

    /// `double` (wire type 1).
    fn double(&mut self, field: u32, v: f64) {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// `float` (wire type 5).
    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// `string`, `bytes` or an embedded message (wire type 2).
    fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
    }

    /// `repeated double [packed]`; nothing when empty, as proto3 does.
    fn packed_doubles(&mut self, field: u32, vs: &[f64]) {
        if vs.is_empty() {
            return;
        }
        self.key(field, 2);
        self.varint((vs.len() * 8) as u64);
        for v in vs {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// CRC-32C (Castagnoli, reflected polynomial `0x82F63B78`), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// The TFRecord checksum: CRC-32C rotated and offset, so that a CRC stored
/// inside checksummed data does not checksum to something trivial.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |t| t.as_secs_f64())
}

/// The host name for the event file name; TensorBoard only needs a stable
/// string, so any failure falls back to `localhost`.
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['/', '\\'], "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes TFRecord frames, checking both CRCs.
    fn records(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (len, rest) = bytes.split_at(8);
            let (len_crc, rest) = rest.split_at(4);
            assert_eq!(masked_crc32c(len).to_le_bytes(), len_crc);
            let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            let (data, rest) = rest.split_at(n);
            let (data_crc, rest) = rest.split_at(4);
            assert_eq!(masked_crc32c(data).to_le_bytes(), data_crc);
            out.push(data.to_vec());
            bytes = rest;
        }
        out
    }

    #[test]
    fn varint_encoding() {
        let mut pb = Pb::default();
        pb.varint(0);
        pb.varint(1);
        pb.varint(300);
        pb.varint(u64::MAX);
        assert_eq!(
            pb.0,
            [
                0, 1, 0xac, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
    }

    #[test]
    fn scalar_event_bytes() {
        let mut buf = Vec::new();
        {
            let mut tb = TensorBoard::from_writer(&mut buf);
            tb.scalar("a", 3, 1.5);
            tb.flush().unwrap();
        }
        let recs = records(&buf);
        assert_eq!(recs.len(), 2);
        // Header: wall_time (tag 0x09 + 8 bytes), file_version (0x1a, 13, ...).
        assert_eq!(recs[0][0], 0x09);
        assert_eq!(&recs[0][9..], b"\x1a\x0dbrain.Event:2");
        // Event{wall_time, step: 3, summary{value{tag: "a", simple_value: 1.5}}}.
        let mut value = vec![0x0a, 1, b'a', 0x15];
        value.extend_from_slice(&1.5f32.to_le_bytes());
        let mut tail = vec![
            0x10,
            3,
            0x2a,
            value.len() as u8 + 2,
            0x0a,
            value.len() as u8,
        ];
        tail.extend_from_slice(&value);
        assert_eq!(recs[1][0], 0x09);
        assert_eq!(&recs[1][9..], &tail[..]);
    }

    #[test]
    fn histogram_buckets() {
        let h = Histogram::of(&[0.0, 1.0, 2.0, 3.0, f64::NAN, f64::INFINITY]);
        assert_eq!(
            (h.min, h.max, h.num, h.sum, h.sum_squares),
            (0.0, 3.0, 4.0, 6.0, 14.0)
        );
        assert_eq!(h.bucket.len(), HISTOGRAM_BUCKETS);
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        assert_eq!(
            (h.bucket[0], h.bucket[10], h.bucket[20], h.bucket[29]),
            (1.0, 1.0, 1.0, 1.0)
        );
        assert_eq!(h.bucket_limit.last(), Some(&3.0));
        assert!(h.bucket_limit.windows(2).all(|w| w[0] < w[1]));

        let one = Histogram::of(&[2.5, 2.5]);
        assert_eq!((one.bucket_limit, one.bucket), (vec![2.5], vec![2.0]));

        let none = Histogram::of(&[f64::NAN]);
        assert_eq!(none.num, 0.0);
        assert!(none.bucket.is_empty());

        let wide = Histogram::of(&[-f64::MAX, f64::MAX]);
        assert_eq!((wide.bucket[0], wide.bucket[29]), (1.0, 1.0));
        assert!(wide.bucket_limit.iter().all(|x| x.is_finite()));
    }
}
