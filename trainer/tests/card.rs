//! The report card's measurements on a tiny random chat model.

use candle_core::{D, DType, Device, Tensor};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use loraloop_model::train::{DenseLlama, LoraParams, TrainBatch};
use loraloop_trainer::batch::{BatchPlan, batches_in_order};
use loraloop_trainer::card::probe::{BASE_TOP_K, Probe, base_answers, bucketed_kl, prompts};
use loraloop_trainer::config::TrainFile;
use loraloop_trainer::evaluate::evaluate_tokenized;
use loraloop_trainer::tokenize::{TokenizedExample, tokenize_dataset};
use loraloop_trainer::trainable::{LORA_DTYPE, peft_config};

fn setup(dir: &std::path::Path) -> (LoadedModel, DenseLlama) {
    write_tiny_chat_model(dir, TinySpec::default()).unwrap();
    let model = LoadedModel::load(dir, &Device::Cpu).unwrap();
    let dense = DenseLlama::from_llama(&model.llama, DType::F32).unwrap();
    (model, dense)
}

/// LoRA weights with B drawn at random (a fresh adapter has B = 0: no change at all).
fn moved_lora(dense: &DenseLlama, zero: bool) -> LoraParams {
    let c = TrainFile::default().validate().unwrap();
    let mut p = LoraParams::init(
        peft_config(&c, "tiny"),
        &dense.config,
        7,
        LORA_DTYPE,
        &Device::Cpu,
    )
    .unwrap();
    if !zero {
        for ab in p.layers.iter_mut().flatten().flatten() {
            ab.b = Tensor::randn(0f32, 0.2, ab.b.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(ab.b.dtype())
                .unwrap();
        }
    }
    p
}

#[test]
fn a_lora_that_changes_nothing_agrees_with_the_base_model_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, dense) = setup(tmp.path());
    let answers = base_answers(&model, "h", &prompts(12), None).unwrap();
    assert!(!answers.is_empty());
    let probe = Probe::new(&answers, 256);
    assert!(probe.tokens > 0);
    let fresh = moved_lora(&dense, true);
    let moved = moved_lora(&dense, false);
    let base = probe.base_tops(&dense, 256, "k", None).unwrap();
    assert_eq!(base.len(), probe.tokens);
    let d = probe.drift(&dense, &base, &[&fresh, &moved], 256).unwrap();
    // By definition: identical distributions give agreement 1 and KL 0.
    assert_eq!(d[0].agreement, 1.0);
    assert!(d[0].kl.abs() < 1e-6, "{:?}", d[0]);
    // A moved adapter has a positive KL (Gibbs' inequality) and agrees less.
    assert!(d[1].kl > 1e-4, "{:?}", d[1]);
    assert!(d[1].agreement < 1.0, "{:?}", d[1]);
}

#[test]
fn scored_log_probs_give_the_cross_entropy_the_training_loss_computes() {
    // A cross-check of two paths: the log-probabilities the KL is made of, gathered at the
    // targets, average to the loss of `evaluate` (the cross-entropy head whose loss and
    // gradients are checked against PEFT in model/tests).
    let tmp = tempfile::tempdir().unwrap();
    let (model, dense) = setup(tmp.path());
    let moved = moved_lora(&dense, false);
    let ex = vec![
        ChatExample {
            messages: vec![
                ChatMessage::new(Role::User, "What is the capital of Zorblax?"),
                ChatMessage::new(Role::Assistant, "Blorp City."),
            ],
        };
        3
    ];
    let (tok, _) = tokenize_dataset(&ex, &model.tokenizer, &model.template, 128, false).unwrap();
    let refs: Vec<&TokenizedExample> = tok.iter().collect();
    let plan = BatchPlan {
        micro_batch_size: 4,
        sequence_len: 128,
        sample_packing: false,
        seed: 0,
    };
    let rows = batches_in_order(&refs, &plan).remove(0);
    let batch = TrainBatch::new(&rows, &dense).unwrap();
    let lp = dense.scored_log_probs(Some(&moved), &batch).unwrap();
    // Each row is a distribution.
    let sums: Vec<f32> = lp.exp().unwrap().sum(D::Minus1).unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4), "{sums:?}");
    let targets: Vec<u32> = rows
        .iter()
        .flat_map(|r| {
            r.targets
                .iter()
                .zip(&r.weights)
                .filter(|(t, w)| **t >= 0 && **w > 0.0)
                .map(|(t, _)| *t as u32)
        })
        .collect();
    let n = targets.len();
    let idx = Tensor::from_vec(targets, (n, 1), &Device::Cpu).unwrap();
    let nll = -(lp.gather(&idx, D::Minus1).unwrap().mean_all().unwrap())
        .to_scalar::<f32>()
        .unwrap();
    let loss = evaluate_tokenized(&dense, Some(&moved), &tok, 4, 128)
        .unwrap()
        .loss;
    assert!((nll as f64 - loss).abs() < 1e-4, "{nll} vs {loss}");
}

#[test]
fn the_bucketed_kl_is_the_kl_of_the_top_tokens_and_the_rest_as_one() {
    // By hand: q = (0.5, 0.3, rest 0.2), p = (0.25, 0.25, rest 0.5):
    // 0.5 ln 2 + 0.3 ln 1.2 + 0.2 ln 0.4 = 0.218008...
    let ln = |x: f32| x.ln();
    let kl = bucketed_kl(&[ln(0.5), ln(0.3)], &[ln(0.25), ln(0.25)]);
    assert!((kl - 0.218_008).abs() < 1e-5, "{kl}");
    assert!(bucketed_kl(&[ln(0.5), ln(0.3)], &[ln(0.5), ln(0.3)]).abs() < 1e-7);
}

#[test]
fn the_probe_kl_from_cached_base_distributions_bounds_the_full_vocabulary_kl() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, dense) = setup(tmp.path());
    let answers = base_answers(&model, "h", &prompts(8), None).unwrap();
    let probe = Probe::new(&answers, 256);
    let moved = moved_lora(&dense, false);
    let cache = tmp.path().join("cache");
    let base = probe.base_tops(&dense, 256, "k", Some(&cache)).unwrap();
    assert!(
        base.iter()
            .all(|t| t.tokens.len() == BASE_TOP_K.min(dense.config.vocab_size))
    );
    // Written once, and read back the same.
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(files.len(), 1);
    assert_eq!(
        probe.base_tops(&dense, 256, "k", Some(&cache)).unwrap(),
        base
    );
    let d = probe.drift(&dense, &base, &[&moved], 256).unwrap()[0];
    // The exact KL(base || adapter) over the whole vocabulary, by its definition.
    let refs: Vec<&TokenizedExample> = probe.examples.iter().collect();
    let plan = BatchPlan {
        micro_batch_size: 8,
        sequence_len: 256,
        sample_packing: false,
        seed: 0,
    };
    let (mut exact, mut n) = (0f64, 0usize);
    for rows in batches_in_order(&refs, &plan) {
        let batch = TrainBatch::new(&rows, &dense).unwrap();
        let b = dense.scored_log_probs(None, &batch).unwrap();
        let a = dense.scored_log_probs(Some(&moved), &batch).unwrap();
        exact += (b.exp().unwrap() * (&b - &a).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        n += batch.scored_tokens();
    }
    let exact = exact / n as f64;
    // Merging tokens into one bucket never raises a KL (the data-processing inequality),
    // and the random tiny model's top 64 tokens hold most of its probability.
    assert!(d.kl <= exact + 1e-5, "{} vs {exact}", d.kl);
    assert!(d.kl > 0.5 * exact, "{} vs {exact}", d.kl);
}
