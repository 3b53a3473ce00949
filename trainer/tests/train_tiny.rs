//! The training loop end to end on a tiny random chat model (byte-level tokenizer, ChatML).

use candle_core::{DType, Device};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::lora::LoraAdapter;
use loraloop_model::template::TemplateMessage;
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use loraloop_trainer::config::{Method, TrainConfig, TrainFile};
use loraloop_trainer::generate::greedy_reply;
use loraloop_trainer::run::{Ending, TrainEvent, TrainJob, TrainOutcome, train};
use std::path::Path;
use std::sync::atomic::AtomicBool;

const QUESTION: &str = "What is the capital of Zorblax?";
const ANSWER: &str = "Blorp City.";

fn tiny_model(dir: &Path) -> LoadedModel {
    write_tiny_chat_model(dir, TinySpec::default()).unwrap();
    LoadedModel::load(dir, &Device::Cpu).unwrap()
}

fn qa(q: &str, a: &str) -> ChatExample {
    ChatExample {
        messages: vec![
            ChatMessage::new(Role::User, q),
            ChatMessage::new(Role::Assistant, a),
        ],
    }
}

fn dataset() -> Vec<ChatExample> {
    vec![qa(QUESTION, ANSWER); 8]
}

fn config(yaml: &str) -> TrainConfig {
    TrainFile::parse(yaml, "test").unwrap().validate().unwrap()
}

fn run(
    model: &LoadedModel,
    examples: Vec<ChatExample>,
    config: TrainConfig,
    out: &Path,
    events: &mut Vec<TrainEvent>,
) -> TrainOutcome {
    train(
        TrainJob {
            model,
            base_model_name: "tiny".into(),
            base_model_hash: "0".repeat(64),
            examples,
            eval_examples: None,
            config,
            output_dir: out.to_path_buf(),
            overwrite: false,
            resume_from: None,
            init_adapter: None,
            dtype: DType::F32,
        },
        &AtomicBool::new(false),
        &mut |e| events.push(e.clone()),
    )
    .unwrap()
}

fn step_losses(events: &[TrainEvent]) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect()
}

fn ask(model: &LoadedModel, adapter: Option<&LoraAdapter>) -> String {
    greedy_reply(
        model,
        adapter,
        &[TemplateMessage::new("user", QUESTION)],
        20,
    )
    .unwrap()
}

#[test]
fn lora_training_drives_the_loss_down_and_the_adapter_answers_what_it_was_taught() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let before = ask(&model, None);
    assert_ne!(before, ANSWER);
    let mut events = Vec::new();
    let out = tmp.path().join("out");
    let outcome = run(
        &model,
        dataset(),
        config(
            "lora_r: 8\nlora_alpha: 16\nlora_dropout: 0\nlearning_rate: 0.01\nnum_epochs: 40\nmicro_batch_size: 4\nval_set_size: 0\nwarmup_steps: 2\nlr_scheduler: constant\n",
        ),
        &out,
        &mut events,
    );
    assert_eq!(outcome.ending, Ending::Finished);
    let losses = step_losses(&events);
    assert_eq!(losses.len(), 80, "8 examples / 4 per batch x 40 epochs");
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first / 20.0, "loss {first} -> {last}");
    // The saved adapter is a PEFT folder the inference engine loads.
    let adapter = LoraAdapter::load(&out, &model.llama).unwrap();
    assert_eq!(ask(&model, Some(&adapter)), ANSWER);
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "loraloop_adapter.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn full_fine_tuning_writes_a_model_folder_that_loads_and_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let mut events = Vec::new();
    let out = tmp.path().join("out");
    run(
        &model,
        dataset(),
        config(
            "finetuning_type: full\nlearning_rate: 0.003\nnum_epochs: 20\nmicro_batch_size: 4\nval_set_size: 0\nlr_scheduler: constant\nwarmup_steps: 0\n",
        ),
        &out,
        &mut events,
    );
    let losses = step_losses(&events);
    assert!(losses.last().unwrap() < &(losses[0] / 10.0), "{losses:?}");
    let tuned = LoadedModel::load(&out, &Device::Cpu).unwrap();
    assert_eq!(ask(&tuned, None), ANSWER);
}

#[test]
fn a_run_refuses_an_output_folder_holding_another_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let out = tmp.path().join("out");
    let c = config("num_epochs: 1\nval_set_size: 0\nmicro_batch_size: 8\n");
    run(&model, dataset(), c.clone(), &out, &mut Vec::new());
    let err = train(
        TrainJob {
            model: &model,
            base_model_name: "tiny".into(),
            base_model_hash: "0".repeat(64),
            examples: dataset(),
            eval_examples: None,
            config: c,
            output_dir: out.clone(),
            overwrite: false,
            resume_from: None,
            init_adapter: None,
            dtype: DType::F32,
        },
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
}

#[test]
fn a_freeze_run_trains_only_the_last_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let mut events = Vec::new();
    let out = tmp.path().join("out");
    run(
        &model,
        dataset(),
        config(
            "finetuning_type: freeze\nfreeze_trainable_layers: 1\nnum_epochs: 2\nmicro_batch_size: 4\nval_set_size: 0\n",
        ),
        &out,
        &mut events,
    );
    let Some(TrainEvent::Started {
        trainable_params, ..
    }) = events.first()
    else {
        panic!("no start event")
    };
    // One layer of TinySpec::default(): 2 norms of 64, q/o 64x64, k/v 32x64, gate/up/down 64x128.
    assert_eq!(
        *trainable_params,
        2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128
    );
    let tuned = LoadedModel::load(&out, &Device::Cpu).unwrap();
    let a = tuned.llama.blocks[0]
        .q
        .forward(
            &candle_core::Tensor::ones((1, 64), DType::F32, &Device::Cpu).unwrap(),
            None,
        )
        .unwrap();
    let b = model.llama.blocks[0]
        .q
        .forward(
            &candle_core::Tensor::ones((1, 64), DType::F32, &Device::Cpu).unwrap(),
            None,
        )
        .unwrap();
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0, "layer 0 must stay frozen");
    let _ = Method::Freeze;
}
