//! DPO and KTO gradients: the run's backward (the loss's derivative per completion turned
//! into token weights, negative for unwanted completions) against central finite
//! differences of TRL's loss formulas (`DPOTrainer` sigmoid loss, `KTOTrainer` "kto" loss,
//! see `preference::loss`) computed from the model's own log-probabilities, in float64 on
//! the tiny Llama fixture with a non-zero LoRA adapter.

use candle_core::{DType, Device, Tensor};
use loraloop_model::llama::load::load_hf_dir;
use loraloop_model::lora::read_peft_dir;
use loraloop_model::train::{
    BaseTrain, DenseLlama, Grads, LoraParams, PassOptions, Row, TrainBatch,
};
use loraloop_trainer::config::{Objective, TrainFile};
use loraloop_trainer::preference::{micro_loss, weighted};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures")
        .join(name)
}

/// Two examples, two rows each: a shared prompt (weight 0) and different completions
/// (weight 1), the second pair with padding.
fn rows() -> Vec<Row> {
    let row = |tokens: Vec<u32>, targets: Vec<i32>, weights: Vec<f32>| Row {
        positions: (0..tokens.len() as u32).collect(),
        segments: tokens.iter().map(|&t| if t == 1 { 0 } else { 1 }).collect(),
        tokens,
        targets,
        weights,
        soft: vec![],
    };
    vec![
        row(
            vec![3, 17, 42, 8, 25, 61],
            vec![-1, -1, 8, 25, 61, -1],
            vec![0., 0., 1., 1., 1., 0.],
        ),
        row(
            vec![3, 17, 42, 9, 14, 2],
            vec![-1, -1, 9, 14, 2, -1],
            vec![0., 0., 1., 1., 1., 0.],
        ),
        row(
            vec![5, 9, 50, 7, 1, 1],
            vec![-1, 50, 7, -1, -1, -1],
            vec![0., 1., 1., 0., 0., 0.],
        ),
        row(
            vec![5, 9, 33, 60, 1, 1],
            vec![-1, 33, 60, -1, -1, -1],
            vec![0., 1., 1., 0., 0., 0.],
        ),
    ]
}

/// The loss at the adapter's current weights. KTO's reference point is held at its value
/// before the nudge (`held`: the policy's log-probabilities of the mismatched rows), as
/// TRL detaches it.
fn loss_of(
    c: &loraloop_trainer::config::TrainConfig,
    model: &DenseLlama,
    lora: &LoraParams,
    labels: &[bool],
    reference: &[f64],
    held: Option<&[f64]>,
) -> f64 {
    let batch = TrainBatch::new(&rows(), model).unwrap();
    let mut policy = model.row_log_probs(Some(lora), &batch).unwrap();
    if let Some(h) = held {
        for i in (1..policy.len()).step_by(2) {
            policy[i] = h[i];
        }
    }
    micro_loss(c, labels, &policy, reference).0
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check(objective: Objective, labels: &[bool]) {
    let m = load_hf_dir(&fixture("tiny-llama"), &Device::Cpu, DType::F32).unwrap();
    let model = DenseLlama::from_llama(&m, DType::F64).unwrap();
    let (cfg, tensors) = read_peft_dir(&fixture("tiny-llama-lora"), &Device::Cpu).unwrap();
    let mut lora = LoraParams::from_tensors(cfg, &tensors, &model.config, DType::F64).unwrap();
    let c = TrainFile {
        rl: Some(objective.as_str().into()),
        // A large β keeps the sigmoids away from saturation on this tiny model.
        rl_beta: Some(2.0),
        kto_undesirable_weight: Some(1.5),
        ..Default::default()
    }
    .validate()
    .unwrap();
    // The reference: the base model (the adapter's starting point would do as well).
    let batch = TrainBatch::new(&rows(), &model).unwrap();
    let mut reference = model.row_log_probs(None, &batch).unwrap();
    if objective == Objective::Kto {
        // Constants of the loss: lowered on the mismatched rows so that the reference
        // point sits above its clamp at 0 and its being held fixed is tested.
        for i in (1..reference.len()).step_by(2) {
            reference[i] -= 3.0;
        }
    }
    // What the run does: derivatives per row, weighted rows, the ordinary backward.
    let policy = model.row_log_probs(Some(&lora), &batch).unwrap();
    let (loss, d) = micro_loss(&c, labels, &policy, &reference);
    assert!(
        loss.is_finite() && d.iter().any(|g| g.abs() > 1e-6),
        "{loss} {d:?}"
    );
    let held = (objective == Objective::Kto).then_some(policy.as_slice());
    if objective == Objective::Kto {
        // The reference point is above its clamp here, so holding it fixed matters.
        let kl: Vec<f64> = (1..4).step_by(2).map(|i| policy[i]).collect();
        let rk: Vec<f64> = (1..4).step_by(2).map(|i| reference[i]).collect();
        let z0 = loraloop_trainer::preference::loss::kto_reference_point(&kl, &rk);
        assert!(z0 > 1e-3, "z0 {z0}");
    }
    let wbatch = TrainBatch::new(&weighted(rows(), &d), &model).unwrap();
    let mut grads = Grads::default();
    model
        .forward_backward(
            Some(&lora),
            &BaseTrain::frozen(model.config.num_layers),
            &wbatch,
            &PassOptions {
                grad_scale: 1.0,
                checkpointing: false,
                dropout_seed: 1,
                pause: None,
            },
            &mut grads,
        )
        .unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for name in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
        "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight",
    ] {
        let analytic = flat(grads.get(name).unwrap());
        let n = analytic.len();
        for at in [0, n / 3, n / 2 + 1, n - 1] {
            let original = lora.param_mut(name).unwrap().clone();
            let mut v = flat(&original);
            v[at] += eps;
            *lora.param_mut(name).unwrap() =
                Tensor::from_vec(v.clone(), original.shape(), &Device::Cpu).unwrap();
            let up = loss_of(&c, &model, &lora, labels, &reference, held);
            v[at] -= 2.0 * eps;
            *lora.param_mut(name).unwrap() =
                Tensor::from_vec(v, original.shape(), &Device::Cpu).unwrap();
            let down = loss_of(&c, &model, &lora, labels, &reference, held);
            *lora.param_mut(name).unwrap() = original;
            let numeric = (up - down) / (2.0 * eps);
            let got = analytic[at];
            let tol = 1e-7 + 1e-4 * numeric.abs().max(got.abs());
            assert!(
                (numeric - got).abs() <= tol,
                "{objective:?} {name}[{at}]: analytic {got:e}, finite difference {numeric:e}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

#[test]
fn dpo_gradients_match_finite_differences_of_trls_loss() {
    check(Objective::Dpo, &[true, true]);
}

#[test]
fn kto_gradients_match_finite_differences_of_trls_loss() {
    // One desirable and one undesirable example; their second rows set the reference
    // point, which TRL holds constant (detached), and so does the finite difference.
    check(Objective::Kto, &[true, false]);
}
