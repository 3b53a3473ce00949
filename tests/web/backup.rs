//! `loraloop backup` while the server runs, then `loraloop restore` into another data
//! folder: the datasets, the adapters and which one is active come back, and it serves.

use crate::support::{active_adapter, start};
use serde_json::{Value, json};

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
    let (status, reply) = s2
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "loraloop", "messages": [{"role": "user", "content": "Zorblax?"}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        reply["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("adapter:{name}@")),
        "{reply}"
    );
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
