use super::loraloop;

#[test]
fn config_check_prints_the_effective_configuration_with_secrets_redacted_even_in_trace_logs() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        ("TELEGRAM_BOT_TOKEN", "123456:TG-SECRET-aaaaaaaaaaaaaaaa"),
        ("DISCORD_BOT_TOKEN", "DISCORD-SECRET-bbbbbbbbbbbbbbbb"),
        ("LORALOOP_API_KEY", "API-SECRET-cccccccccccccccc"),
        ("LORALOOP_ADMIN_PASSWORD", "ADMIN-SECRET-dddddddddddd"),
    ];
    let out = loraloop(dir.path())
        .args(["-vv", "config", "check"])
        .envs(secrets)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The trace log really contains the configuration dump (so the check below means something).
    assert!(stderr.contains("effective configuration"), "{stderr}");
    for (var, value) in secrets {
        assert!(!stdout.contains(value), "{var} leaked to stdout");
        assert!(!stderr.contains(value), "{var} leaked to the log");
    }
    assert!(
        stdout.contains("telegram_bot_token: '[redacted] (from TELEGRAM_BOT_TOKEN)'"),
        "{stdout}"
    );
    assert!(stdout.contains("port: 8080"), "{stdout}");
}

#[test]
fn config_check_names_the_invalid_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("custom.yaml"), "generation:\n  top_p: 7\n").unwrap();
    let out = loraloop(dir.path())
        .args(["config", "check", "--config", "custom.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`generation.top_p`"), "{stderr}");
    assert!(stderr.contains("custom.yaml"), "{stderr}");
}

#[test]
fn the_config_file_comes_from_loraloop_config_and_env_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("other.yaml"),
        "server:\n  port: 9000\n  host: 0.0.0.0\n",
    )
    .unwrap();
    let out = super::stdout_of(
        loraloop(dir.path())
            .args(["config", "check"])
            .env("LORALOOP_CONFIG", "other.yaml")
            .env("LORALOOP_SERVER__PORT", "9001"),
    );
    assert!(out.contains("config_file: other.yaml"), "{out}");
    assert!(out.contains("port: 9001"), "{out}");
    assert!(out.contains("host: 0.0.0.0"), "{out}");
}
