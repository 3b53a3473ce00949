//! The fingerprints that tie a run to its inputs: the base model's weights (adapters
//! record it, activation checks it) and the tokenized training data (resume checks it).

use crate::tokenize::TokenizedExample;
use std::path::{Path, PathBuf};

/// SHA-256 of a model's weights: the `.gguf` file, or a folder's `*.safetensors` files in
/// name order.
pub fn hash_model(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    for f in files.drain(..) {
        let mut file = std::fs::File::open(&f)?;
        std::io::copy(&mut file, &mut h)?;
    }
    Ok(hex::encode(h.finalize()))
}

/// A fingerprint of the tokenized training data (resume refuses other data).
pub(crate) fn data_fingerprint(examples: &[TokenizedExample]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in examples {
        h.update((e.tokens.len() as u64).to_le_bytes());
        for (t, w) in e.tokens.iter().zip(&e.weights) {
            h.update(t.to_le_bytes());
            h.update(w.to_le_bytes());
        }
        // Distilled or not (the distributions themselves follow from the base model).
        h.update((e.soft.len() as u64).to_le_bytes());
        if let Some((turn, of)) = e.rotation {
            h.update((turn as u64).to_le_bytes());
            h.update((of as u64).to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Why the adapter in `adapter_dir` must not run on the model at `model_path`, if its
/// `loraloop_adapter.json` says it was trained on another base model: its weights would
/// load (the shapes match) and produce garbage. An adapter without that file (one from
/// PEFT) is not checked. Hashes the model file only when there is something to compare.
pub fn base_model_mismatch(
    adapter_dir: &Path,
    model_path: &Path,
) -> std::io::Result<Option<String>> {
    let meta = match crate::checkpoint::AdapterMetadata::read(adapter_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(std::io::Error::other(format!(
                "{}: {e}",
                adapter_dir.join(crate::checkpoint::METADATA_FILE).display()
            )));
        }
    };
    if meta.base_model_hash == hash_model(model_path)? {
        return Ok(None);
    }
    Ok(Some(format!(
        "the adapter {} was trained on another base model ({}) than {}; it would produce garbage (pass the model it was trained on with --model)",
        adapter_dir.display(),
        meta.base_model,
        model_path.display()
    )))
}
