//! `loraloop backup` and `loraloop restore`: the database (an online, consistent copy)
//! and the adapter folders it names, in one folder; restored into this configuration's
//! data folder, the adapters' paths moved to where they now are.

use anyhow::Context;
use clap::Args;
use loraloop_core::{Config, Db};
use loraloop_web::files::RESTORED_PREFIX;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const DB_FILE: &str = "loraloop.db";
const ADAPTERS: &str = "adapters";
const MANIFEST: &str = "backup.json";

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The folder to write (must not exist). Default: <data_dir>/backups/loraloop-<UTC time>.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A folder `loraloop backup` wrote.
    #[arg(long)]
    pub from: PathBuf,
    /// Replace an existing database (stop `serve` and the bots first).
    #[arg(long)]
    pub force: bool,
}

fn adapters_dir(config: &Config) -> PathBuf {
    config.raw.data_dir.join(ADAPTERS)
}

pub async fn backup(config: &Config, args: &BackupArgs) -> anyhow::Result<ExitCode> {
    if !config.database_path.exists() {
        anyhow::bail!(
            "no database at {}: nothing to back up",
            config.database_path.display()
        );
    }
    let out = args.out.clone().unwrap_or_else(|| {
        config.raw.data_dir.join("backups").join(format!(
            "loraloop-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    if out.exists() {
        anyhow::bail!("{} exists: name a new folder with --out", out.display());
    }
    std::fs::create_dir_all(out.join(ADAPTERS))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let db = Db::open(&config.database_path).await?;
    db.backup_into(&out.join(DB_FILE))
        .await
        .context("the database copy failed")?;
    let mut copied = Vec::new();
    let mut missing = Vec::new();
    for a in db.list_adapters().await? {
        let src = PathBuf::from(&a.path);
        let Some(name) = src.file_name() else {
            continue;
        };
        let dst = out.join(ADAPTERS).join(name);
        if src.is_dir() {
            copy_dir(&src, &dst)?;
            copied.push(a.name);
        } else {
            missing.push(format!("{} ({})", a.name, a.path));
        }
    }
    let manifest = serde_json::json!({
        "created_at": chrono::Utc::now().to_rfc3339(),
        "database": config.database_path.display().to_string(),
        "adapters_dir": adapters_dir(config).display().to_string(),
        "adapters": copied,
    });
    std::fs::write(out.join(MANIFEST), serde_json::to_string_pretty(&manifest)?)?;
    println!(
        "backup written to {}: the database and {} adapter folder(s)",
        out.display(),
        copied.len()
    );
    for m in &missing {
        eprintln!("warning: adapter {m} has no folder to copy");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn restore(config: &Config, args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let from = &args.from;
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(from.join(MANIFEST)).with_context(|| {
            format!(
                "{} is not a loraloop backup (no {MANIFEST})",
                from.display()
            )
        })?,
    )?;
    let target = &config.database_path;
    if target.exists() && !args.force {
        anyhow::bail!(
            "a database exists at {}: stop serve and the bots, then pass --force to replace it",
            target.display()
        );
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // The copy is opened and checked beside the target first: a damaged or foreign file
    // in the backup fails here, and the database in place is untouched.
    let source = from.join(DB_FILE);
    let staged = PathBuf::from(format!("{}.restoring", target.display()));
    remove_with_sidecars(&staged);
    std::fs::copy(&source, &staged)
        .with_context(|| format!("cannot copy {} to {}", source.display(), staged.display()))?;
    let checked = async {
        let db = Db::open(&staged).await?;
        db.integrity_check().await?;
        anyhow::Ok(db)
    }
    .await;
    let db = match checked {
        Ok(db) => db,
        Err(e) => {
            remove_with_sidecars(&staged);
            return Err(e.context(format!(
                "{} is not a usable loraloop database; nothing was restored",
                source.display()
            )));
        }
    };
    // The backup's adapters go to a new folder that only the restored database names: the
    // folders the database in place names are never touched, so a restore stopped at any
    // point before the rename below leaves that database and its adapters whole (serve
    // removes the stopped restore's folder).
    let dir = restored_adapters_dir(config)?;
    let old = manifest["adapters_dir"].as_str().unwrap_or_default();
    let filled = async {
        let restored = copy_adapters(&from.join(ADAPTERS), &dir)?;
        let moved = if old.is_empty() {
            0
        } else {
            db.relocate_adapters(old, &absolute(&dir)?.display().to_string())
                .await?
        };
        anyhow::Ok((restored, moved))
    }
    .await;
    let (restored, moved) = match filled {
        Ok(counts) => counts,
        Err(e) => {
            let _ = db.close().await;
            remove_with_sidecars(&staged);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.context("nothing was restored"));
        }
    };
    db.audit("cli", "restore", Some(&from.display().to_string()), None)
        .await?;
    db.close().await?;
    // The old database's write-ahead log would be replayed into the restored file; the
    // rename then replaces the file itself in one step.
    let replaced = target.exists();
    remove_sidecars(target);
    std::fs::rename(&staged, target)
        .with_context(|| format!("cannot move {} to {}", staged.display(), target.display()))?;
    remove_with_sidecars(&staged);
    println!(
        "restored {} and {restored} adapter folder(s) into {} ({moved} adapter path(s) moved)",
        target.display(),
        dir.display()
    );
    if replaced {
        println!(
            "the adapter folders of the database it replaced are left in {}: remove those you no longer want",
            adapters_dir(config).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A new folder in the adapters folder for a restore's adapters: `restored-<UTC time>`.
fn restored_adapters_dir(config: &Config) -> anyhow::Result<PathBuf> {
    let parent = adapters_dir(config);
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
    for n in 1.. {
        let name = match n {
            1 => format!("{RESTORED_PREFIX}{stamp}"),
            n => format!("{RESTORED_PREFIX}{stamp}-{n}"),
        };
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    unreachable!("some numbered name is free")
}

/// Copy each adapter folder of a backup into `dir`; how many.
fn copy_adapters(from: &Path, dir: &Path) -> anyhow::Result<usize> {
    let mut copied = 0;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let e = e?;
        copy_dir(&e.path(), &dir.join(e.file_name()))?;
        copied += 1;
    }
    Ok(copied)
}

/// Remove a database's write-ahead log and shared-memory files, if present.
fn remove_sidecars(db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

/// Remove a database file and its sidecars, if present.
fn remove_with_sidecars(db: &Path) {
    let _ = std::fs::remove_file(db);
    remove_sidecars(db);
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn copy_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to)
                .with_context(|| format!("cannot copy {}", e.path().display()))?;
        }
    }
    Ok(())
}
