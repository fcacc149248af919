//! A killed run resumes from its last checkpoint and ends exactly where an
//! uninterrupted run ends: same weights, bit for bit (CPU, deterministic).

mod support;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::stderr;

const CONFIG: &str = r#"
[run]
name = "r"
threads = 1
[data.synthclinic]
train = 40
test = 20
[student]
hidden_size = 32
layers = 2
heads = 2
kv_heads = 1
intermediate_size = 64
[[stages]]
kind = "pretrain"
name = "base"
[stages.sft]
epochs = 10
batch_size = 8
lr = 3e-3
checkpoint_every = 10
log_every = 5
"#;

fn write_config(dir: &Path) -> String {
    support::write_config(dir, CONFIG)
}

fn run_to_end(cfg: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", cfg])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn sigkill_mid_sft_then_resume_gives_identical_weights() {
    let straight = tempfile::tempdir().unwrap();
    let cfg = write_config(straight.path());
    run_to_end(&cfg);
    let model =
        |d: &Path| std::fs::read(d.join("runs/r/stages/0-base/model/model.safetensors")).unwrap();
    let reference = model(straight.path());

    let killed = tempfile::tempdir().unwrap();
    let cfg = write_config(killed.path());
    let ckpts = killed.path().join("runs/r/stages/0-base/checkpoints");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", &cfg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // Kill once a checkpoint past step 20 is complete: mid-run, between checkpoints.
    loop {
        let latest = std::fs::read_to_string(ckpts.join("latest")).unwrap_or_default();
        if latest.trim() >= "step-000030" {
            std::thread::sleep(Duration::from_millis(15));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stage = killed.path().join("runs/r/stages/0-base");
    assert!(
        !stage.join("result.json").exists(),
        "the kill came after the stage finished; nothing was tested"
    );
    let at_kill = std::fs::read_to_string(ckpts.join("latest")).unwrap();

    let o = Command::new(env!("CARGO_BIN_EXE_medzero"))
        .args(["run", &cfg])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "resuming from {}",
            ckpts.join(at_kill.trim()).display()
        )),
        "{err}"
    );
    assert_eq!(
        model(killed.path()),
        reference,
        "resumed weights differ from the uninterrupted run"
    );
    // Only complete checkpoints remain, at most `keep_checkpoints` of them.
    let names: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n == "latest" || n.starts_with("step-")),
        "{names:?}"
    );
    assert!(names.len() <= 3, "{names:?}");
}
