//! The local models folder: what is there and what each file's header says.

use crate::gguf::{GgufSummary, ModelError};
use std::path::{Path, PathBuf};

/// One entry of the models folder: its header summary, or why it could not be read.
#[derive(Debug)]
pub struct LocalModel {
    pub path: PathBuf,
    pub summary: Result<GgufSummary, ModelError>,
}

/// Every `*.gguf` file in `dir`, sorted by name. A missing folder is an empty list;
/// temporary files of an unfinished fetch (`.name.partial`) are skipped.
pub fn list_models(dir: &Path) -> std::io::Result<Vec<LocalModel>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|path| LocalModel {
            summary: GgufSummary::read(&path),
            path,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use candle_core::{Device, Tensor};

    /// A two-tensor GGUF: a Q4_1 [64, 32] matrix and an F32 [32] vector (candle's writer).
    fn write_tiny_gguf(path: &Path) {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 2048., &dev)
            .unwrap()
            .reshape((64, 32))
            .unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let n = QTensor::quantize(
            &Tensor::ones(32, candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let ctx = gguf_file::Value::U32(2048);
        let ft = gguf_file::Value::U32(3);
        let tmpl = gguf_file::Value::String("{{ messages }}".into());
        let tokens = gguf_file::Value::Array(
            ["a", "b", "c"]
                .iter()
                .map(|s| gguf_file::Value::String(s.to_string()))
                .collect(),
        );
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(
            &mut f,
            &[
                ("general.architecture", &arch),
                ("llama.context_length", &ctx),
                ("general.file_type", &ft),
                ("tokenizer.chat_template", &tmpl),
                ("tokenizer.ggml.tokens", &tokens),
            ],
            &[("blk.0.attn_q.weight", &q), ("blk.0.attn_norm.weight", &n)],
        )
        .unwrap();
    }

    #[test]
    fn the_header_summary_reports_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path);
        let s = GgufSummary::read(&path).unwrap();
        assert_eq!(s.architecture, "llama");
        // 64*32 + 32, counted by hand from the shapes written above.
        assert_eq!(s.parameters, 2080);
        assert_eq!(s.tensor_count, 2);
        assert_eq!(s.quantization, "Q4_1");
        assert_eq!(s.dtypes.get("Q4_1"), Some(&2048));
        assert_eq!(s.dtypes.get("F32"), Some(&32));
        assert_eq!(s.context_length, Some(2048));
        // No llama.vocab_size key: falls back to the token list's length.
        assert_eq!(s.vocab_size, Some(3));
        assert!(s.has_chat_template);
    }

    #[test]
    fn a_truncated_file_is_reported_corrupt_with_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 10).unwrap();
        let err = GgufSummary::read(&path).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ModelError::Corrupt { .. }), "{text}");
        // Not the default model's file: `models fetch` would not bring it back.
        assert!(
            text.contains("download or convert the model again"),
            "{text}"
        );
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn a_file_that_is_not_gguf_is_reported_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.gguf");
        std::fs::write(&path, b"<html>not a model</html>").unwrap();
        assert!(matches!(
            GgufSummary::read(&path).unwrap_err(),
            ModelError::Corrupt { .. }
        ));
    }

    #[test]
    fn listing_skips_partial_downloads_and_keeps_unreadable_files_as_errors() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_gguf(&dir.path().join("b.gguf"));
        std::fs::write(dir.path().join("a.gguf"), b"junk").unwrap();
        std::fs::write(dir.path().join(".b.gguf.x.partial"), b"junk").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let list = list_models(dir.path()).unwrap();
        let names: Vec<_> = list
            .iter()
            .map(|m| m.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.gguf", "b.gguf"]);
        assert!(list[0].summary.is_err());
        assert!(list[1].summary.is_ok());
        assert!(list_models(&dir.path().join("missing")).unwrap().is_empty());
    }
}
