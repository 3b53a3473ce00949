//! Distilled replay on a tiny random chat model: the targets are the base model's own
//! next-token distributions, so the base model's loss on them is the KL divergence of
//! its distribution from itself (0), or, with only the top `k` tokens kept (renormalized),
//! `-ln(mass of those k tokens)`: both computed here by hand from its full log-softmax.

use candle_core::{D, DType, Device};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use loraloop_model::train::{DenseLlama, TrainBatch};
use loraloop_trainer::batch::{BatchPlan, batches_in_order};
use loraloop_trainer::replay::distill;
use loraloop_trainer::tokenize::{TokenizedExample, tokenize_dataset};

fn qa(q: &str, a: &str) -> ChatExample {
    ChatExample {
        messages: vec![
            ChatMessage::new(Role::User, q),
            ChatMessage::new(Role::Assistant, a),
        ],
    }
}

fn setup() -> (DenseLlama, Vec<TokenizedExample>) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_chat_model(dir.path(), TinySpec::default()).unwrap();
    let model = LoadedModel::load(dir.path(), &Device::Cpu).unwrap();
    let examples: Vec<ChatExample> = [
        ("Say hello.", "Hello there!"),
        ("Name a fruit.", "An apple."),
        ("What is two plus two?", "Four."),
    ]
    .iter()
    .map(|(q, a)| qa(q, a))
    .collect();
    let (toks, _) =
        tokenize_dataset(&examples, &model.tokenizer, &model.template, 64, false).unwrap();
    let dense = DenseLlama::from_llama(&model.llama, DType::F32).unwrap();
    (dense, toks)
}

fn batch_of(dense: &DenseLlama, examples: &[TokenizedExample]) -> TrainBatch {
    let plan = BatchPlan {
        micro_batch_size: examples.len(),
        sequence_len: 64,
        sample_packing: false,
        seed: 0,
    };
    let refs: Vec<&TokenizedExample> = examples.iter().collect();
    TrainBatch::new(&batches_in_order(&refs, &plan).concat(), dense).unwrap()
}

#[test]
fn the_whole_distribution_as_target_leaves_the_base_model_nothing_to_learn() {
    let (dense, mut toks) = setup();
    let vocab = dense.config.vocab_size;
    let kept = distill(&dense, &mut toks, 64, vocab).unwrap();
    assert!((kept - 1.0).abs() < 1e-5, "all tokens kept: mass {kept}");
    let scored: usize = toks.iter().map(TokenizedExample::scored).sum();
    assert_eq!(toks.iter().map(|t| t.soft.len()).sum::<usize>(), scored);
    for s in toks.iter().flat_map(|t| &t.soft) {
        assert_eq!(s.tokens.len(), vocab);
        let sum: f32 = s.probs.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "{sum}");
        assert!(
            s.probs.windows(2).all(|w| w[0] >= w[1]),
            "most likely first"
        );
    }
    let stats = dense.evaluate(None, &batch_of(&dense, &toks)).unwrap();
    assert!(
        stats.loss().abs() < 1e-5,
        "KL(base || base) = {}",
        stats.loss()
    );
}

#[test]
fn top_k_targets_cost_the_base_model_minus_log_of_the_mass_they_keep() {
    let (dense, mut toks) = setup();
    let plain = batch_of(&dense, &toks);
    // By hand: at each scored position, -ln(sum of the 4 largest probabilities).
    let lp: Vec<Vec<f32>> = dense
        .scored_log_probs(None, &plain)
        .unwrap()
        .to_vec2()
        .unwrap();
    let (mut expected, mut mass) = (0f64, 0f64);
    for row in &lp {
        let mut p: Vec<f64> = row.iter().map(|&l| (l as f64).exp()).collect();
        p.sort_by(|a, b| b.total_cmp(a));
        let m: f64 = p[..4].iter().sum();
        expected -= m.ln();
        mass += m;
    }
    expected /= lp.len() as f64;
    mass /= lp.len() as f64;

    let kept = distill(&dense, &mut toks, 64, 4).unwrap();
    assert!((kept - mass).abs() < 1e-5, "mass {kept} vs {mass}");
    let top: Vec<u32> = dense
        .scored_log_probs(None, &plain)
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let firsts: Vec<u32> = toks
        .iter()
        .flat_map(|t| t.soft.iter().map(|s| s.tokens[0]))
        .collect();
    assert_eq!(
        firsts, top,
        "each target's first token is the base model's argmax"
    );
    let got = dense
        .evaluate(None, &batch_of(&dense, &toks))
        .unwrap()
        .loss();
    assert!(
        (got - expected).abs() < 1e-4 * expected.max(1.0),
        "{got} vs {expected}"
    );
    assert!(
        expected > 0.01,
        "a random model spreads its probability: {expected}"
    );
}
