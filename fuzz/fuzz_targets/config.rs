//! The node configuration as the `tiercast` binary loads it:
//! `tiercast_edge::Config::load` (defaults < TOML file < `TIERCAST_*`
//! variables < `section.key=value` overrides, then validation) on hostile
//! input. It must never panic; it may only refuse.
//!
//! Each input is used twice:
//! - as the TOML config file (written to a temporary file, since `load`
//!   reads a path), with no variables or overrides;
//! - line by line as `KEY=VALUE` settings: `TIERCAST_*` keys as environment
//!   variables, any other as a `--set` override, with a valid token secret
//!   supplied first so that validation goes past it.
//!
//! A file that loads must load again, to the same config, once serialized.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tiercast_edge::Config;
use tiercast_fuzz::CONFIG_SECRET;

/// One file per fuzzing process (libFuzzer's -jobs/-fork run several).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("tiercast-fuzz-config-{}.toml", std::process::id()))
    })
}

fn load_file(text: &str) -> Option<Config> {
    let path = scratch();
    std::fs::write(path, text).expect("writing the scratch config file");
    let cfg = Config::load(Some(path), std::iter::empty(), &[]);
    let _ = std::fs::remove_file(path);
    cfg.ok()
}

fuzz_target!(
    init: tiercast_fuzz::write_seeds_if_asked(tiercast_fuzz::config_seeds),
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };

        if let Some(cfg) = load_file(text)
            && let Ok(again) = toml::to_string(&cfg)
        {
            let reloaded = load_file(&again)
                .unwrap_or_else(|| panic!("serialized config does not load:\n{again}"));
            assert_eq!(reloaded, cfg, "config changed through a round trip:\n{again}");
        }

        let mut vars = vec![(
            "TIERCAST_NODE__TOKEN_SECRET".to_owned(),
            CONFIG_SECRET.to_owned(),
        )];
        let mut overrides = Vec::new();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            if k.starts_with(tiercast_edge::config::ENV_PREFIX) {
                vars.push((k.to_owned(), v.to_owned()));
            } else {
                overrides.push((k.to_owned(), v.to_owned()));
            }
        }
        let _ = Config::load(None, vars, &overrides);
    }
);
