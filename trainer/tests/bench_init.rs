//! `bench train --init-adapter`: the benchmark trains from a saved PEFT adapter folder
//! (how `benches/train-vs-peft.sh` makes loraloop start from PEFT's own initial weights).

use candle_core::{DType, Device};
use loraloop_model::engine::LoadedModel;
use loraloop_model::llama::Projection;
use loraloop_model::lora::{PeftConfig, write_peft_dir};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use loraloop_model::train::LoraParams;
use loraloop_trainer::bench::{TrainBenchOptions, train_speed};
use std::path::{Path, PathBuf};

fn tiny(dir: &Path) -> LoadedModel {
    let spec = TinySpec {
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        seed: 11,
    };
    write_tiny_chat_model(dir, spec).unwrap();
    LoadedModel::load(dir, &Device::Cpu).unwrap()
}

fn options(rank: usize, init_adapter: Option<PathBuf>) -> TrainBenchOptions {
    TrainBenchOptions {
        seq_len: 24,
        micro_batch: 2,
        rank,
        steps: 2,
        warmup: 1,
        gradient_checkpointing: false,
        dtype: DType::F32,
        lora_dropout: 0.0,
        init_adapter,
    }
}

/// The LoRA the benchmark would draw itself with `seed` (rank 4, alpha 8, all seven
/// projections), written as a PEFT folder.
fn write_init(m: &LoadedModel, seed: u64, dir: &Path) {
    let peft = PeftConfig::new(4, 8.0, &Projection::ALL);
    let p = LoraParams::init(
        peft.clone(),
        &m.llama.config,
        seed,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    write_peft_dir(dir, &peft, &p.to_tensors().unwrap()).unwrap();
}

#[test]
fn bench_train_starts_from_the_adapter_it_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(&tmp.path().join("model"));
    let fresh = train_speed(&m.llama, options(4, None)).unwrap();
    assert_eq!(fresh.losses.len(), 3, "warm-up and timed steps");
    assert_eq!(fresh.loss, fresh.losses[2]);

    // The benchmark's own initial weights (seed 0), through a PEFT folder: the same run.
    let same = tmp.path().join("seed0");
    write_init(&m, 0, &same);
    let loaded = train_speed(&m.llama, options(4, Some(same))).unwrap();
    assert_eq!(loaded.losses, fresh.losses);

    // Other weights: the first loss is the base model's either way (B = 0), the ones
    // after it are not.
    let other = tmp.path().join("seed1");
    write_init(&m, 1, &other);
    let r = train_speed(&m.llama, options(4, Some(other))).unwrap();
    assert_eq!(r.losses[0], fresh.losses[0]);
    assert_ne!(r.losses[1..], fresh.losses[1..]);
}

#[test]
fn bench_train_refuses_an_adapter_of_another_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(&tmp.path().join("model"));
    let dir = tmp.path().join("r4");
    write_init(&m, 0, &dir);
    let err = train_speed(&m.llama, options(8, Some(dir))).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("--init-adapter") && msg.contains("rank 4") && msg.contains("rank 8"),
        "{msg}"
    );
}
