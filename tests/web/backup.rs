//! `loraloop backup` while the server runs, then `loraloop restore` into another data
//! folder: the datasets, the adapters and which one is active come back, and it serves.

use crate::support::{active_adapter, answers_with_adapter, start};
use serde_json::Value;

fn loraloop(data_dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loraloop"));
    for (key, _) in std::env::vars() {
        if key.starts_with("LORALOOP_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LORALOOP_DATA_DIR", data_dir);
    cmd
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[tokio::test]
async fn a_backup_taken_while_serving_restores_into_another_folder_and_serves() {
    let s = start(true, &[]).await;
    let (_, _, name) = active_adapter(&s).await;
    let data = s.dir.path().join("data");
    // (Outside the server's folder, which goes when it stops.)
    let restored = tempfile::tempdir().unwrap();
    let out = restored.path().join("backup-1");
    let said = run(loraloop(&data).args(["backup", "--out"]).arg(&out));
    assert!(said.contains("1 adapter folder(s)"), "{said}");
    // Taken again into the same folder: refused, nothing overwritten.
    let again = loraloop(&data)
        .args(["backup", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let before = s.get_json("/api/v1/datasets").await;
    s.stop().await;

    let data2 = restored.path().join("data");
    let said = run(loraloop(&data2).args(["restore", "--from"]).arg(&out));
    assert!(said.contains("1 adapter path(s) moved"), "{said}");
    // Restoring over a database needs --force.
    let over = loraloop(&data2)
        .args(["restore", "--from"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!over.status.success());
    // A damaged backup, even with --force, is refused before it replaces anything: the
    // database restored above stays (the server below reads it).
    let bad = restored.path().join("damaged");
    std::fs::create_dir_all(bad.join("adapters")).unwrap();
    std::fs::copy(out.join("backup.json"), bad.join("backup.json")).unwrap();
    let whole = std::fs::read(out.join("loraloop.db")).unwrap();
    for damaged in [b"garbage\n".to_vec(), whole[..whole.len() / 2].to_vec()] {
        std::fs::write(bad.join("loraloop.db"), &damaged).unwrap();
        let refused = loraloop(&data2)
            .args(["restore", "--force", "--from"])
            .arg(&bad)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{said}");
        assert!(said.contains("is not a usable loraloop database"), "{said}");
        assert!(!data2.join("loraloop.db.restoring").exists());
    }

    let data2_str = data2.display().to_string();
    let s2 = start(false, &[("LORALOOP_DATA_DIR", &data2_str)]).await;
    assert_eq!(
        s2.get_json("/api/v1/datasets").await["data"],
        before["data"]
    );
    let adapters = s2.get_json("/api/v1/adapters").await;
    assert_eq!(adapters["data"][0]["name"], name.as_str());
    assert_eq!(adapters["data"][0]["active"], true, "{adapters}");
    let row = &s2.server.state.db.list_adapters().await.unwrap()[0];
    assert!(row.path.starts_with(&data2_str), "{}", row.path);
    answers_with_adapter(&s2, &name).await;
    let health: Value = s2
        .http
        .get(s2.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    s2.stop().await;
}

/// Every file below `dir`, by its path relative to `dir`, with its bytes.
fn files_below(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                files.insert(p.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    files
}

/// Whether a file `name` below `dir` is shorter than `full` bytes (being copied).
fn files_being_written(dir: &std::path::Path, name: &str, full: u64) -> bool {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.file_name().is_some_and(|n| n == name)
                && e.metadata().is_ok_and(|m| m.len() < full)
            {
                return true;
            }
        }
    }
    false
}

/// The folders `restore` made in `data`'s adapters folder.
fn restore_folders(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(data.join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("restored-")
        })
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn a_restore_killed_while_copying_adapters_leaves_the_installation_it_replaces_whole() {
    let s = start(true, &[]).await;
    let (_, _, name) = active_adapter(&s).await;
    let data = s.dir.path().join("data");
    // Enough bytes in the adapter's folder that the restore below is still copying them
    // when it is killed.
    let row = &s.server.state.db.list_adapters().await.unwrap()[0];
    std::fs::write(
        std::path::Path::new(&row.path).join("padding.bin"),
        vec![7u8; 256 << 20],
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("backup");
    run(loraloop(&data).args(["backup", "--out"]).arg(&out));
    s.stop().await;

    // The installation the killed restore would replace: the backup restored once.
    let live = root.path().join("data");
    run(loraloop(&live).args(["restore", "--from"]).arg(&out));
    let db_before = std::fs::read(live.join("loraloop.db")).unwrap();
    let adapters_before = files_below(&live.join("adapters"));
    let folders_before = restore_folders(&live);

    let mut restore = loraloop(&live)
        .args(["restore", "--force", "--from"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed while some padding.bin in the adapters folder is part written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let copying = files_being_written(&live.join("adapters"), "padding.bin", 256 << 20);
        if copying {
            break;
        }
        assert!(
            restore.try_wait().unwrap().is_none(),
            "the restore ended before it could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the restore never began to copy"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    restore.kill().unwrap();
    let status = restore.wait().unwrap();
    assert!(
        !status.success(),
        "the restore finished before the kill: {status}"
    );

    // The database in place and every adapter file it names are as they were.
    assert_eq!(std::fs::read(live.join("loraloop.db")).unwrap(), db_before);
    let stopped: Vec<_> = restore_folders(&live)
        .into_iter()
        .filter(|d| !folders_before.contains(d))
        .collect();
    let mut adapters_after = files_below(&live.join("adapters"));
    adapters_after.retain(|p, _| {
        !stopped
            .iter()
            .any(|d| live.join("adapters").join(p).starts_with(d))
    });
    assert!(adapters_after == adapters_before, "an adapter file changed");

    // Serving removes what the stopped restore copied, and the adapter still answers.
    let live_str = live.display().to_string();
    let s2 = start(false, &[("LORALOOP_DATA_DIR", &live_str)]).await;
    assert_eq!(restore_folders(&live), folders_before);
    answers_with_adapter(&s2, &name).await;
    s2.stop().await;
}
