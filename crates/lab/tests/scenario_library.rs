//! Every scenario in `scenarios/` parses and validates (no root needed): a library file
//! that `kvmha lab run` would refuse is caught before anyone runs it.

use std::path::PathBuf;

use kvmha_lab::scenario::Scenario;

fn library() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scenarios/")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_library_scenario_parses_and_says_what_it_teaches() {
    let files = library();
    assert!(files.len() >= 17, "the library of issue 7 has 17 scenarios, found {}", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let scenario = Scenario::parse(&text).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
        assert!(
            text.starts_with("# What an operator learns:"),
            "{} must open with what an operator learns from it",
            file.display()
        );
        assert!(!scenario.description.is_empty(), "{} has no description", file.display());
    }
}
