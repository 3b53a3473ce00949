//! Labelled data for classifiers: texts from JSONL (`{"text": ..., "label": ...}`) or CSV
//! (a header with `text` and `label` columns), images from class folders
//! (`DIR/train/CLASS/*.jpg|png|webp` with an optional `DIR/val/`, or `DIR/CLASS/*`). Labels may
//! be strings or integers; the label set is sorted (numerically when every label is an
//! integer) and stored with the model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Examples of either task, each with its label's index.
#[derive(Debug, Clone)]
pub enum Examples {
    Text(Vec<(String, usize)>),
    Images(Vec<(PathBuf, usize)>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Self::Text(v) => v.len(),
            Self::Images(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn label(&self, i: usize) -> usize {
        match self {
            Self::Text(v) => v[i].1,
            Self::Images(v) => v[i].1,
        }
    }

    fn pick(&self, idx: &[usize]) -> Self {
        match self {
            Self::Text(v) => Self::Text(idx.iter().map(|&i| v[i].clone()).collect()),
            Self::Images(v) => Self::Images(idx.iter().map(|&i| v[i].clone()).collect()),
        }
    }
}

/// Raw rows before the label set is known.
#[derive(Debug, Clone)]
pub enum Rows {
    Text(Vec<(String, String)>),
    Images(Vec<(PathBuf, String)>),
}

impl Rows {
    fn labels(&self) -> Vec<&str> {
        match self {
            Self::Text(v) => v.iter().map(|r| r.1.as_str()).collect(),
            Self::Images(v) => v.iter().map(|r| r.1.as_str()).collect(),
        }
    }

    /// With label indices from `labels`; a label not in it is an error.
    pub fn index(self, labels: &[String]) -> Result<Examples, String> {
        let of = |l: &str| -> Result<usize, String> {
            labels
                .iter()
                .position(|x| x == l)
                .ok_or_else(|| format!("label {l:?} is not one of the model's labels {labels:?}"))
        };
        Ok(match self {
            Self::Text(v) => Examples::Text(
                v.into_iter()
                    .map(|(t, l)| Ok((t, of(&l)?)))
                    .collect::<Result<_, String>>()?,
            ),
            Self::Images(v) => Examples::Images(
                v.into_iter()
                    .map(|(p, l)| Ok((p, of(&l)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// The sorted label set of some rows: numeric order when every label is an integer.
pub fn label_set<'a>(rows: impl IntoIterator<Item = &'a Rows>) -> Vec<String> {
    let all: BTreeSet<String> = rows
        .into_iter()
        .flat_map(|r| r.labels().into_iter().map(str::to_string))
        .collect();
    let mut labels: Vec<String> = all.into_iter().collect();
    if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
        labels.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    }
    labels
}

/// Whether a path holds images (a folder) rather than text rows (a file).
pub fn is_image_folder(path: &Path) -> bool {
    path.is_dir()
}

/// Read labelled rows: a folder of images or a JSONL / CSV file of texts. Returns the rows
/// and, for an image folder with its own `val/` (or `validation/`), those rows too.
pub fn read(path: &Path) -> Result<(Rows, Option<Rows>), String> {
    if is_image_folder(path) {
        return read_image_folders(path);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv") || e.eq_ignore_ascii_case("tsv"));
    let rows = if is_csv {
        parse_csv(
            &text,
            path.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("tsv")),
        )?
    } else {
        parse_jsonl(&text)?
    };
    if rows.is_empty() {
        return Err(format!("{} holds no examples", path.display()));
    }
    Ok((Rows::Text(rows), None))
}

fn label_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// JSONL rows `{"text": ..., "label": ...}`; every bad line is reported (up to 20).
pub fn parse_jsonl(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("line {n}: not JSON ({e})"));
                continue;
            }
        };
        let t = v.get("text").and_then(|t| t.as_str());
        let l = v.get("label").and_then(label_text);
        match (t, l) {
            (Some(t), Some(l)) if !t.trim().is_empty() => rows.push((t.to_string(), l)),
            (None, _) | (Some(_), Some(_)) => {
                problems.push(format!("line {n}: needs a non-empty string \"text\""))
            }
            (Some(_), None) => problems.push(format!(
                "line {n}: needs a \"label\" (a string or an integer)"
            )),
        }
    }
    problems_or(rows, problems)
}

/// CSV (or TSV) with a header naming `text` and `label` columns.
pub fn parse_csv(text: &str, tabs: bool) -> Result<Vec<(String, String)>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(if tabs { b'\t' } else { b',' })
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("the header: {e}"))?
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let (Some(tc), Some(lc)) = (col("text"), col("label")) else {
        return Err(format!(
            "the header needs \"text\" and \"label\" columns; it has {:?}",
            headers.iter().collect::<Vec<_>>()
        ));
    };
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let n = i + 2;
        match rec {
            Ok(r) => {
                let (t, l) = (
                    r.get(tc).unwrap_or("").trim(),
                    r.get(lc).unwrap_or("").trim(),
                );
                if t.is_empty() || l.is_empty() {
                    problems.push(format!("line {n}: empty text or label"));
                } else {
                    rows.push((t.to_string(), l.to_string()));
                }
            }
            Err(e) => problems.push(format!("line {n}: {e}")),
        }
    }
    problems_or(rows, problems)
}

fn problems_or<T>(rows: Vec<T>, problems: Vec<String>) -> Result<Vec<T>, String> {
    if problems.is_empty() {
        return Ok(rows);
    }
    let mut msg = format!("{} problem(s):", problems.len());
    for p in problems.iter().take(20) {
        msg.push_str("\n  ");
        msg.push_str(p);
    }
    if problems.len() > 20 {
        msg.push_str(&format!("\n  ... and {} more", problems.len() - 20));
    }
    Err(msg)
}

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

fn read_class_folders(dir: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let mut rows = Vec::new();
    let read =
        |d: &Path| std::fs::read_dir(d).map_err(|e| format!("cannot read {}: {e}", d.display()));
    let mut classes: Vec<PathBuf> = read(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    for class in classes {
        let label = class
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = read(&class)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
            })
            .collect();
        files.sort();
        rows.extend(files.into_iter().map(|f| (f, label.clone())));
    }
    Ok(rows)
}

fn read_image_folders(dir: &Path) -> Result<(Rows, Option<Rows>), String> {
    let train_dir = dir.join("train");
    let (train, val) = if train_dir.is_dir() {
        let val_dir = ["val", "validation", "valid"]
            .into_iter()
            .map(|v| dir.join(v))
            .find(|p| p.is_dir());
        let val = match val_dir {
            Some(v) => Some(read_class_folders(&v)?),
            None => None,
        };
        (read_class_folders(&train_dir)?, val)
    } else {
        (read_class_folders(dir)?, None)
    };
    if train.is_empty() {
        return Err(format!(
            "{} holds no images: expected CLASS/*.jpg|png|webp folders (or train/CLASS/...)",
            dir.display()
        ));
    }
    Ok((Rows::Images(train), val.map(Rows::Images)))
}

/// Hold out `fraction` (below 1) or `count` (1 and up) of the rows per label, the same
/// share of each class (at least one of a class with two or more), shuffled by `seed`.
pub fn split(rows: &Examples, val_set_size: f64, seed: u64) -> (Examples, Examples) {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = rows.len();
    let fraction = if val_set_size >= 1.0 {
        val_set_size / n.max(1) as f64
    } else {
        val_set_size
    };
    let mut by_label: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        by_label.entry(rows.label(i)).or_default().push(i);
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (_, mut idx) in by_label {
        idx.shuffle(&mut rng);
        let mut k = (idx.len() as f64 * fraction).round() as usize;
        if fraction > 0.0 && k == 0 && idx.len() >= 2 {
            k = 1;
        }
        val.extend_from_slice(&idx[..k.min(idx.len())]);
        train.extend_from_slice(&idx[k.min(idx.len())..]);
    }
    train.sort();
    val.sort();
    (rows.pick(&train), rows.pick(&val))
}

/// Training and held-out examples with their label set, ready for `train`.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub labels: Vec<String>,
    pub train: Examples,
    pub eval: Examples,
}

/// Read rows that must fit `task`, with a clear error when they do not.
pub fn read_for(
    path: &Path,
    task: loraloop_model::classify::Task,
) -> Result<(Rows, Option<Rows>), String> {
    use loraloop_model::classify::Task;
    let (rows, val) = read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match (&rows, task) {
        (Rows::Text(_), Task::TextClassification)
        | (Rows::Images(_), Task::ImageClassification) => Ok((rows, val)),
        (Rows::Text(_), Task::ImageClassification) => Err(format!(
            "{} is a file of texts, but this model classifies images (give a folder of class folders)",
            path.display()
        )),
        (Rows::Images(_), Task::TextClassification) => Err(format!(
            "{} is a folder of images, but this model classifies texts (give a JSONL or CSV file)",
            path.display()
        )),
    }
}

/// The data of a fine-tune: `data` (and `eval_data`, else the folder's own `val/`, else a
/// stratified `val_set_size` split), with the label set of all of it.
pub fn prepare(
    data: &Path,
    eval_data: Option<&Path>,
    task: loraloop_model::classify::Task,
    val_set_size: f64,
    seed: u64,
) -> Result<Prepared, String> {
    let (rows, own_val) = read_for(data, task)?;
    let eval_rows = match eval_data {
        Some(p) => Some(read_for(p, task)?.0),
        None => own_val,
    };
    let mut sets = vec![&rows];
    sets.extend(eval_rows.as_ref());
    let labels = label_set(sets);
    if labels.len() < 2 {
        return Err(format!(
            "{} has only one label ({labels:?}); a classifier needs two or more",
            data.display()
        ));
    }
    let all = rows.index(&labels)?;
    let (train, eval) = match eval_rows {
        Some(v) => (all, v.index(&labels)?),
        None => split(&all, val_set_size, seed),
    };
    if train.is_empty() {
        return Err(format!(
            "{}: no examples left to train on after the held-out split",
            data.display()
        ));
    }
    Ok(Prepared {
        labels,
        train,
        eval,
    })
}
