//! A guard against catastrophic forgetting: before training, the base model answers a
//! set of general prompts, and those answers are mixed into the training data ("replay").
//! What the adapter kept is measured by the report card's retention probe, on other
//! prompts (`card::probe`).

use crate::generate::greedy_reply;
use crate::tokenize::TokenizedExample;
use crate::topk::{TopTokens, base_top_k};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::template::TemplateMessage;
use loraloop_model::train::{DenseLlama, SoftTarget};
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

/// Distilled replay keeps this many of the base model's most likely next tokens at each
/// answer position.
pub const DISTILL_TOP_K: usize = 64;

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

/// In how many epochs replay takes turns: one turn per epoch the job starts (a partial
/// epoch counts), while the pool holds `wanted` fresh prompts for each.
pub fn rounds(wanted: usize, available: usize, num_epochs: f64) -> usize {
    if wanted == 0 {
        return 1;
    }
    (num_epochs.ceil().max(1.0) as usize)
        .min(available / wanted)
        .max(1)
}

/// Turn the replayed answers into distillation targets: at each scored position, the base
/// model's `top_k` most likely next tokens, renormalized, so the adapter learns the base
/// model's whole next-token distribution there (the loss is the KL divergence from it)
/// rather than only its greedy token. `dense` runs without an adapter. Returns the mean
/// probability the kept tokens held (how much of the distribution survives the cut).
pub fn distill(
    dense: &DenseLlama,
    examples: &mut [TokenizedExample],
    sequence_len: usize,
    top_k: usize,
) -> candle_core::Result<f64> {
    let refs: Vec<&TokenizedExample> = examples.iter().collect();
    let mut tops = base_top_k(dense, &refs, sequence_len, top_k)?.into_iter();
    let (mut kept, mut positions) = (0f64, 0usize);
    // Scored positions come example by example, in order: those whose next token has a
    // positive weight (`batch::push_example`).
    for ex in examples.iter_mut() {
        ex.soft.clear();
        for t in 0..ex.tokens.len().saturating_sub(1) {
            if ex.weights[t + 1] <= 0.0 {
                continue;
            }
            let top = tops.next().ok_or_else(|| {
                candle_core::Error::Msg("fewer scored positions than expected".into())
            })?;
            let (target, mass) = soft_target(&top, t as u32);
            kept += mass;
            positions += 1;
            ex.soft.push(target);
        }
    }
    Ok(if positions > 0 {
        kept / positions as f64
    } else {
        f64::NAN
    })
}

/// One position's top tokens as a soft target (renormalized), and the probability they
/// held.
fn soft_target(top: &TopTokens, position: u32) -> (SoftTarget, f64) {
    let p: Vec<f64> = top.log_probs.iter().map(|&l| (l as f64).exp()).collect();
    let mass: f64 = p.iter().sum();
    let target = SoftTarget {
        position,
        tokens: top.tokens.clone(),
        probs: p.iter().map(|&x| (x / mass) as f32).collect(),
    };
    (target, mass)
}

#[cfg(test)]
mod rotation_tests {
    use super::rounds;

    #[test]
    fn replay_takes_one_turn_per_epoch_while_the_pool_has_fresh_prompts() {
        assert_eq!(rounds(58, 225, 3.0), 3); // 174 different prompts over 3 epochs
        assert_eq!(rounds(58, 100, 3.0), 1); // not enough for a second fresh set
        assert_eq!(rounds(58, 225, 2.5), 3); // a partial epoch still starts
        assert_eq!(rounds(8, 227, 1.0), 1);
        assert_eq!(rounds(0, 10, 3.0), 1);
    }
}

#[cfg(test)]
mod pool_tests {
    use super::{BUILTIN_PROMPTS, lines};
    use std::collections::HashSet;

    /// The report card measures retention on prompts replay did not train on: no built-in
    /// replay prompt may be a probe prompt, and none may appear twice (a repeat would be
    /// replayed twice as often).
    #[test]
    fn replay_prompts_are_distinct_and_none_is_a_probe_prompt() {
        let probe: HashSet<String> = lines(crate::card::probe::PROMPTS)
            .into_iter()
            .map(|p| p.to_lowercase())
            .collect();
        let mut seen = HashSet::new();
        for p in lines(BUILTIN_PROMPTS) {
            let key = p.to_lowercase();
            assert!(!probe.contains(&key), "{p:?} is a retention probe prompt");
            assert!(seen.insert(key), "{p:?} is listed twice");
        }
        assert!(seen.len() >= 300, "{}", seen.len());
    }
}
