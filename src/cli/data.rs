//! `loraloop data ...`: import, validate, list, show, export and delete datasets.

use super::{BuildArgs, DataCommand, ExportArgs, ImportArgs, NameVersion, ShowArgs, ValidateArgs};
use crate::progress::Progress;
use anyhow::{Context, anyhow};
use loraloop_core::storage::{Dataset, DatasetInsert, NewDataset, validate_dataset_name};
use loraloop_core::{Config, Db};
use loraloop_trainer::config::Objective;
use loraloop_trainer::dataset::{
    self, Format, MAX_LISTED_PROBLEMS, ParseOutcome, content_hash, format_problems,
};
use loraloop_trainer::preference::{PreferenceImport, preference_import};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

pub async fn run(config: &Config, cmd: DataCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DataCommand::Import(args) => import(config, &args).await,
        DataCommand::Validate(args) => validate(&args).await,
        DataCommand::List(flag) => list(config, flag.json).await,
        DataCommand::Show(args) => show(config, &args).await,
        DataCommand::Export(args) => export(config, &args).await,
        DataCommand::Delete(args) => delete(config, &args).await,
        DataCommand::Build(args) => build(config, &args).await,
    }
}

fn parse_format(format: Option<&str>) -> anyhow::Result<Option<Format>> {
    format
        .map(|f| f.parse::<Format>().map_err(|e| anyhow!("--format: {e}")))
        .transpose()
}

/// Read and parse a dataset file off the async workers, printing its warnings.
pub(super) async fn read_and_parse(
    file: &Path,
    format: Option<Format>,
) -> anyhow::Result<ParseOutcome> {
    let bytes = tokio::fs::read(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    parse_bytes(file, bytes, format).await
}

/// Parse a dataset file's bytes off the async workers, printing its warnings.
async fn parse_bytes(
    file: &Path,
    bytes: Vec<u8>,
    format: Option<Format>,
) -> anyhow::Result<ParseOutcome> {
    let outcome = tokio::task::spawn_blocking(move || dataset::parse_jsonl(&bytes, format))
        .await
        .context("the parser panicked")?;
    if !outcome.warnings.is_empty() {
        eprintln!(
            "{} warning(s) in {}:\n{}",
            outcome.warnings.len(),
            file.display(),
            format_problems(&outcome.warnings, MAX_LISTED_PROBLEMS)
        );
    }
    Ok(outcome)
}

/// Print a file's errors; true when there were any.
pub(super) fn report_errors(file: &Path, outcome: &ParseOutcome, action: &str) -> bool {
    if outcome.is_ok() {
        return false;
    }
    eprintln!(
        "error: {} has {} problem(s); {action}:\n{}",
        file.display(),
        outcome.errors.len(),
        format_problems(&outcome.errors, MAX_LISTED_PROBLEMS)
    );
    true
}

/// `data import` of a DPO or KTO file: every problem, or the rows stored as a preference
/// dataset.
async fn import_preferences(
    config: &Config,
    args: &ImportArgs,
    parsed: PreferenceImport,
) -> anyhow::Result<ExitCode> {
    let Some((kind, lines)) = preference_rows(&args.file, parsed, "nothing was imported") else {
        return Ok(ExitCode::FAILURE);
    };
    let source = file_name(&args.file);
    let db = open_db(config).await?;
    let inserted = db
        .insert_dataset(&NewDataset {
            assistant_id: None,
            name: &args.name,
            format: kind.as_str(),
            source: &source,
            content_hash: &dataset::lines_hash(&lines),
            kind,
            lines: &lines,
            ..Default::default()
        })
        .await?;
    let rows = format!("{} row(s)", inserted.dataset().kind);
    say_imported(&inserted, &args.file, &rows, "");
    Ok(ExitCode::SUCCESS)
}

/// A preference file's rows, or None once its problems are printed.
fn preference_rows(
    file: &Path,
    parsed: PreferenceImport,
    action: &str,
) -> Option<(loraloop_trainer::config::Objective, Vec<String>)> {
    parsed
        .map_err(|problems| {
            eprintln!(
                "error: {} has {} problem(s); {action}:\n{}",
                file.display(),
                problems.len(),
                format_problems(&problems, MAX_LISTED_PROBLEMS)
            );
        })
        .ok()
}

/// The name a dataset's source records: the imported file's name.
fn file_name(file: &Path) -> String {
    file.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What an import stored (or that it stored nothing new).
fn say_imported(inserted: &DatasetInsert, file: &Path, rows: &str, detail: &str) {
    match inserted {
        DatasetInsert::Created(d) => println!(
            "imported {} {rows} from {} as {} v{} ({detail}sha256 {})",
            d.example_count,
            file.display(),
            d.name,
            d.version,
            &d.content_hash[..12]
        ),
        DatasetInsert::Unchanged(d) => println!(
            "unchanged: {} v{} already holds this content (sha256 {}); no new version",
            d.name,
            d.version,
            &d.content_hash[..12]
        ),
    }
}

async fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let bytes = tokio::fs::read(&args.file)
        .await
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    // Read as `data import` reads it: DPO and KTO rows first, else chat examples.
    if let Some(parsed) = preference_import(&bytes, args.format.as_deref()) {
        let action = "it cannot be imported as it is";
        let Some((kind, lines)) = preference_rows(&args.file, parsed, action) else {
            return Ok(ExitCode::FAILURE);
        };
        println!(
            "{}: {} valid {} row(s)",
            args.file.display(),
            lines.len(),
            kind.as_str()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let format = parse_format(args.format.as_deref())?;
    let outcome = parse_bytes(&args.file, bytes, format).await?;
    if report_errors(&args.file, &outcome, "it cannot be imported as it is") {
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "{}: {} valid example(s), format {}",
        args.file.display(),
        outcome.examples.len(),
        outcome.format.map_or("unknown", Format::as_str)
    );
    Ok(ExitCode::SUCCESS)
}

async fn import(config: &Config, args: &ImportArgs) -> anyhow::Result<ExitCode> {
    validate_dataset_name(&args.name)?;
    let bytes = tokio::fs::read(&args.file)
        .await
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    if let Some(parsed) = preference_import(&bytes, args.format.as_deref()) {
        return import_preferences(config, args, parsed).await;
    }
    let format = parse_format(args.format.as_deref())?;
    let outcome = parse_bytes(&args.file, bytes, format).await?;
    if report_errors(&args.file, &outcome, "nothing was imported") {
        return Ok(ExitCode::FAILURE);
    }
    let format_name = outcome.format.map_or("unknown", Format::as_str);
    let hash = content_hash(&outcome.examples);
    let source = file_name(&args.file);
    let db = open_db(config).await?;
    let progress = std::sync::Mutex::new(Progress::new(
        "importing",
        outcome.examples.len() as u64,
        false,
    ));
    let inserted = db
        .insert_dataset_with_progress(
            &NewDataset {
                assistant_id: None,
                name: &args.name,
                format: format_name,
                source: &source,
                content_hash: &hash,
                examples: &outcome.examples,
                ..Default::default()
            },
            &|done| {
                if let Ok(mut p) = progress.lock() {
                    p.set(done as u64);
                }
            },
        )
        .await?;
    if let Ok(p) = progress.into_inner() {
        p.finish();
    }
    say_imported(
        &inserted,
        &args.file,
        "example(s)",
        &format!("format {format_name}, "),
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn open_db(config: &Config) -> anyhow::Result<Db> {
    Db::open(&config.database_path).await.with_context(|| {
        format!(
            "cannot open the database {}",
            config.database_path.display()
        )
    })
}

async fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let datasets = open_db(config).await?.list_datasets().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&datasets)?);
    } else if datasets.is_empty() {
        println!("no datasets yet; import one with `loraloop data import FILE.jsonl --name NAME`");
    } else {
        println!(
            "{:<24} {:>7} {:>9} {:<4} {:<18} {:<12} {:<24} SOURCE",
            "NAME", "VERSION", "ROWS", "KIND", "FORMAT", "SHA256", "CREATED"
        );
        for d in datasets {
            println!(
                "{:<24} {:>7} {:>9} {:<4} {:<18} {:<12} {:<24} {}",
                d.name,
                d.version,
                d.example_count,
                d.kind,
                d.format,
                &d.content_hash[..12.min(d.content_hash.len())],
                d.created_at,
                d.source
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(config: &Config, args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let db = open_db(config).await?;
    let d = db.dataset(&args.dataset.name, args.dataset.version).await?;
    if d.objective() != Objective::Sft {
        return show_preference_rows(&db, &d, args).await;
    }
    let stored = db.dataset_examples(d.id).await?;
    let examples: Vec<_> = stored.into_iter().map(|s| s.example).collect();
    let stats = dataset::stats(&examples);
    if args.json {
        let value = serde_json::json!({
            "dataset": d,
            "stats": stats,
            "examples": examples.iter().take(args.examples).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_header(&d);
    println!("examples    {}", stats.examples);
    let r = stats.messages_per_role;
    println!(
        "messages    {} (system {}, user {}, assistant {})",
        stats.messages, r.system, r.user, r.assistant
    );
    println!(
        "weight 0    {} example(s) with an assistant turn excluded from the loss",
        stats.examples_with_zero_weight
    );
    println!(
        "characters  min {}, mean {:.1}, max {}, total {}",
        stats.min_chars, stats.mean_chars, stats.max_chars, stats.total_chars
    );
    println!("length histogram (characters per example):");
    let widest = stats
        .length_histogram
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0)
        .max(1);
    for (label, n) in &stats.length_histogram {
        let bar = "#".repeat((n * 40).div_ceil(widest));
        println!("  {label:>10} {n:>7} {bar}");
    }
    for (i, ex) in examples.iter().take(args.examples).enumerate() {
        println!("--- example {}", i + 1);
        for m in &ex.messages {
            let weight = m
                .weight
                .map(|w| format!(" (weight {w})"))
                .unwrap_or_default();
            println!("[{}{weight}] {}", m.role, m.content);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_header(d: &Dataset) {
    println!("dataset {} v{}", d.name, d.version);
    println!("  sha256    {}", d.content_hash);
    println!("  format    {} (from {})", d.format, d.source);
    println!("  created   {}", d.created_at);
}

/// `data show` of a DPO or KTO dataset: its rows as stored (the lines an export writes).
async fn show_preference_rows(db: &Db, d: &Dataset, args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let lines = db.dataset_lines(d.id).await?;
    let shown = lines.iter().take(args.examples);
    if args.json {
        let rows: Vec<serde_json::Value> = shown
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| l.as_str().into()))
            .collect();
        let value = serde_json::json!({"dataset": d, "rows": rows});
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_header(d);
    println!("rows        {} {} row(s)", lines.len(), d.kind);
    for (i, line) in shown.enumerate() {
        println!("--- row {}\n{line}", i + 1);
    }
    Ok(ExitCode::SUCCESS)
}

async fn export(config: &Config, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let db = open_db(config).await?;
    let d = db.dataset(&args.dataset.name, args.dataset.version).await?;
    let text = db.dataset_jsonl(d.id).await?;
    if args.output.as_os_str() == "-" {
        std::io::stdout().write_all(text.as_bytes())?;
    } else {
        write_atomically(&args.output, text.as_bytes())
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        eprintln!(
            "exported {} v{} ({} {} row(s)) to {}",
            d.name,
            d.version,
            d.example_count,
            d.kind,
            args.output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn build(config: &Config, args: &BuildArgs) -> anyhow::Result<ExitCode> {
    let kind: Objective = args.kind.parse().map_err(|e| anyhow!("--kind: {e}"))?;
    let spec = dataset::BuildSpec {
        kind,
        name: args.name.clone(),
        assistant: args.assistant.clone(),
        adapter: args.adapter.clone(),
        platform: args.platform.clone(),
        chat: args.chat.clone(),
        from: args.from,
        to: args.to,
        rating: args.rating.clone(),
        only_upvoted: args.only_upvoted,
        include_corrections: Some(!args.no_corrections),
        exclude_downvoted: Some(!args.keep_downvoted),
    };
    let db = open_db(config).await?;
    let filter = spec.filter(&db).await?;
    match (&args.name, &args.output) {
        (Some(name), None) => match dataset::store(&db, name, &filter, kind).await? {
            DatasetInsert::Created(d) => println!(
                "built {} v{}: {} {} row(s) from stored conversations",
                d.name, d.version, d.example_count, d.kind
            ),
            DatasetInsert::Unchanged(d) => println!(
                "{} v{} already holds these {} {} row(s); nothing stored",
                d.name, d.version, d.example_count, d.kind
            ),
        },
        (None, Some(out)) => {
            let rows = dataset::build_rows(&db, &filter, kind).await?;
            let mut text = String::new();
            for r in &rows {
                text.push_str(&r.to_string());
                text.push('\n');
            }
            if out.as_os_str() == "-" {
                std::io::stdout().write_all(text.as_bytes())?;
            } else {
                write_atomically(out, text.as_bytes())
                    .with_context(|| format!("cannot write {}", out.display()))?;
                eprintln!(
                    "wrote {} {} row(s) to {}",
                    rows.len(),
                    kind.as_str(),
                    out.display()
                );
            }
        }
        (None, None) => anyhow::bail!("say where the rows go: --name NAME or --output FILE"),
        (Some(_), Some(_)) => anyhow::bail!("--name and --output exclude each other"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Write to a temporary file beside `path`, then rename: readers never see half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    loraloop_model::fetch::set_readable(tmp.as_file())?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

async fn delete(config: &Config, args: &NameVersion) -> anyhow::Result<ExitCode> {
    let n = open_db(config)
        .await?
        .delete_dataset(&args.name, args.version)
        .await?;
    println!("deleted {n} version(s) of {}", args.name);
    Ok(ExitCode::SUCCESS)
}
