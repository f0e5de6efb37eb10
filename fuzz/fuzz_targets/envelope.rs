//! The `envelope` target: libFuzzer's input to `tiercast_fuzz_checks::envelope`
//! (fuzz/checks/src/lib.rs says what it checks).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercast_fuzz_checks as checks;

fuzz_target!(
    init: checks::write_seeds_if_asked(checks::envelope_seeds),
    |data: &[u8]| checks::envelope(data)
);
