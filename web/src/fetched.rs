//! A dataset fetched for a job (`dataset_url`), whatever it was read from.

/// A dataset read from a URL: its bytes, a dataset name from its file name, and the URL
/// as it may be stored (no user name, password or query).
#[derive(Debug)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub name: String,
    pub source: String,
}

/// A dataset name from the last part of a path or URL path.
pub fn file_name(s: &str) -> String {
    let last = s.rsplit(['/', '\\']).next().unwrap_or("dataset");
    let stem = last.split(['?', '#']).next().unwrap_or(last);
    let stem = stem
        .strip_suffix(".jsonl")
        .or_else(|| stem.strip_suffix(".json"))
        .unwrap_or(stem);
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches(['.', '-']).to_string();
    if clean.is_empty() {
        "dataset".to_string()
    } else {
        clean.chars().take(90).collect()
    }
}
