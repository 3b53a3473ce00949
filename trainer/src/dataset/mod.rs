//! Fine-tuning datasets: parsing, format auto-detection, validation and normalization of
//! JSONL files, plus statistics, a content hash and a canonical export.
//!
//! Everything here is a pure function over bytes and values: the caller reads files and
//! stores results. Every supported [`Format`] normalizes into
//! [`loraloop_core::domain::ChatExample`], so the rest of the trainer only ever sees one
//! shape, and [`to_openai_jsonl`] writes that shape back out as OpenAI chat JSONL.

mod build;
mod format;
mod parse;
mod problem;
mod stats;
mod validate;

#[cfg(test)]
mod tests;

pub use build::{BuildError, BuildSpec, rows as build_rows, sft_examples, store};
pub use format::{Format, ParseFormatError};
pub use parse::{LONG_EXAMPLE_CHARS, ParseOutcome, parse_jsonl};
pub use problem::{MAX_LISTED_PROBLEMS, Problem, ProblemCode, Severity, format_problems};
pub use stats::{DatasetStats, RoleCounts, stats};

use loraloop_core::domain::ChatExample;

/// Lowercase hex SHA-256 over the canonical lines ([`ChatExample::to_json_line`] each
/// followed by `\n`), i.e. the SHA-256 of [`to_openai_jsonl`]'s output.
///
/// The hash covers the normalized content only, not the uploaded bytes: any two files
/// whose normalized examples are equal (same examples, same order) get the same hash
/// regardless of source format, BOM, line endings, blank lines, key order or dropped
/// `name` fields. In particular an exported dataset re-imports to the same hash, which is
/// what lets loraloop recognise a dataset it has seen before.
pub fn content_hash(examples: &[ChatExample]) -> String {
    lines_hash(examples.iter().map(ChatExample::to_json_line))
}

/// The hash of stored rows given as their JSON lines (a preference dataset's), the same
/// scheme as [`content_hash`].
pub use loraloop_core::storage::lines_hash;

/// The canonical OpenAI chat JSONL form: one [`ChatExample::to_json_line`] per example,
/// each ending with `\n`. Parsing it back (auto-detected) yields the same examples,
/// weights included, and the same [`content_hash`].
pub fn to_openai_jsonl(examples: &[ChatExample]) -> String {
    let mut out = String::new();
    for example in examples {
        out.push_str(&example.to_json_line());
        out.push('\n');
    }
    out
}
