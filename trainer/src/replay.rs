//! A guard against catastrophic forgetting: before training, the base model answers a
//! set of general prompts, and those answers are mixed into the training data ("replay").
//! What the adapter kept is measured by the report card's retention probe, on other
//! prompts (`card::probe`).

use crate::generate::greedy_reply;
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::template::TemplateMessage;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::path::Path;

/// General prompts the base model answers before training, one per line: everyday
/// questions, instructions, small talk, writing tasks and general-knowledge questions.
/// None of them is a retention probe prompt (`trainer/data/retention_prompts.txt`) or a
/// learning-bench question, so the card and the bench measure what replay kept on
/// prompts replay did not train on.
pub const BUILTIN_PROMPTS: &str = include_str!("../data/replay_prompts.txt");

/// Answers per prompt are capped so replay stays quick on a CPU.
pub const REPLAY_MAX_NEW_TOKENS: usize = 48;

/// The prompts: the built-in list, plus one prompt per non-empty line of `file`.
pub fn prompts(file: Option<&Path>) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = lines(BUILTIN_PROMPTS);
    if let Some(f) = file {
        out.extend(lines(&std::fs::read_to_string(f)?));
    }
    Ok(out)
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
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

/// `n` of the prompts in an order set by `seed`: only the answers that join the training
/// data are generated, and different seeds replay different prompts.
pub fn pick(prompts: &[String], n: usize, seed: u64) -> Vec<String> {
    let mut order: Vec<&String> = prompts.iter().collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5EED_7E11_A11A_0001));
    order.into_iter().take(n).cloned().collect()
}

/// How many replay examples to add to `n_train` examples for a share of `ratio`.
pub fn replay_count(n_train: usize, ratio: f64, available: usize) -> usize {
    if ratio <= 0.0 || available == 0 {
        return 0;
    }
    (((ratio / (1.0 - ratio)) * n_train as f64).round() as usize).clamp(1, available)
}
