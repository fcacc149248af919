//! The trajectory store's crash and resume contract: round trips, duplicate
//! ids, torn tails cut at every byte, strict errors naming `file:line` that
//! leave the file untouched, and an append-rate printout.

use medzero::runtime::store::{StoreError, TrajectoryStore, read_trajectories};
use medzero_envs::{Provenance, Step, Trajectory};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

type TestResult = anyhow::Result<()>;

/// A trajectory whose text has escapes and multi-byte characters, so cuts
/// land inside them.
fn traj(i: usize) -> Trajectory {
    Trajectory {
        id: format!("t-{i}"),
        problem_id: format!("p-{}", i % 7),
        steps: vec![
            Step::new(format!(
                "Fever 38.5 °C, \"rigors\"\nβ-lactam allergy — case {i}"
            )),
            Step::new("The answer is B."),
        ],
        answer: (!i.is_multiple_of(3)).then(|| "B".to_string()),
        reward: i as f32 * 0.25 - 1.0,
        values: vec![0.5, i as f32 / 3.0],
        advantages: Vec::new(),
        policy_version: i as u64,
        provenance: Provenance {
            producer: format!("actor-{}", i % 4),
            stage: "mcts".into(),
            saw_gold: i.is_multiple_of(2),
        },
        tokens: vec![i as i64, 7],
        logprobs: vec![-0.5, i as f32 * -0.125],
        meta: serde_json::Value::Null,
    }
}

/// A record's line exactly as the store writes it.
fn line_of(t: &Trajectory) -> anyhow::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(t)?;
    line.push(b'\n');
    Ok(line)
}

fn lines(range: std::ops::Range<usize>) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for i in range {
        out.extend(line_of(&traj(i))?);
    }
    Ok(out)
}

fn append_raw(path: &Path, bytes: &[u8]) -> TestResult {
    fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(bytes)?;
    Ok(())
}

fn store_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("trajectories.jsonl")
}

#[test]
fn round_trip_keeps_every_record_in_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Folders that do not exist yet are created.
    let path = dir.path().join("run/stage-2/trajectories.jsonl");
    let expected: Vec<_> = (0..100).map(traj).collect();
    {
        let mut store = TrajectoryStore::open(&path)?;
        assert!(store.is_empty());
        for t in &expected {
            assert!(store.append(t)?);
        }
        assert_eq!(store.len(), 100);
        store.sync()?;
    }
    let store = TrajectoryStore::open(&path)?;
    assert_eq!(store.len(), 100);
    assert_eq!(store.recovered_partial(), None);
    assert_eq!(store.path(), path);
    assert!(store.contains("t-0") && store.contains("t-99"));
    assert!(!store.contains("t-100"));
    assert_eq!(read_trajectories(&path, false)?, expected);
    Ok(())
}

#[test]
fn duplicate_ids_are_refused_within_a_session_and_after_reopening() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let mut changed = traj(0);
    changed.reward = 1.0;
    {
        let mut store = TrajectoryStore::open(&path)?;
        assert!(store.append(&traj(0))?);
        assert!(!store.append(&changed)?, "same id appended twice");
        assert_eq!(store.len(), 1);
    }
    let mut store = TrajectoryStore::open(&path)?;
    assert!(
        !store.append(&changed)?,
        "stored id appended after reopening"
    );
    assert!(store.append(&traj(1))?);
    assert_eq!(store.len(), 2);
    // The first version is the one kept.
    assert_eq!(read_trajectories(&path, false)?, vec![traj(0), traj(1)]);
    Ok(())
}

#[test]
fn torn_tail_is_cut_on_open_and_appends_continue() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let good = lines(0..5)?;
    fs::write(&path, &good)?;
    let torn = &line_of(&traj(5))?[..60];
    append_raw(&path, torn)?;

    // Readers are strict unless told a writer may have crashed.
    match read_trajectories(&path, false) {
        Err(StoreError::Malformed { line: 6, .. }) => {}
        other => panic!("expected a torn line 6, got {other:?}"),
    }
    let complete: Vec<_> = (0..5).map(traj).collect();
    assert_eq!(read_trajectories(&path, true)?, complete);

    let mut store = TrajectoryStore::open(&path)?;
    assert_eq!(store.recovered_partial(), Some(torn.len()));
    assert_eq!(store.len(), 5);
    assert!(!store.contains("t-5"));
    assert_eq!(
        fs::read(&path)?,
        good,
        "the file is cut to its complete lines"
    );

    assert!(store.append(&traj(5))?);
    drop(store);
    let all: Vec<_> = (0..6).map(traj).collect();
    assert_eq!(read_trajectories(&path, false)?, all);
    assert_eq!(TrajectoryStore::open(&path)?.recovered_partial(), None);
    Ok(())
}

#[test]
fn every_cut_of_an_append_is_recovered() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let good = lines(0..3)?;
    let line = line_of(&traj(3))?;
    let json = &line[..line.len() - 1];
    // Every prefix but the whole object is a torn write, including cuts
    // inside escapes and multi-byte characters.
    for cut in 1..json.len() {
        fs::write(&path, [&good[..], &json[..cut]].concat())?;
        let store = TrajectoryStore::open(&path)?;
        assert_eq!(store.recovered_partial(), Some(cut), "cut at {cut}");
        assert_eq!(store.len(), 3, "cut at {cut}");
        assert_eq!(fs::read(&path)?, good, "cut at {cut}");
    }
    // The whole object lacks only its newline: it is kept and terminated.
    fs::write(&path, [&good[..], json].concat())?;
    let store = TrajectoryStore::open(&path)?;
    assert_eq!(store.recovered_partial(), None);
    assert_eq!(store.len(), 4);
    assert_eq!(fs::read(&path)?, [&good[..], &line[..]].concat());
    Ok(())
}

#[test]
fn a_file_without_a_final_newline_keeps_its_last_record() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let mut bytes = lines(0..2)?;
    bytes.pop();
    fs::write(&path, &bytes)?;
    let two: Vec<_> = (0..2).map(traj).collect();
    assert_eq!(read_trajectories(&path, false)?, two);

    let mut store = TrajectoryStore::open(&path)?;
    assert_eq!(store.len(), 2);
    assert!(store.append(&traj(2))?);
    drop(store);
    let three: Vec<_> = (0..3).map(traj).collect();
    assert_eq!(read_trajectories(&path, false)?, three);
    Ok(())
}

#[test]
fn a_complete_invalid_last_line_is_an_error_not_a_torn_tail() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let line = line_of(&traj(3))?;
    let bytes = [&lines(0..3)?[..], &line[..40], b"\n"].concat();
    fs::write(&path, &bytes)?;

    for result in [
        TrajectoryStore::open(&path).map(|s| s.len()),
        read_trajectories(&path, true).map(|t| t.len()),
    ] {
        let err = result
            .err()
            .ok_or_else(|| anyhow::anyhow!("a complete bad line was accepted"))?;
        let message = err.to_string();
        assert!(
            message.contains(&format!("{}:4:", path.display())),
            "{message}"
        );
        assert!(message.contains("fix or remove it"), "{message}");
    }
    assert_eq!(fs::read(&path)?, bytes, "nothing was cut");
    Ok(())
}

#[test]
fn a_malformed_middle_line_names_file_and_line_and_changes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let good = lines(0..5)?;
    let starts: Vec<_> = std::iter::once(0)
        .chain(
            good.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    // Line 3: broken syntax; then valid JSON that is not a trajectory.
    for bad in [&b"{\"id\": \"t-2\",, }\n"[..], b"{\"id\": \"t-2\"}\n"] {
        let bytes = [&good[..starts[2]], bad, &good[starts[3]..]].concat();
        fs::write(&path, &bytes)?;
        for result in [
            TrajectoryStore::open(&path).map(|s| s.len()),
            read_trajectories(&path, false).map(|t| t.len()),
            read_trajectories(&path, true).map(|t| t.len()),
        ] {
            match result {
                Err(err @ StoreError::Malformed { line: 3, .. }) => {
                    let message = err.to_string();
                    assert!(
                        message.starts_with(&format!("{}:3:", path.display())),
                        "{message}"
                    );
                }
                other => panic!("expected an error on line 3, got {other:?}"),
            }
        }
        assert_eq!(fs::read(&path)?, bytes, "the store was modified");
    }
    Ok(())
}

#[test]
fn a_file_holding_an_id_twice_is_an_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let bytes = [lines(0..2)?, line_of(&traj(0))?].concat();
    fs::write(&path, &bytes)?;
    for result in [
        TrajectoryStore::open(&path).map(|s| s.len()),
        read_trajectories(&path, false).map(|t| t.len()),
    ] {
        match result {
            Err(err @ StoreError::DuplicateId { line: 3, .. }) => {
                let message = err.to_string();
                assert!(
                    message.contains(&format!("{}:3:", path.display())),
                    "{message}"
                );
                assert!(message.contains("\"t-0\""), "{message}");
            }
            other => panic!("expected a duplicate on line 3, got {other:?}"),
        }
    }
    assert_eq!(fs::read(&path)?, bytes);
    Ok(())
}

#[test]
fn blank_lines_and_crlf_endings_are_read() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let mut first = line_of(&traj(0))?;
    first.pop();
    let bytes = [&b"\n"[..], &first, b"\r\n \n", &line_of(&traj(1))?, b"\n"].concat();
    fs::write(&path, bytes)?;
    assert_eq!(read_trajectories(&path, false)?, vec![traj(0), traj(1)]);
    let mut store = TrajectoryStore::open(&path)?;
    assert_eq!(store.len(), 2);
    assert!(store.append(&traj(2))?);
    drop(store);
    assert_eq!(
        read_trajectories(&path, false)?,
        vec![traj(0), traj(1), traj(2)]
    );
    Ok(())
}

#[test]
fn unusable_paths_are_errors_naming_the_path() -> TestResult {
    let dir = tempfile::tempdir()?;
    let blocker = dir.path().join("blocker");
    fs::write(&blocker, b"a regular file")?;
    let path = blocker.join("trajectories.jsonl");
    match TrajectoryStore::open(&path) {
        Err(err @ StoreError::Io { .. }) => {
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        Err(other) => panic!("expected an I/O error, got {other:?}"),
        Ok(_) => panic!("opened a store under a regular file"),
    }
    let missing = dir.path().join("missing.jsonl");
    match read_trajectories(&missing, true) {
        Err(err @ StoreError::Io { .. }) => {
            let message = err.to_string();
            assert!(
                message.contains(&missing.display().to_string()),
                "{message}"
            );
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn an_empty_file_opens_as_an_empty_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    fs::write(&path, b"")?;
    let store = TrajectoryStore::open(&path)?;
    assert!(store.is_empty());
    assert_eq!(store.len(), 0);
    assert_eq!(store.recovered_partial(), None);
    assert!(read_trajectories(&path, false)?.is_empty());
    Ok(())
}

#[test]
fn non_finite_numbers_are_refused_before_writing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = store_path(&dir);
    let mut store = TrajectoryStore::open(&path)?;
    let mut nan_reward = traj(0);
    nan_reward.reward = f32::NAN;
    let mut infinite_value = traj(1);
    infinite_value.values[1] = f32::INFINITY;
    for (t, field) in [(&nan_reward, "reward"), (&infinite_value, "values[1]")] {
        match store.append(t) {
            Err(err @ StoreError::Unstorable { .. }) => {
                let message = err.to_string();
                assert!(message.contains(field), "{message}");
                assert!(message.contains(&format!("{:?}", t.id)), "{message}");
            }
            other => panic!("expected {field} to be refused, got {other:?}"),
        }
        assert!(!store.contains(&t.id));
    }
    assert_eq!(fs::metadata(&path)?.len(), 0, "nothing was written");
    // The store stays usable.
    assert!(store.append(&traj(2))?);
    drop(store);
    assert_eq!(read_trajectories(&path, false)?, vec![traj(2)]);
    Ok(())
}

/// Not a timed assertion: prints records/s for `cargo test -- --nocapture`.
#[test]
fn append_rate() -> TestResult {
    let dir = tempfile::tempdir()?;
    let small = |i: usize| Trajectory {
        id: format!("r-{i}"),
        problem_id: format!("p-{i}"),
        steps: vec![Step::new("The answer is A.")],
        answer: Some("A".into()),
        reward: 1.0,
        values: Vec::new(),
        advantages: Vec::new(),
        policy_version: 1,
        provenance: Provenance {
            producer: "actor-0".into(),
            ..Provenance::default()
        },
        tokens: Vec::new(),
        logprobs: Vec::new(),
        meta: serde_json::Value::Null,
    };
    for (sync_every, n) in [(0, 10_000), (64, 10_000), (1, 1_000)] {
        let path = dir.path().join(format!("rate-{sync_every}.jsonl"));
        let records: Vec<_> = (0..n).map(small).collect();
        let mut store = TrajectoryStore::open(&path)?.with_sync_every(sync_every);
        let start = Instant::now();
        for t in &records {
            assert!(store.append(t)?);
        }
        store.sync()?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "append rate, sync_every {sync_every}: {n} records in {secs:.3} s = {:.0} records/s",
            n as f64 / secs
        );
        drop(store);
        let reopened = TrajectoryStore::open(&path)?;
        assert_eq!(reopened.len(), n);
    }
    Ok(())
}
