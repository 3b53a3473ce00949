//! The classifiers against PyTorch: forward outputs and the gradient of every parameter of
//! a tiny BERT (transformers' `BertForSequenceClassification`) and of two tiny ResNets
//! (torchvision's structure, basic and bottleneck blocks, batch norms in train mode), with
//! the numbers computed once by `tests/fixtures/classify/reference.py` (PyTorch 2.15,
//! transformers 5.23) and committed as `expected.json`. Then: one optimizer step changes
//! every weight each method says it trains, and nothing else.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use loraloop_model::classify::lora::LoraSpec;
use loraloop_model::classify::{self, Arch, Classifier, Input, Method, bert, ops, params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/classify")
        .join(name)
}

fn expected(name: &str) -> serde_json::Value {
    let s = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Largest absolute difference, scaled by the reference's largest magnitude (at least 1e-3).
fn rel_err(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    ours.iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The reference checkpoint with its own head, every weight trainable.
fn reference_classifier(dir: &Path, labels: usize) -> Classifier {
    let dev = Device::Cpu;
    let base = classify::load_base(dir, 19, None, 0, &dev).unwrap();
    let mut params = base.params;
    let raw = params::read_weights(dir, &dev).unwrap();
    for (k, v) in raw {
        let k = k.strip_prefix("bert.").map(str::to_string).unwrap_or(k);
        if k.starts_with("classifier.") || k.starts_with("fc.") {
            params.insert(&k, v).unwrap();
        }
    }
    params
        .set_trainable(|n| !classify::resnet::is_buffer(n))
        .unwrap();
    Classifier {
        arch: base.arch,
        params,
        tokenizer: base.tokenizer,
        labels: (0..labels).map(|i| i.to_string()).collect(),
        method: Method::Full,
    }
}

fn check_grads(
    c: &Classifier,
    grads: &GradStore,
    exp: &serde_json::Value,
    rename: impl Fn(&str) -> String,
) {
    let exp_grads = exp["grads"].as_object().unwrap();
    let ours = c.params.trainable();
    assert_eq!(
        ours.len(),
        exp_grads.len(),
        "one gradient per PyTorch parameter"
    );
    for (name, var) in ours {
        let theirs = exp_grads
            .get(&rename(name))
            .unwrap_or_else(|| panic!("PyTorch has no parameter {}", rename(name)));
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let err = rel_err(&flat(g), &floats(theirs));
        assert!(
            err < 2e-4,
            "{name}: gradient differs from PyTorch by {err} (relative)"
        );
    }
}

#[test]
fn bert_logits_and_every_gradient_match_transformers() {
    let exp = expected("bert");
    let mut c = reference_classifier(&fixture("bert"), 3);
    let Arch::Bert { pooling, .. } = c.arch else {
        panic!("not read as BERT")
    };
    assert_eq!(
        pooling,
        bert::Pooling::Cls,
        "a plain BERT folder pools through the pooler"
    );
    // vocab.txt is turned into BertTokenizer's ids.
    let Input::Text { ids, mask } = c
        .encode_texts(&["The movie was very GOOD", "awful"])
        .unwrap()
    else {
        panic!()
    };
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), want_ids);
    let want_mask: Vec<Vec<f32>> = serde_json::from_value(exp["attention_mask"].clone()).unwrap();
    assert_eq!(mask.to_vec2::<f32>().unwrap(), want_mask);

    let logits = c.forward(&Input::Text { ids, mask }, false).unwrap();
    let err = rel_err(&flat(&logits), &floats(&exp["logits"]));
    assert!(err < 1e-4, "logits differ from transformers by {err}");
    let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let loss = ops::cross_entropy(&logits, &labels).unwrap();
    let l: f32 = loss.to_scalar().unwrap();
    assert!((l - exp["loss"].as_f64().unwrap() as f32).abs() < 1e-4);
    assert!(
        !logits.track_op(),
        "evaluation builds no autograd graph (it would hold every activation)"
    );

    // The training pass, with and without gradient checkpointing, gives PyTorch's
    // gradients (dropout off: the reference was computed without it).
    if let Arch::Bert { config, .. } = &mut c.arch {
        config.hidden_dropout_prob = 0.0;
        config.attention_probs_dropout_prob = 0.0;
    }
    let input = c
        .encode_texts(&["The movie was very GOOD", "awful"])
        .unwrap();
    for checkpoint in [false, true] {
        let pass = c.backward(&input, &labels, checkpoint).unwrap();
        let l: f32 = pass.loss.to_scalar().unwrap();
        assert!(
            (l - exp["loss"].as_f64().unwrap() as f32).abs() < 1e-4,
            "checkpoint {checkpoint}: loss {l}"
        );
        check_grads(&c, &pass.grads, &exp, bert::stored_name);
    }
}

fn resnet_matches_torch(name: &str) {
    let exp = expected(name);
    let mut c = reference_classifier(&fixture(name), 3);
    let x = candle_core::safetensors::load(fixture(name).join("input.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("x")
        .unwrap();
    let input = Input::Images(x);
    let eval = c.forward(&input, false).unwrap();
    let err = rel_err(&flat(&eval), &floats(&exp["eval_logits"]));
    assert!(err < 1e-4, "eval-mode logits differ from PyTorch by {err}");
    let logits = c.forward(&input, true).unwrap();
    let err = rel_err(&flat(&logits), &floats(&exp["logits"]));
    assert!(err < 1e-4, "train-mode logits differ from PyTorch by {err}");
    let labels = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let loss = ops::cross_entropy(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    check_grads(&c, &grads, &exp, |n| n.to_string());
    check_running_stats(&c, &exp);
    // The training pass, with and without gradient checkpointing, on a fresh copy: the
    // same gradients, and the running statistics updated once (the recomputation must not
    // update them again).
    for checkpoint in [false, true] {
        let mut c = reference_classifier(&fixture(name), 3);
        let pass = c.backward(&input, &labels, checkpoint).unwrap();
        let err = rel_err(&flat(&pass.logits), &floats(&exp["logits"]));
        assert!(
            err < 1e-4,
            "checkpoint {checkpoint}: logits differ by {err}"
        );
        check_grads(&c, &pass.grads, &exp, |n| n.to_string());
        check_running_stats(&c, &exp);
    }
}

fn check_running_stats(c: &Classifier, exp: &serde_json::Value) {
    for (stat, theirs) in exp["running"].as_object().unwrap() {
        let ours = c.params.get(stat).unwrap();
        let err = rel_err(&flat(&ours), &floats(theirs));
        assert!(
            err < 1e-4,
            "{stat} after one train pass differs from PyTorch by {err}"
        );
    }
}

/// Gradients of a training pass with dropout on: checkpointing recomputes each segment
/// with the masks it drew the first time, so the gradients are the non-checkpointed
/// pass's (no outside reference draws our masks; the pass without checkpointing is the
/// one checked against PyTorch above).
fn checkpointing_replays_the_same_masks(
    dir: &Path,
    input: impl Fn(&Classifier) -> Input,
    method: Method,
) {
    let mut passes = Vec::new();
    for checkpoint in [false, true] {
        let base = classify::load_base(dir, 19, None, 0, &Device::Cpu).unwrap();
        let mut c = Classifier::new(base, vec!["a".into(), "b".into()], method, 3).unwrap();
        if let Arch::Bert { config, .. } = &mut c.arch {
            config.hidden_dropout_prob = 0.3;
            config.attention_probs_dropout_prob = 0.3;
        }
        let x = input(&c);
        let n = match &x {
            Input::Text { ids, .. } => ids.dim(0).unwrap(),
            Input::Images(t) => t.dim(0).unwrap(),
        };
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        ops::seed_dropout(11);
        let pass = c.backward(&x, &labels, checkpoint).unwrap();
        let after_masks = ops::dropout_state();
        let grads: BTreeMap<String, Vec<f32>> = c
            .params
            .trainable()
            .iter()
            .map(|(k, v)| {
                let g = pass
                    .grads
                    .get(v)
                    .unwrap_or_else(|| panic!("no gradient reached {k}"));
                (k.clone(), flat(g))
            })
            .collect();
        let stats: BTreeMap<String, Vec<f32>> = c
            .params
            .tensors()
            .unwrap()
            .iter()
            .filter(|(k, _)| classify::resnet::is_buffer(k))
            .map(|(k, v)| (k.clone(), flat(v)))
            .collect();
        let next: f64 = rand::Rng::random(&mut after_masks.clone());
        passes.push((flat(&pass.logits), grads, stats, next));
    }
    let (plain, checkpointed) = (&passes[0], &passes[1]);
    assert!(rel_err(&checkpointed.0, &plain.0) < 1e-5, "logits differ");
    assert!(!plain.1.is_empty());
    for (name, g) in &plain.1 {
        let err = rel_err(&checkpointed.1[name], g);
        assert!(
            err < 1e-4,
            "{} ({}): checkpointed gradient differs by {err}",
            name,
            method.name()
        );
    }
    assert_eq!(checkpointed.2, plain.2, "running statistics differ");
    assert_eq!(
        checkpointed.3, plain.3,
        "the dropout generator is left where the plain pass leaves it"
    );
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients_with_dropout_on() {
    let lora = Method::Lora(LoraSpec {
        dropout: 0.2,
        ..Default::default()
    });
    let bert = fixture("bert");
    for method in [Method::Full, Method::Freeze { layers: 1 }, lora] {
        checkpointing_replays_the_same_masks(&bert, text_input, method);
    }
    let resnet = fixture("resnet");
    for method in [Method::Full, Method::Freeze { layers: 1 }, lora] {
        checkpointing_replays_the_same_masks(&resnet, image_input, method);
    }
}

#[test]
fn resnet_basic_blocks_match_torch_in_eval_and_train_mode() {
    resnet_matches_torch("resnet");
}

#[test]
fn resnet_bottleneck_blocks_match_torch_in_eval_and_train_mode() {
    resnet_matches_torch("resnet_bottleneck");
}

/// One AdamW step on a fresh classifier: every weight the method trains changes, the other
/// weights stay bit for bit (batch-norm running statistics move in training mode, frozen
/// or not, as in PyTorch's `model.train()`).
fn one_step_changes_what_trains(dir: &Path, input: impl Fn(&Classifier) -> Input, method: Method) {
    let base = classify::load_base(dir, 19, None, 0, &Device::Cpu).unwrap();
    let mut c = Classifier::new(base, vec!["a".into(), "b".into(), "c".into()], method, 1).unwrap();
    let before: BTreeMap<String, Vec<f32>> = c
        .params
        .tensors()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), flat(v)))
        .collect();
    let trainable: Vec<String> = c.params.trainable().keys().cloned().collect();
    assert!(!trainable.is_empty());
    let vars = c.params.trainable().values().cloned().collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let x = input(&c);
    let n = match &x {
        Input::Text { ids, .. } => ids.dim(0).unwrap(),
        Input::Images(t) => t.dim(0).unwrap(),
    };
    let labels = Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .broadcast_as(n)
        .unwrap();
    let labels = (labels.to_dtype(DType::F32).unwrap() * 0.0)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    // Two steps: LoRA's B starts at zero, so A's gradient is zero on the first one.
    for _ in 0..2 {
        let loss = ops::cross_entropy(&c.forward(&x, true).unwrap(), &labels).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let after = c.params.tensors().unwrap();
    for (name, old) in &before {
        let changed = flat(&after[name]) != *old;
        let trains = trainable.contains(name);
        let buffer = classify::resnet::is_buffer(name);
        if trains {
            assert!(
                changed,
                "{} ({}) did not change after a step",
                name,
                method.name()
            );
        } else if !buffer {
            assert!(
                !changed,
                "{} is frozen under {} but changed",
                name,
                method.name()
            );
        }
    }
}

fn text_input(c: &Classifier) -> Input {
    c.encode_texts(&["the movie was good", "awful", "very bad movie"])
        .unwrap()
}

fn image_input(_: &Classifier) -> Input {
    let x =
        candle_core::safetensors::load(fixture("resnet").join("input.safetensors"), &Device::Cpu)
            .unwrap()
            .remove("x")
            .unwrap();
    Input::Images(x)
}

#[test]
fn every_trainable_weight_of_the_encoder_changes_after_a_step() {
    let dir = fixture("bert");
    one_step_changes_what_trains(&dir, text_input, Method::Full);
    one_step_changes_what_trains(&dir, text_input, Method::Freeze { layers: 1 });
    one_step_changes_what_trains(
        &dir,
        text_input,
        Method::Lora(LoraSpec {
            dropout: 0.0,
            ..Default::default()
        }),
    );
}

#[test]
fn a_mean_pooled_encoder_trains_every_weight_it_keeps() {
    // A sentence-transformers folder (modules.json) pools by the mean: the pooler it
    // ships is dropped rather than left "trainable" without a gradient.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "vocab.txt"] {
        std::fs::copy(fixture("bert").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("modules.json"), "[]").unwrap();
    one_step_changes_what_trains(dir.path(), text_input, Method::Full);
    one_step_changes_what_trains(dir.path(), text_input, Method::Freeze { layers: 0 });
}

#[test]
fn every_trainable_weight_of_the_resnet_changes_after_a_step() {
    let dir = fixture("resnet");
    one_step_changes_what_trains(&dir, image_input, Method::Full);
    one_step_changes_what_trains(&dir, image_input, Method::Freeze { layers: 0 });
    one_step_changes_what_trains(
        &dir,
        image_input,
        Method::Lora(LoraSpec {
            dropout: 0.0,
            ..Default::default()
        }),
    );
}

#[test]
fn a_saved_checkpoint_predicts_what_the_trained_model_predicted() {
    let dir = fixture("bert");
    let base = classify::load_base(&dir, 19, None, 0, &Device::Cpu).unwrap();
    let spec = LoraSpec {
        dropout: 0.0,
        ..Default::default()
    };
    let mut c = Classifier::new(
        base,
        vec!["neg".into(), "pos".into()],
        Method::Lora(spec),
        3,
    )
    .unwrap();
    // Move the LoRA factors off their zero start so merging has something to fold in.
    for (name, var) in c.params.trainable().clone() {
        if name.contains("lora_B") {
            var.set(
                &var.as_tensor()
                    .ones_like()
                    .unwrap()
                    .affine(0.05, 0.0)
                    .unwrap(),
            )
            .unwrap();
        }
    }
    let x = text_input(&c);
    let ours = flat(&c.forward(&x, false).unwrap());
    let out = tempfile::tempdir().unwrap();
    c.save(out.path(), "tiny", Some(1), None).unwrap();
    let (mut loaded, manifest) = Classifier::load(out.path(), &Device::Cpu).unwrap();
    assert_eq!(manifest.labels, vec!["neg", "pos"]);
    assert_eq!(manifest.method, "lora");
    let x = text_input(&loaded);
    let theirs = flat(&loaded.forward(&x, false).unwrap());
    assert!(rel_err(&ours, &theirs) < 1e-5, "{ours:?} vs {theirs:?}");
    let p = loaded.predict(&x).unwrap();
    assert_eq!(p.len(), 3);
    assert!(
        p.iter()
            .all(|p| (p.scores.iter().map(|s| s.1).sum::<f32>() - 1.0).abs() < 1e-5)
    );
}

#[test]
fn a_distilbert_checkpoint_reads_as_the_same_encoder_as_transformers() {
    let exp = expected("distilbert");
    let base = classify::load_base(&fixture("distilbert"), 19, None, 0, &Device::Cpu).unwrap();
    let Arch::Bert {
        config, pooling, ..
    } = &base.arch
    else {
        panic!("not read as an encoder")
    };
    assert_eq!(config.type_vocab_size, 0, "DistilBERT has no token types");
    let ids: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<f32>> = serde_json::from_value(exp["attention_mask"].clone()).unwrap();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let mask = Tensor::new(mask, &Device::Cpu).unwrap();
    let pooled = bert::encode(
        &base.params,
        config,
        *pooling,
        &ids,
        &mask,
        classify::lora::Mode::eval(),
    )
    .unwrap();
    let err = rel_err(&flat(&pooled), &floats(&exp["pooled"]));
    assert!(
        err < 1e-4,
        "mean-pooled output differs from transformers' DistilBertModel by {err}"
    );
}

/// A ResNet folder holding only a PyTorch pickle (`model.pth`, written by torch.save as
/// torchvision's and timm's downloads are: `fixtures/classify/pth_reference.py`) loads to
/// the same tensors as the safetensors file it was saved from and gives PyTorch's logits.
#[test]
fn a_resnet_from_a_torch_pickle_gives_the_same_logits_as_torch() {
    let dev = Device::Cpu;
    let from_pickle = params::read_weights(&fixture("resnet_pth"), &dev).unwrap();
    let from_safetensors = params::read_weights(&fixture("resnet"), &dev).unwrap();
    assert_eq!(from_pickle.len(), from_safetensors.len());
    for (name, t) in &from_safetensors {
        let p = &from_pickle[name];
        assert_eq!(p.dims(), t.dims(), "{name}");
        assert_eq!(p.dtype(), t.dtype(), "{name}");
        let f32s = |t: &Tensor| flat(&t.to_dtype(DType::F32).unwrap());
        assert_eq!(f32s(p), f32s(t), "{name}");
    }
    let mut c = reference_classifier(&fixture("resnet_pth"), 3);
    let x = candle_core::safetensors::load(fixture("resnet").join("input.safetensors"), &dev)
        .unwrap()
        .remove("x")
        .unwrap();
    let logits = c.forward(&Input::Images(x), false).unwrap();
    let err = rel_err(&flat(&logits), &floats(&expected("resnet")["eval_logits"]));
    assert!(err < 1e-4, "eval-mode logits differ from PyTorch by {err}");
}
