//! The fuzz targets' corpora (`fuzz/corpus/`) and every input a fuzzer
//! found a failure with (`fuzz/regressions/`), replayed through the same
//! entry points the targets call, so that what was fixed stays fixed
//! without a fuzzer on the machine.

use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("mqtt_packets", umbra_broker::fuzzing::mqtt_packets),
    ("aws_topic", umbra_broker::fuzzing::aws_topic),
    ("shadow_update", umbra_shadow::fuzzing::shadow_update),
    ("search_query", umbra_shadow::fuzzing::search_query),
    ("change_fields", umbra_shadow::fuzzing::change_fields),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_passes_its_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in TARGETS {
        let corpus = inputs(&fuzz.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty");
        for path in corpus
            .into_iter()
            .chain(inputs(&fuzz.join("regressions").join(name)))
        {
            let data = std::fs::read(&path).expect("input");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("{name} fails on {}", path.display());
            }
        }
    }
}
