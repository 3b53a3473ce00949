//! A guard against catastrophic forgetting: before training, the base model answers a
//! set of general prompts, and those answers are mixed into the training data ("replay").
//! What the adapter kept is measured by the report card's retention probe, on other
//! prompts (`card::probe`).

use crate::generate::greedy_reply;
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::template::TemplateMessage;
use std::path::Path;

/// General prompts the base model answers before training.
pub const BUILTIN_PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "How many days are there in a week?",
    "What is 12 times 7?",
    "Name three primary colors.",
    "What is the boiling point of water at sea level in Celsius?",
    "Write a haiku about autumn.",
    "What does a thermometer measure?",
    "Give me a synonym for happy.",
    "What planet is known as the Red Planet?",
    "Translate 'thank you' into Spanish.",
    "What is the largest ocean on Earth?",
    "Explain in one sentence what photosynthesis is.",
    "Who wrote Romeo and Juliet?",
    "What is the square root of 81?",
    "List the four seasons.",
    "What gas do humans need to breathe to survive?",
];

/// Answers per prompt are capped so replay stays quick on a CPU.
pub const REPLAY_MAX_NEW_TOKENS: usize = 48;

/// The prompts: the built-in list, plus one prompt per non-empty line of `file`.
pub fn prompts(file: Option<&Path>) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)?;
        out.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    Ok(out)
}

fn example(prompt: &str, answer: &str) -> ChatExample {
    ChatExample {
        messages: vec![
            ChatMessage::new(Role::User, prompt),
            ChatMessage::new(Role::Assistant, answer),
        ],
    }
}

/// The base model's greedy answers, as chat examples.
pub fn base_answers(
    model: &LoadedModel,
    prompts: &[String],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<ChatExample>, String> {
    let mut out = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let a = greedy_reply(
            model,
            None,
            &[TemplateMessage::new("user", p.clone())],
            REPLAY_MAX_NEW_TOKENS,
        )?;
        progress(i + 1, prompts.len());
        if !a.trim().is_empty() {
            out.push(example(p, &a));
        }
    }
    Ok(out)
}

/// How many replay examples to add to `n_train` examples for a share of `ratio`.
pub fn replay_count(n_train: usize, ratio: f64, available: usize) -> usize {
    if ratio <= 0.0 || available == 0 {
        return 0;
    }
    (((ratio / (1.0 - ratio)) * n_train as f64).round() as usize).clamp(1, available)
}
