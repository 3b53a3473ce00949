//! The training graph's loss and gradients, checked against finite differences of its own
//! loss (float64) and against a PyTorch autograd reference (`fixtures/gen_train_ref.py`).

use candle_core::{DType, Device, Tensor};
use loraloop_model::llama::load::load_hf_dir;
use loraloop_model::lora::read_peft_dir;
use loraloop_model::train::{
    BaseTrain, DenseLlama, Grads, LoraParams, PassOptions, PassStats, Pause, Row, SoftTarget,
    TrainBatch,
};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn dense(name: &str, dtype: DType) -> DenseLlama {
    let m = load_hf_dir(&fixture(name), &Device::Cpu, DType::F32).unwrap();
    DenseLlama::from_llama(&m, dtype).unwrap()
}

fn fixture_lora(model: &DenseLlama) -> LoraParams {
    let (cfg, tensors) = read_peft_dir(&fixture("tiny-llama-lora"), &Device::Cpu).unwrap();
    LoraParams::from_tensors(cfg, &tensors, &model.config, model.dtype).unwrap()
}

/// Two rows: one plain sequence with a prompt and varied weights, one with two packed
/// examples and padding (the batch of `gen_train_ref.py`).
fn rows() -> Vec<Row> {
    vec![
        Row {
            tokens: vec![3, 17, 42, 8, 25, 61, 0, 33],
            positions: vec![0, 1, 2, 3, 4, 5, 6, 7],
            segments: vec![1; 8],
            targets: vec![-1, -1, -1, 25, 61, 0, 33, -1],
            weights: vec![0., 0., 0., 1.0, 1.0, 0.5, 0.5, 0.],
            soft: vec![],
        },
        Row {
            tokens: vec![5, 9, 14, 2, 50, 7, 1, 1],
            positions: vec![0, 1, 2, 0, 1, 2, 0, 0],
            segments: vec![1, 1, 1, 2, 2, 2, 0, 0],
            targets: vec![9, 14, -1, 50, 7, -1, -1, -1],
            weights: vec![1.0, 1.0, 0., 2.0, 1.0, 0., 0., 0.],
            soft: vec![],
        },
    ]
}

fn opts(batch: &TrainBatch, checkpointing: bool) -> PassOptions<'static> {
    PassOptions {
        grad_scale: 1.0 / batch.weight_sum(),
        checkpointing,
        dropout_seed: 7,
        pause: None,
    }
}

fn loss(model: &DenseLlama, lora: Option<&LoraParams>, batch: &TrainBatch) -> f64 {
    model.evaluate(lora, batch).unwrap().loss()
}

/// The largest absolute entry, as f64.
fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn value_at(t: &Tensor, flat: usize) -> f64 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[flat]
}

fn nudged(t: &Tensor, flat: usize, by: f64) -> Tensor {
    let mut v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    v[flat] += by;
    Tensor::from_vec(v, t.shape(), t.device())
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap()
}

/// Central differences `(L(p + e) - L(p - e)) / 2e` at a few entries of each named
/// parameter, compared with the analytic gradient.
fn check_against_finite_differences(
    model: &mut DenseLlama,
    lora: &mut Option<LoraParams>,
    names: &[&str],
    grads: &Grads,
    batch_rows: &[Row],
) {
    let eps = 1e-6;
    let mut checked = 0;
    for name in names {
        let analytic = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = analytic.elem_count();
        for flat in [0, n / 3, n / 2 + 1, n - 1] {
            let original = param(model, lora, name).clone();
            *param(model, lora, name) = nudged(&original, flat, eps);
            let batch = TrainBatch::new(batch_rows, model).unwrap();
            let up = loss(model, lora.as_ref(), &batch);
            *param(model, lora, name) = nudged(&original, flat, -eps);
            let down = loss(model, lora.as_ref(), &batch);
            *param(model, lora, name) = original;
            let numeric = (up - down) / (2.0 * eps);
            let got = value_at(analytic, flat);
            let tol = 1e-6 + 1e-4 * numeric.abs().max(got.abs());
            assert!(
                (numeric - got).abs() <= tol,
                "{name}[{flat}]: analytic {got:e}, finite difference {numeric:e}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, names.len() * 4);
}

fn param<'a>(
    model: &'a mut DenseLlama,
    lora: &'a mut Option<LoraParams>,
    name: &str,
) -> &'a mut Tensor {
    if name.starts_with("base_model.") {
        lora.as_mut().unwrap().param_mut(name).unwrap()
    } else {
        model.param_mut(name).unwrap()
    }
}

#[test]
fn lora_gradients_match_finite_differences_in_float64() {
    for model_name in ["tiny-llama", "tiny-qwen2"] {
        let mut model = dense(model_name, DType::F64);
        let mut lora = Some(fixture_lora(&model));
        let batch = TrainBatch::new(&rows(), &model).unwrap();
        let mut grads = Grads::default();
        let stats = model
            .forward_backward(
                lora.as_ref(),
                &BaseTrain::frozen(model.config.num_layers),
                &batch,
                &opts(&batch, false),
                &mut grads,
            )
            .unwrap();
        assert_eq!(stats.scored, 8, "positions with a target and weight > 0");
        assert_eq!(
            grads.map.len(),
            2 * 7 * 2,
            "A and B of 7 projections, 2 layers"
        );
        check_against_finite_differences(
            &mut model,
            &mut lora,
            &[
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight",
                "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
                "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight",
                "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight",
                "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight",
                "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
            ],
            &grads,
            &rows(),
        );
    }
}

#[test]
fn full_fine_tuning_gradients_match_finite_differences_in_float64() {
    for model_name in ["tiny-llama", "tiny-qwen2"] {
        let mut model = dense(model_name, DType::F64);
        let mut lora = None;
        let batch = TrainBatch::new(&rows(), &model).unwrap();
        let mut grads = Grads::default();
        model
            .forward_backward(
                None,
                &BaseTrain::full(),
                &batch,
                &opts(&batch, false),
                &mut grads,
            )
            .unwrap();
        let mut names = vec![
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.norm.weight",
        ];
        if model_name == "tiny-qwen2" {
            names.push("model.layers.1.self_attn.q_proj.bias");
        } else {
            names.push("lm_head.weight");
        }
        check_against_finite_differences(&mut model, &mut lora, &names, &grads, &rows());
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    // Without dropout the host path runs q/k/v and gate/up as stacked LoRA groups, with
    // dropout each projection on its own; the recomputation skips the o and down products.
    for dropout in [0.0, 0.1] {
        checkpointing_gives_the_same_gradients(dropout);
    }
}

/// A pass calls its pause hook before every layer, forward and backward (where a training
/// job waits for chat), and the hook changes nothing of what it computes.
#[test]
fn a_pass_pauses_before_each_layer_and_computes_the_same() {
    let model = dense("tiny-llama", DType::F32);
    let lora = fixture_lora(&model);
    let batch = TrainBatch::new(&rows(), &model).unwrap();
    let calls = std::cell::Cell::new(0);
    let count = || calls.set(calls.get() + 1);
    let run = |pause: Option<Pause<'_>>| {
        let mut g = Grads::default();
        let s = model
            .forward_backward(
                Some(&lora),
                &BaseTrain::frozen(2),
                &batch,
                &PassOptions {
                    pause,
                    ..opts(&batch, true)
                },
                &mut g,
            )
            .unwrap();
        (s, g)
    };
    let (s1, g1) = run(None);
    let (s2, g2) = run(Some(Pause(&count)));
    // LoRA on every layer: every layer runs forward and backward.
    assert_eq!(calls.get(), 2 * model.config.num_layers);
    assert_eq!(s1, s2);
    for (name, a) in &g1.map {
        assert_eq!(max_abs(&(a - &g2.map[name]).unwrap()), 0.0, "{name}");
    }
}

fn checkpointing_gives_the_same_gradients(dropout: f64) {
    let model = dense("tiny-llama", DType::F32);
    let mut lora = fixture_lora(&model);
    lora.config.lora_dropout = dropout;
    let batch = TrainBatch::new(&rows(), &model).unwrap();
    let run = |ckpt: bool| {
        let mut g = Grads::default();
        let s = model
            .forward_backward(
                Some(&lora),
                &BaseTrain::frozen(2),
                &batch,
                &opts(&batch, ckpt),
                &mut g,
            )
            .unwrap();
        (s, g)
    };
    let (s1, g1) = run(false);
    let (s2, g2) = run(true);
    assert_eq!(s1, s2);
    assert_eq!(g1.map.len(), g2.map.len());
    for (name, a) in &g1.map {
        let b = &g2.map[name];
        assert_eq!(
            max_abs(&(a - b).unwrap()),
            0.0,
            "{name} differs (dropout {dropout})"
        );
    }
}

#[test]
fn evaluation_counts_only_positions_with_a_target_and_a_positive_weight() {
    let model = dense("tiny-llama", DType::F32);
    let batch = TrainBatch::new(&rows(), &model).unwrap();
    let s: PassStats = model.evaluate(None, &batch).unwrap();
    assert_eq!(s.scored, 8);
    assert_eq!(s.weight_sum, 1.0 + 1.0 + 0.5 + 0.5 + 1.0 + 1.0 + 2.0 + 1.0);
    // A random 64-token model: the loss is near ln(64) = 4.16.
    assert!((3.0..5.5).contains(&s.loss()), "{}", s.loss());
}

/// Loss and gradients against `fixtures/gen_train_ref.py` (float64 PyTorch autograd on a
/// forward written from scratch; gradients stored as float32). In float64 (the generic
/// candle graph), and in float32 with LoRA on the frozen base (the CPU host path of
/// `train/host.rs`), within float32 rounding.
fn check_against_torch(model_name: &str, full: bool) {
    check_against_torch_in(model_name, full, DType::F64);
}

fn check_against_torch_in(model_name: &str, full: bool, dtype: DType) {
    let model = dense(model_name, dtype);
    let lora = fixture_lora(&model);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("train_ref/{model_name}.json"))).unwrap(),
    )
    .unwrap();
    let batch = TrainBatch::new(&rows(), &model).unwrap();
    let mut grads = Grads::default();
    let train = if full {
        BaseTrain::full()
    } else {
        BaseTrain::frozen(model.config.num_layers)
    };
    let stats = model
        .forward_backward(
            Some(&lora),
            &train,
            &batch,
            &opts(&batch, false),
            &mut grads,
        )
        .unwrap();
    let want_loss = reference["loss"].as_f64().unwrap();
    // f64: 1e-7, the rotary tables are computed in f64 but stored in f32 (as for
    // inference). f32: a few hundred roundings of 2^-24 relative each along the way.
    let (loss_tol, grad_tol) = if dtype == DType::F64 {
        (1e-7, 1e-6)
    } else {
        (2e-5, 2e-5)
    };
    assert!(
        (stats.loss() - want_loss).abs() < loss_tol,
        "loss {} vs torch {want_loss}",
        stats.loss()
    );
    assert_eq!(stats.weight_sum, reference["weight_sum"].as_f64().unwrap());
    let kind = if full { "full" } else { "lora" };
    let want = candle_core::safetensors::load(
        fixture(&format!("train_ref/{model_name}-{kind}-grads.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let mut compared = 0;
    for (name, w) in &want {
        // With the LoRA applied but frozen, the full pass also yields LoRA gradients; the
        // reference lists only the base ones there.
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let w = w.to_dtype(DType::F64).unwrap();
        let scale = max_abs(&w).max(1e-12);
        let diff = max_abs(&(got.to_dtype(DType::F64).unwrap() - &w).unwrap());
        assert!(
            diff <= grad_tol * scale.max(1.0),
            "{name}: max diff {diff:e} (max |grad| {scale:e})"
        );
        compared += 1;
    }
    assert!(
        compared >= if full { 20 } else { 28 },
        "{compared} tensors compared"
    );
}

#[test]
fn loss_and_lora_gradients_match_pytorch_autograd() {
    check_against_torch("tiny-llama", false);
    check_against_torch("tiny-qwen2", false);
}

#[test]
fn float32_lora_on_the_cpu_host_path_matches_pytorch_autograd() {
    check_against_torch_in("tiny-llama", false, DType::F32);
    check_against_torch_in("tiny-qwen2", false, DType::F32);
}

/// Every LoRA gradient of the host path within f32 rounding of the generic graph's: A and
/// B of 7 projections in each of the tiny models' 2 layers.
fn assert_lora_grads_agree(model_name: &str, host: &Grads, generic: &Grads) {
    assert_eq!(host.map.len(), 2 * 7 * 2, "{model_name}");
    for (name, a) in host.map.iter() {
        let b = &generic.map[name];
        let scale = max_abs(b);
        let diff = max_abs(&(a - b).unwrap());
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "{model_name} {name}: {diff:e} vs max |grad| {scale:e}"
        );
    }
}

/// The host path (frozen base) and the generic graph (taken when the base layers train)
/// give the same LoRA gradients, also with LoRA dropout (the same masks) and with
/// gradient checkpointing on the host side.
#[test]
fn float32_host_path_agrees_with_the_generic_graph_with_dropout() {
    for model_name in ["tiny-llama", "tiny-qwen2"] {
        let model = dense(model_name, DType::F32);
        let mut lora = fixture_lora(&model);
        lora.config.lora_dropout = 0.1;
        let batch = TrainBatch::new(&rows(), &model).unwrap();
        let run = |train: BaseTrain, ckpt: bool| {
            let mut g = Grads::default();
            let s = model
                .forward_backward(Some(&lora), &train, &batch, &opts(&batch, ckpt), &mut g)
                .unwrap();
            (s, g)
        };
        let generic_layers = BaseTrain {
            first_layer: 0,
            embeddings: false,
            final_norm: false,
        };
        let (s_gen, g_gen) = run(generic_layers, false);
        for ckpt in [false, true] {
            let (s_host, g_host) = run(BaseTrain::frozen(model.config.num_layers), ckpt);
            assert!(
                (s_host.loss() - s_gen.loss()).abs() < 1e-5 * s_gen.loss(),
                "{model_name}: loss {} vs {}",
                s_host.loss(),
                s_gen.loss()
            );
            assert_eq!(s_host.correct, s_gen.correct);
            assert_lora_grads_agree(model_name, &g_host, &g_gen);
        }
    }
}

/// Rows longer than the host path's 64-row attention blocks: packed examples (positions
/// restart, each at most the tiny models' 64-token context) and trailing padding, so
/// later blocks start their keys inside the row.
fn long_rows() -> Vec<Row> {
    let row = |lens: &[usize], pad: usize, salt: u32| {
        let (mut tokens, mut positions, mut segments, mut targets) =
            (vec![], vec![], vec![], vec![]);
        for (s, &len) in lens.iter().enumerate() {
            let start = tokens.len();
            for j in 0..len {
                tokens.push((salt + 7 * (start + j) as u32 * 13 + j as u32 * j as u32) % 64);
                positions.push(j as u32);
                segments.push(s as u32 + 1);
            }
            for j in 0..len {
                targets.push(if j + 1 < len {
                    tokens[start + j + 1] as i32
                } else {
                    -1
                });
            }
        }
        for _ in 0..pad {
            tokens.push(0);
            positions.push(0);
            segments.push(0);
            targets.push(-1);
        }
        let weights = targets
            .iter()
            .map(|&t| if t >= 0 { 1.0 } else { 0.0 })
            .collect();
        Row {
            tokens,
            positions,
            segments,
            targets,
            weights,
            soft: vec![],
        }
    };
    vec![row(&[60, 50, 40], 10, 3), row(&[64, 64, 20], 12, 11)]
}

/// One pass on the generic graph (taken when the base layers train) and one on the f32
/// host path (frozen base): their loss statistics and gradients.
fn generic_and_host(
    model: &DenseLlama,
    lora: &LoraParams,
    batch: &TrainBatch,
) -> ((PassStats, Grads), (PassStats, Grads)) {
    let run = |train: BaseTrain| {
        let mut g = Grads::default();
        let s = model
            .forward_backward(Some(lora), &train, batch, &opts(batch, false), &mut g)
            .unwrap();
        (s, g)
    };
    let generic = run(BaseTrain {
        first_layer: 0,
        embeddings: false,
        final_norm: false,
    });
    (generic, run(BaseTrain::frozen(model.config.num_layers)))
}

#[test]
fn float32_host_path_agrees_with_the_generic_graph_on_long_packed_rows() {
    for model_name in ["tiny-llama", "tiny-qwen2"] {
        let model = dense(model_name, DType::F32);
        let lora = fixture_lora(&model);
        let rows = long_rows();
        assert!(rows.iter().all(|r| r.tokens.len() == 160));
        let batch = TrainBatch::new(&rows, &model).unwrap();
        let ((s_gen, g_gen), (s_host, g_host)) = generic_and_host(&model, &lora, &batch);
        assert_eq!(
            s_host.scored,
            (59 + 49 + 39) + (63 + 63 + 19),
            "{model_name}"
        );
        assert!(
            (s_host.loss() - s_gen.loss()).abs() < 1e-5 * s_gen.loss(),
            "{model_name}: loss {} vs {}",
            s_host.loss(),
            s_gen.loss()
        );
        let eval = model.evaluate(Some(&lora), &batch).unwrap();
        assert!((eval.loss() - s_gen.loss()).abs() < 1e-5 * s_gen.loss());
        assert_lora_grads_agree(model_name, &g_host, &g_gen);
    }
}

#[test]
fn full_fine_tuning_gradients_match_pytorch_autograd() {
    check_against_torch("tiny-llama", true);
    check_against_torch("tiny-qwen2", true);
}

#[test]
fn float32_gradients_with_the_fused_cpu_kernels_agree_with_the_float64_path() {
    // f32 on the CPU runs the fused softmax / SiLU kernels; f64 the generic candle ops.
    let grads_of = |dtype: DType| {
        let model = dense("tiny-llama", dtype);
        let lora = fixture_lora(&model);
        let batch = TrainBatch::new(&rows(), &model).unwrap();
        let mut g = Grads::default();
        model
            .forward_backward(
                Some(&lora),
                &BaseTrain::full(),
                &batch,
                &opts(&batch, false),
                &mut g,
            )
            .unwrap();
        g
    };
    let (g32, g64) = (grads_of(DType::F32), grads_of(DType::F64));
    assert_eq!(g32.map.len(), g64.map.len());
    for (name, a) in &g32.map {
        let b = &g64.map[name];
        let a = a.to_dtype(DType::F64).unwrap();
        let scale = max_abs(b);
        let diff = max_abs(&(a - b).unwrap());
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "{name}: {diff:e} vs max |grad| {scale:e}"
        );
    }
}

/// `rows()` with soft targets (distillation) at three scored positions: one spread over a
/// few tokens, one one-hot on a token that is not the position's
/// target, and one one-hot on its own target.
fn soft_rows() -> Vec<Row> {
    let mut r = rows();
    r[0].soft = vec![
        SoftTarget {
            position: 3,
            tokens: vec![25, 4, 60, 2],
            probs: vec![0.5, 0.2, 0.2, 0.1],
        },
        SoftTarget {
            position: 5,
            tokens: vec![12],
            probs: vec![1.0],
        },
    ];
    r[1].soft = vec![SoftTarget {
        position: 3,
        tokens: vec![50],
        probs: vec![1.0],
    }];
    r
}

/// Soft targets: the loss at such a position is the KL divergence `sum q (log q - log p)`
/// (computed here by hand from the model's full log-softmax), a one-hot soft target is the
/// plain cross-entropy on its token, the gradients match finite differences in float64,
/// and the f32 host path agrees with the generic graph.
#[test]
fn soft_targets_train_the_kl_divergence_from_the_given_distribution() {
    let mut model = dense("tiny-llama", DType::F64);
    let mut lora = Some(fixture_lora(&model));
    let rows = soft_rows();
    let batch = TrainBatch::new(&rows, &model).unwrap();
    let got = model.evaluate(lora.as_ref(), &batch).unwrap();

    // By hand: log p over the vocabulary at every scored position, in batch order.
    let plain = TrainBatch::new(&self::rows(), &model).unwrap();
    let lp: Vec<Vec<f64>> = model
        .scored_log_probs(lora.as_ref(), &plain)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut expected = 0.0;
    let mut wsum = 0.0;
    let mut k = 0;
    for r in &rows {
        for i in 0..r.tokens.len() {
            if r.targets[i] < 0 || r.weights[i] == 0.0 {
                continue;
            }
            let w = r.weights[i] as f64;
            let term = match r.soft.iter().find(|s| s.position as usize == i) {
                Some(s) => s
                    .tokens
                    .iter()
                    .zip(&s.probs)
                    .map(|(&t, &p)| p as f64 * ((p as f64).ln() - lp[k][t as usize]))
                    .sum::<f64>(),
                None => -lp[k][r.targets[i] as usize],
            };
            expected += w * term;
            wsum += w;
            k += 1;
        }
    }
    assert_eq!(k, 8);
    // scored_log_probs gives f32 log-probabilities.
    assert!(
        (got.loss() - expected / wsum).abs() < 1e-6,
        "loss {} vs KL by hand {}",
        got.loss(),
        expected / wsum
    );
    // The one-hot soft target on the position's own token changes nothing.
    let mut own = self::rows();
    own[1].soft = soft_rows()[1].soft.clone();
    let own = TrainBatch::new(&own, &model).unwrap();
    assert!(
        (model.evaluate(lora.as_ref(), &own).unwrap().loss() - loss(&model, lora.as_ref(), &plain))
            .abs()
            < 1e-12
    );

    let mut grads = Grads::default();
    model
        .forward_backward(
            lora.as_ref(),
            &BaseTrain::frozen(model.config.num_layers),
            &batch,
            &opts(&batch, false),
            &mut grads,
        )
        .unwrap();
    check_against_finite_differences(
        &mut model,
        &mut lora,
        &[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
        ],
        &grads,
        &rows,
    );

    let model = dense("tiny-llama", DType::F32);
    let lora = fixture_lora(&model);
    let batch = TrainBatch::new(&rows, &model).unwrap();
    let ((s_gen, g_gen), (s_host, g_host)) = generic_and_host(&model, &lora, &batch);
    assert!(
        (s_host.loss() - s_gen.loss()).abs() < 1e-5 * s_gen.loss(),
        "loss {} vs {}",
        s_host.loss(),
        s_gen.loss()
    );
    assert_lora_grads_agree("tiny-llama", &g_host, &g_gen);
}

#[test]
fn a_soft_target_must_sit_on_a_scored_position_with_distinct_tokens_in_the_vocabulary() {
    let model = dense("tiny-llama", DType::F32);
    for (position, token) in [(0, 5), (3, 1_000_000)] {
        let mut r = rows();
        r[0].soft = vec![SoftTarget {
            position,
            tokens: vec![token],
            probs: vec![1.0],
        }];
        assert!(
            TrainBatch::new(&r, &model).is_err(),
            "position {position}, token {token}"
        );
    }
}
