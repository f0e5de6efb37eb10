//! Every input committed under `fuzz/corpus/`, and every seed, through the
//! check of its target: the fuzzers' findings, replayed on each test run.
//! A corpus that is missing or empty fails the test, so a renamed target
//! or a lost directory cannot make it pass by checking nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use tiercast_fuzz_checks::{Check, TARGETS, seeds_of};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target)
}

/// The files of a corpus directory, sorted so that a failure names the same
/// input on every run.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("the corpus {} cannot be read: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on `data`; on a panic, the input's name and bytes (base64,
/// as `scripts/fuzz.sh` prints a crash) and the panic's message.
fn replay(target: &str, name: &str, check: Check, data: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| check(data))).map_err(|panic| {
        use base64::Engine as _;
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        format!(
            "{target}: {name} ({} bytes, base64 {}): {msg}",
            data.len(),
            base64::engine::general_purpose::STANDARD.encode(data)
        )
    })
}

#[test]
fn every_committed_corpus_input_and_seed_passes_its_targets_check() {
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        let files = inputs(&corpus_dir(target));
        assert!(
            files.len() >= 10,
            "the corpus of {target} has {} inputs: is fuzz/corpus/{target} there?",
            files.len()
        );
        for path in &files {
            let data = std::fs::read(path).expect("reading a corpus input");
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            failures.extend(replay(target, &name, check, &data).err());
        }
        let seeds = seeds_of(target).expect("every target has seeds");
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for (name, data) in seeds {
            failures.extend(replay(target, &format!("seed-{name}"), check, &data).err());
        }
        println!("{target}: {} corpus inputs replayed", files.len());
    }
    assert!(
        failures.is_empty(),
        "{} inputs failed their check:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The replay can fail: a check that panics is reported with its input,
/// not swallowed by the loop.
#[test]
fn a_failing_check_is_reported_with_its_input() {
    fn refuses_all(_: &[u8]) {
        panic!("no input is acceptable");
    }
    let err = replay("test", "one", refuses_all, b"\x01\x02").unwrap_err();
    assert!(err.contains("test: one (2 bytes, base64 AQI=)"), "{err}");
    assert!(err.contains("no input is acceptable"), "{err}");
}
