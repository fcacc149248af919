//! Append-only trajectory storage: one JSON-lines file per stage.
//!
//! Online stages append each trajectory the moment it is produced, so that a
//! crash loses at most the record being written, a killed run resumes with
//! nothing lost and nothing duplicated, and a stage can be re-run from its
//! stored data or fed from files written elsewhere.
//!
//! The format is one [`Trajectory`] as compact JSON per `\n`-terminated line.
//! Blank lines are ignored (as the dataset loaders ignore them) and `\r\n`
//! endings read fine, so hand-made files work too. The rules a crash leaves
//! behind:
//!
//! - An append is a single write of the whole line, so an interrupted one
//!   leaves an *unterminated* last line that is not a trajectory: a torn tail.
//!   [`TrajectoryStore::open`] cuts it off and reports the bytes cut;
//!   [`read_trajectories`] skips it only when asked.
//! - An unterminated last line that *is* a trajectory is kept: the only
//!   prefix of a JSON object that parses is the whole object, so it lost
//!   nothing but its newline (or came from a tool that omits the final one).
//! - A line that ends in `\n` but is not a trajectory was not torn by an
//!   append: it is an error naming `file:line`, wherever it is, and nothing is
//!   changed.
//! - Ids are unique within a file: an append of a stored id is refused, and a
//!   file holding an id twice is an error.
//!
//! One writer per file: two stores appending to the same file would not see
//! each other's ids.

use medzero_envs::Trajectory;
use serde_json::error::Category;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The file an online stage stores its trajectories in, in its folder.
pub const STORE_FILE: &str = "trajectories.jsonl";

/// Appends between `fdatasync`s unless [`TrajectoryStore::with_sync_every`]
/// says otherwise: bounds what a power loss can take while keeping appends
/// cheap (a process crash loses nothing already appended either way).
pub const DEFAULT_SYNC_EVERY: usize = 64;

/// Why a store could not be opened, read or appended to.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The operating system refused: `action` says what was being done.
    #[error("{}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// A line is not a trajectory. `line` is 1-based, `column` in bytes as
    /// serde_json counts them; the message says whether the line was torn.
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A second line with an id already in the file.
    #[error(
        "{}:{line}: trajectory id {id:?} appears on an earlier line too; ids must be unique within a store: remove one of the two lines",
        .path.display()
    )]
    DuplicateId {
        path: PathBuf,
        line: usize,
        id: String,
    },
    /// The trajectory cannot be written as JSON that reads back; nothing was written.
    #[error("{}: cannot store trajectory {id:?}: {message}", .path.display())]
    Unstorable {
        path: PathBuf,
        id: String,
        message: String,
    },
    /// A failed append left bytes that could not be cut off; more appends
    /// would bury them in the middle of the file.
    #[error(
        "{}: an earlier append failed and its partial line could not be removed; reopen the store, which cuts it",
        .path.display()
    )]
    Poisoned { path: PathBuf },
}

/// An open store file, appended to one trajectory at a time.
///
/// Memory grows with the number of stored ids, not with the records. Drop
/// does not sync (it could not report a failure): call [`sync`](Self::sync)
/// when a stage ends.
pub struct TrajectoryStore {
    path: PathBuf,
    file: File,
    ids: HashSet<String>,
    /// Length of the file's complete lines: where a failed append is cut back to.
    end: u64,
    recovered_partial: Option<usize>,
    sync_every: usize,
    unsynced: usize,
    /// Serialisation buffer, reused so an append allocates nothing new.
    line: Vec<u8>,
    /// See [`StoreError::Poisoned`].
    poisoned: bool,
}

impl TrajectoryStore {
    /// Opens `path` for appending, creating it and its folder.
    ///
    /// A torn tail (see the module docs) is cut off, the cut is made durable,
    /// and its length is reported by [`recovered_partial`](Self::recovered_partial).
    /// Any other line that is not a trajectory, or a repeated id, is an error
    /// naming `file:line`, and the file is left as it was.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let io_error = |action, source| StoreError::Io {
            path: path.to_path_buf(),
            action,
            source,
        };
        let dir = parent_dir(path);
        std::fs::create_dir_all(dir).map_err(|e| io_error("create its folder", e))?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_error("open for appending", e))?;
        let mut ids = HashSet::new();
        let Scan { mut end, tail } = scan(path, &file, true, &mut ids, drop)?;
        let recovered_partial = match tail {
            Tail::Clean => None,
            Tail::Torn(bytes) => {
                file.set_len(end)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io_error("cut the torn last line", e))?;
                Some(bytes)
            }
            Tail::Unterminated => {
                file.write_all(b"\n")
                    .map_err(|e| io_error("end the last line", e))?;
                end += 1;
                None
            }
        };
        // A new file's name is durable only once its folder is.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("sync its folder", e))?;
        Ok(TrajectoryStore {
            path: path.to_path_buf(),
            file,
            ids,
            end,
            recovered_partial,
            sync_every: DEFAULT_SYNC_EVERY,
            unsynced: 0,
            line: Vec::new(),
            poisoned: false,
        })
    }

    /// `fdatasync` after every `n` appends; 0 leaves it to [`sync`](Self::sync)
    /// and the OS.
    pub fn with_sync_every(mut self, n: usize) -> Self {
        self.sync_every = n;
        self
    }

    /// Appends `t` as one line, written straight to the OS (there is no
    /// user-space buffer to lose). Returns `Ok(false)`, writing nothing, when
    /// its id is already stored: resumed work delivered twice.
    ///
    /// If the periodic sync fails, the record is still stored and counted
    /// (a retry returns `Ok(false)`), but a power loss could take it.
    pub fn append(&mut self, t: &Trajectory) -> Result<bool, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.path.clone(),
            });
        }
        if self.ids.contains(&t.id) {
            return Ok(false);
        }
        self.encode(t)?;
        if let Err(source) = self.file.write_all(&self.line) {
            // Remove what part of the line got written, so the next append
            // starts on a fresh line.
            self.poisoned = self.file.set_len(self.end).is_err();
            return Err(StoreError::Io {
                path: self.path.clone(),
                action: "append",
                source,
            });
        }
        self.end += self.line.len() as u64;
        self.ids.insert(t.id.clone());
        self.unsynced += 1;
        if self.sync_every > 0 && self.unsynced >= self.sync_every {
            self.sync()?;
        }
        Ok(true)
    }

    /// Serialises `t` plus its newline into `self.line`, refusing what would
    /// not read back: serde_json writes NaN and infinities as `null`, which
    /// would make the whole file unreadable.
    fn encode(&mut self, t: &Trajectory) -> Result<(), StoreError> {
        let unstorable = |message: String| StoreError::Unstorable {
            path: self.path.clone(),
            id: t.id.clone(),
            message,
        };
        if !t.reward.is_finite() {
            return Err(unstorable(format!(
                "reward is {}; JSON has no non-finite numbers",
                t.reward
            )));
        }
        if let Some((i, v)) = t.values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(unstorable(format!(
                "values[{i}] is {v}; JSON has no non-finite numbers"
            )));
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, t).map_err(|e| unstorable(e.to_string()))?;
        self.line.push(b'\n');
        Ok(())
    }

    /// Number of stored trajectories.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether a trajectory with this id is stored.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Bytes of a torn last line cut off by [`open`](Self::open), if any.
    pub fn recovered_partial(&self) -> Option<usize> {
        self.recovered_partial
    }

    /// Makes every appended record durable (`fdatasync`) now.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|source| StoreError::Io {
            path: self.path.clone(),
            action: "sync",
            source,
        })?;
        self.unsynced = 0;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every trajectory of a store file, or of any file in the same
/// format, in file order.
///
/// Strict: a line that is not a trajectory, or a repeated id, is an error
/// naming `file:line`; only a torn last line is skipped, and only when
/// `allow_partial_tail` is true (reading a store whose writer may have
/// crashed, or may still be writing).
pub fn read_trajectories(
    path: &Path,
    allow_partial_tail: bool,
) -> Result<Vec<Trajectory>, StoreError> {
    let file = File::open(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        action: "open for reading",
        source,
    })?;
    let mut out = Vec::new();
    scan(path, &file, allow_partial_tail, &mut HashSet::new(), |t| {
        out.push(t)
    })?;
    Ok(out)
}

/// How a file ends.
enum Tail {
    /// Empty, or the last line is terminated (or blank).
    Clean,
    /// The last line is a trajectory without its newline.
    Unterminated,
    /// The last line is unterminated and not a trajectory: this many bytes.
    Torn(usize),
}

struct Scan {
    /// Bytes before the torn tail, if any; the file's length otherwise.
    end: u64,
    tail: Tail,
}

/// Parses `file` line by line from the start, checking ids are unique
/// (adding them to `ids`) and handing each trajectory to `keep`. Reads one
/// line at a time, so memory stays at one record plus the ids.
fn scan(
    path: &Path,
    file: &File,
    allow_torn_tail: bool,
    ids: &mut HashSet<String>,
    mut keep: impl FnMut(Trajectory),
) -> Result<Scan, StoreError> {
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut end = 0u64;
    let mut line = 0;
    let mut tail = Tail::Clean;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                action: "read",
                source,
            })?;
        if n == 0 {
            break;
        }
        line += 1;
        // Only the file's last line can lack its newline.
        let terminated = buf.last() == Some(&b'\n');
        if buf.iter().all(u8::is_ascii_whitespace) {
            end += n as u64;
            continue;
        }
        match serde_json::from_slice::<Trajectory>(&buf) {
            Ok(t) => {
                if !ids.insert(t.id.clone()) {
                    return Err(StoreError::DuplicateId {
                        path: path.to_path_buf(),
                        line,
                        id: t.id,
                    });
                }
                keep(t);
                if !terminated {
                    tail = Tail::Unterminated;
                }
            }
            Err(_) if !terminated && allow_torn_tail => {
                tail = Tail::Torn(n);
                break;
            }
            Err(e) => return Err(malformed(path, line, &e, terminated)),
        }
        end += n as u64;
    }
    Ok(Scan { end, tail })
}

/// The error for a line that is not a trajectory, saying what to do about it.
fn malformed(path: &Path, line: usize, e: &serde_json::Error, terminated: bool) -> StoreError {
    let what = if e.classify() == Category::Eof {
        "the line ends in the middle of a record".to_string()
    } else {
        // serde_json appends " at line 1 column C"; the column is printed up front.
        let full = e.to_string();
        match full.rfind(" at line ") {
            Some(i) => full[..i].to_string(),
            None => full,
        }
    };
    let advice = if terminated {
        "the line is complete, so it is not the trace of an interrupted append: fix or remove it"
    } else {
        "the file ends inside this line, as an interrupted append leaves it: opening the store cuts it, or read with allow_partial_tail"
    };
    StoreError::Malformed {
        path: path.to_path_buf(),
        line,
        column: e.column(),
        message: format!("{what}; {advice}"),
    }
}

/// The folder holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
