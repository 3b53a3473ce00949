//! Summary statistics of a normalized dataset, shown after an import and in the console.
//!
//! Lengths are in characters (see [`ChatExample::char_len`]) until a tokenizer is wired
//! into the validator.

use loraloop_core::domain::{ChatExample, Role};
use serde::Serialize;

/// Lower bounds of the length histogram's buckets, in characters. Powers of two from 64
/// to 8192: fixed so that histograms of different datasets line up.
const BUCKET_BOUNDS: [usize; 8] = [64, 128, 256, 512, 1024, 2048, 4096, 8192];

/// Message counts per role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoleCounts {
    pub system: usize,
    pub user: usize,
    pub assistant: usize,
}

/// What a dataset contains.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    pub examples: usize,
    pub messages: usize,
    pub messages_per_role: RoleCounts,
    /// Assistant messages: the turns the loss can be computed over.
    pub assistant_messages: usize,
    /// Examples with at least one `weight: 0` message (a turn excluded from the loss).
    pub examples_with_zero_weight: usize,
    /// Characters over all messages of all examples.
    pub total_chars: usize,
    /// Per-example character counts; all zero for an empty dataset.
    pub min_chars: usize,
    pub mean_chars: f64,
    pub max_chars: usize,
    /// `(label, count)` per bucket of example length in characters: `<64`, `64-127`,
    /// `128-255`, ..., `4096-8191`, `>=8192`. Every bucket is present, empty or not.
    pub length_histogram: Vec<(String, usize)>,
}

/// Computes [`DatasetStats`] over `examples`.
pub fn stats(examples: &[ChatExample]) -> DatasetStats {
    let mut roles = RoleCounts::default();
    let mut messages = 0;
    let mut examples_with_zero_weight = 0;
    let mut lengths = Vec::with_capacity(examples.len());
    for example in examples {
        messages += example.messages.len();
        for message in &example.messages {
            match message.role {
                Role::System => roles.system += 1,
                Role::User => roles.user += 1,
                Role::Assistant => roles.assistant += 1,
            }
        }
        if example.messages.iter().any(|m| m.weight == Some(0.0)) {
            examples_with_zero_weight += 1;
        }
        lengths.push(example.char_len());
    }

    let total_chars: usize = lengths.iter().sum();
    let mean_chars = if lengths.is_empty() {
        0.0
    } else {
        total_chars as f64 / lengths.len() as f64
    };

    let mut histogram = histogram_labels()
        .into_iter()
        .map(|label| (label, 0))
        .collect::<Vec<_>>();
    for &len in &lengths {
        let bucket = BUCKET_BOUNDS
            .iter()
            .take_while(|&&bound| len >= bound)
            .count();
        if let Some((_, count)) = histogram.get_mut(bucket) {
            *count += 1;
        }
    }

    DatasetStats {
        examples: examples.len(),
        messages,
        messages_per_role: roles,
        assistant_messages: roles.assistant,
        examples_with_zero_weight,
        total_chars,
        min_chars: lengths.iter().copied().min().unwrap_or(0),
        mean_chars,
        max_chars: lengths.iter().copied().max().unwrap_or(0),
        length_histogram: histogram,
    }
}

/// `<64`, `64-127`, ..., `4096-8191`, `>=8192`.
fn histogram_labels() -> Vec<String> {
    let mut labels = vec![format!("<{}", BUCKET_BOUNDS[0])];
    labels.extend(
        BUCKET_BOUNDS
            .windows(2)
            .map(|pair| format!("{}-{}", pair[0], pair[1] - 1)),
    );
    labels.push(format!(">={}", BUCKET_BOUNDS[BUCKET_BOUNDS.len() - 1]));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraloop_core::domain::ChatMessage;

    fn msg(role: Role, content: &str, weight: Option<f64>) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_owned(),
            weight,
        }
    }

    #[test]
    fn stats_of_a_small_hand_made_set_match_hand_computed_numbers() {
        let examples = vec![
            // 2 + 3 = 5 chars ("héllo" has 5 chars but 6 bytes: lengths count chars).
            ChatExample {
                messages: vec![
                    msg(Role::User, "hi", None),
                    msg(Role::Assistant, "yes", None),
                ],
            },
            // 10 + 60 + 30 = 100 chars, one weight-0 assistant turn.
            ChatExample {
                messages: vec![
                    msg(Role::System, &"s".repeat(10), None),
                    msg(Role::User, &"u".repeat(60), None),
                    msg(Role::Assistant, &"a".repeat(30), Some(0.0)),
                ],
            },
            // 5 + 8995 = 9000 chars, weight 1 (not zero).
            ChatExample {
                messages: vec![
                    msg(Role::User, "héllo", None),
                    msg(Role::Assistant, &"b".repeat(8995), Some(1.0)),
                ],
            },
            // Exactly 64 chars: the first value of the second bucket.
            ChatExample {
                messages: vec![msg(Role::Assistant, &"c".repeat(64), Some(0.5))],
            },
        ];
        let s = stats(&examples);
        assert_eq!(s.examples, 4);
        assert_eq!(s.messages, 8);
        assert_eq!(
            s.messages_per_role,
            RoleCounts {
                system: 1,
                user: 3,
                assistant: 4
            }
        );
        assert_eq!(s.assistant_messages, 4);
        assert_eq!(s.examples_with_zero_weight, 1);
        assert_eq!(s.total_chars, 5 + 100 + 9000 + 64);
        assert_eq!(s.min_chars, 5);
        assert_eq!(s.max_chars, 9000);
        assert!((s.mean_chars - 9169.0 / 4.0).abs() < 1e-9);
        let expected: Vec<(String, usize)> = [
            ("<64", 1),
            ("64-127", 2),
            ("128-255", 0),
            ("256-511", 0),
            ("512-1023", 0),
            ("1024-2047", 0),
            ("2048-4095", 0),
            ("4096-8191", 0),
            (">=8192", 1),
        ]
        .into_iter()
        .map(|(label, n)| (label.to_owned(), n))
        .collect();
        assert_eq!(s.length_histogram, expected);
    }

    #[test]
    fn stats_of_an_empty_set_are_zero_with_every_bucket_present() {
        let s = stats(&[]);
        assert_eq!(s.examples, 0);
        assert_eq!(s.total_chars, 0);
        assert_eq!((s.min_chars, s.max_chars), (0, 0));
        assert_eq!(s.mean_chars, 0.0);
        assert_eq!(s.length_histogram.len(), 9);
        assert!(s.length_histogram.iter().all(|(_, n)| *n == 0));
    }

    #[test]
    fn stats_serialize_to_json() {
        let s = stats(&[ChatExample {
            messages: vec![msg(Role::Assistant, "ok", None)],
        }]);
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(json["examples"], 1);
        assert_eq!(json["messages_per_role"]["assistant"], 1);
        assert_eq!(json["length_histogram"][0], serde_json::json!(["<64", 1]));
    }
}
