//! The training loop end to end on a tiny random chat model (byte-level tokenizer, ChatML).

use candle_core::{DType, Device};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::lora::LoraAdapter;
use loraloop_model::template::TemplateMessage;
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use loraloop_trainer::config::{TrainConfig, TrainFile};
use loraloop_trainer::events::{Ending, TrainEvent};
use loraloop_trainer::generate::greedy_reply;
use loraloop_trainer::run::{TrainJob, train};
use loraloop_trainer::training_loop::TrainOutcome;
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
    let mut j = job(model, config, out);
    j.examples = examples;
    train(j, &AtomicBool::new(false), &mut |e| events.push(e.clone())).unwrap()
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
    let adapter = LoraAdapter::load(&out, &model.llama.config, &model.llama.device).unwrap();
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
    let mut j = job(&model, c, &out);
    j.examples = dataset();
    let err = train(j, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
}

#[test]
fn a_run_that_fails_before_writing_leaves_no_folder_it_made() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let out = tmp.path().join("out");
    // Every example longer than 8 tokens: nothing to train, found after the folder exists.
    let c = config("num_epochs: 1\nval_set_size: 0\nmicro_batch_size: 8\nsequence_len: 8\n");
    for existed in [false, true] {
        if existed {
            std::fs::create_dir(&out).unwrap();
        }
        let mut j = job(&model, c.clone(), &out);
        j.examples = dataset();
        let err = train(j, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("sequence_len"), "{err}");
        assert_eq!(
            out.is_dir(),
            existed,
            "the folder is there only if it was before"
        );
    }
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
    // How far layer `i`'s query projection moved: its output on a ones vector, before
    // and after.
    let moved = |i: usize| -> f32 {
        let x = candle_core::Tensor::ones((1, 64), DType::F32, &Device::Cpu).unwrap();
        let a = tuned.llama.blocks[i].q.forward(&x, None).unwrap();
        let b = model.llama.blocks[i].q.forward(&x, None).unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let last = model.llama.blocks.len() - 1;
    assert!(last > 0, "the tiny model has more than one layer");
    for i in 0..last {
        assert_eq!(moved(i), 0.0, "layer {i} must stay frozen");
    }
    assert!(moved(last) > 0.0, "the last layer must have trained");
}

fn job<'a>(model: &'a LoadedModel, c: TrainConfig, out: &Path) -> TrainJob<'a> {
    TrainJob {
        model,
        base_model_name: "tiny".into(),
        base_model_hash: "0".repeat(64),
        examples: varied_dataset(),
        eval_examples: None,
        config: c,
        output_dir: out.to_path_buf(),
        overwrite: false,
        resume_from: None,
        init_adapter: None,
        dtype: DType::F32,
        yield_to: None,
    }
}

fn varied_dataset() -> Vec<ChatExample> {
    (0..12)
        .map(|i| {
            qa(
                &format!("Question number {i}?"),
                &format!("Answer {}.", i * 7),
            )
        })
        .collect()
}

#[test]
fn resuming_from_a_checkpoint_continues_the_same_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let c = config(
        "num_epochs: 2\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\nsave_steps: 2\nval_set_size: 0\nlora_dropout: 0.1\nlearning_rate: 0.005\n",
    );
    let mut straight = Vec::new();
    let a = tmp.path().join("a");
    train(
        job(&model, c.clone(), &a),
        &AtomicBool::new(false),
        &mut |e| straight.push(e.clone()),
    )
    .unwrap();
    let mut resumed = Vec::new();
    let mut j = job(&model, c, &tmp.path().join("b"));
    j.resume_from = Some(a.join("checkpoint-2"));
    train(j, &AtomicBool::new(false), &mut |e| resumed.push(e.clone())).unwrap();
    let (s, r) = (step_losses(&straight), step_losses(&resumed));
    assert_eq!(s.len(), 6);
    assert_eq!(
        r,
        s[2..].to_vec(),
        "same data order, dropout masks and optimizer state"
    );
}

#[test]
fn a_cancelled_run_stops_at_the_next_step_with_a_complete_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let c = config("num_epochs: 10\nmicro_batch_size: 2\nval_set_size: 0\n");
    let cancel = AtomicBool::new(false);
    let out = tmp.path().join("out");
    let o = train(job(&model, c, &out), &cancel, &mut |e| {
        if let TrainEvent::Step { step: 3, .. } = e {
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    assert_eq!(o.ending, Ending::Cancelled);
    assert_eq!(o.steps, 3);
    assert_eq!(o.adapter_dir, out.join("checkpoint-3"));
    LoraAdapter::load(&o.adapter_dir, &model.llama.config, &model.llama.device).unwrap();
    assert!(o.adapter_dir.join("optimizer.safetensors").is_file());
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no final adapter for a stopped run"
    );
}

#[test]
fn a_diverging_run_stops_and_names_the_step_and_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let c = config(
        "num_epochs: 50\nmicro_batch_size: 2\nval_set_size: 0\nlearning_rate: 1.0e30\nmax_grad_norm: 0\nsave_steps: 1\nwarmup_steps: 0\nlr_scheduler: constant\n",
    );
    let err = train(
        job(&model, c, &tmp.path().join("out")),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("the loss became NaN at step") || msg.contains("the loss became inf"),
        "{msg}"
    );
    assert!(msg.contains("checkpoint-"), "{msg}");
}

#[test]
fn early_stopping_ends_the_run_when_eval_loss_stops_improving() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    // Held-out questions unlike the training ones: memorising the training set makes the
    // eval loss rise, and patience 1 stops at the first evaluation that does not improve.
    let c = config(
        "num_epochs: 200\nmicro_batch_size: 4\nlearning_rate: 0.02\neval_steps: 3\nearly_stopping_patience: 1\nlr_scheduler: constant\nwarmup_steps: 0\n",
    );
    let mut j = job(&model, c, &tmp.path().join("out"));
    j.examples = dataset();
    j.eval_examples = Some(varied_dataset());
    let mut events = Vec::new();
    let o = train(j, &AtomicBool::new(false), &mut |e| events.push(e.clone())).unwrap();
    assert_eq!(o.ending, Ending::EarlyStopped);
    assert!(o.steps < 400);
    let evals: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval { eval_loss, .. } => Some(*eval_loss),
            _ => None,
        })
        .collect();
    let last = evals[evals.len() - 1];
    let best = evals[..evals.len() - 1]
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min);
    assert!(
        last >= best,
        "stopped on a non-improving evaluation: {evals:?}"
    );
}

fn scored_text(
    model: &LoadedModel,
    t: &loraloop_trainer::tokenize::TokenizedExample,
) -> Vec<(String, f32)> {
    // Group consecutive tokens by weight, decoded (the byte tokenizer maps 1 byte : 1 token).
    let mut out: Vec<(String, f32)> = Vec::new();
    for (i, (&tok, &w)) in t.tokens.iter().zip(&t.weights).enumerate() {
        let s = model.tokenizer.decode(&[tok], false).unwrap();
        match out.last_mut() {
            Some((text, lw)) if *lw == w && i > 0 => text.push_str(&s),
            _ => out.push((s, w)),
        }
    }
    out
}

#[test]
fn only_assistant_turns_are_scored_with_their_weights_through_the_chat_template() {
    use loraloop_trainer::tokenize::tokenize_example;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let mut skipped = ChatMessage::new(Role::Assistant, "old");
    skipped.weight = Some(0.0);
    let ex = ChatExample {
        messages: vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "Hi"),
            skipped,
            ChatMessage::new(Role::User, "Again"),
            ChatMessage::new(Role::Assistant, "Yes"),
        ],
    };
    let t = tokenize_example(&ex, 0, &model.tokenizer, &model.template, false).unwrap();
    // Expected from the ChatML template by hand: the scored spans are each assistant
    // reply plus its end-of-turn marker and newline.
    assert_eq!(
        scored_text(&model, &t),
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nold<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n".to_string(), 0.0),
            ("Yes<|im_end|>\n".to_string(), 1.0),
        ]
    );
    let all = tokenize_example(&ex, 0, &model.tokenizer, &model.template, true).unwrap();
    assert!(
        all.weights.iter().filter(|&&w| w == 0.0).count() == 5,
        "only the weight-0 turn stays out"
    );
}

#[test]
fn examples_longer_than_sequence_len_are_truncated_and_counted_and_empty_ones_refused() {
    use loraloop_trainer::tokenize::tokenize_dataset;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let long = qa(&"x".repeat(100), "short answer");
    let (ok, report) = tokenize_dataset(
        &[long.clone(), qa("q", "a")],
        &model.tokenizer,
        &model.template,
        60,
        false,
    )
    .unwrap();
    // The long prompt fills all 60 tokens: nothing scored is left, so it is dropped.
    assert_eq!((ok.len(), report.truncated, report.dropped), (1, 1, 1));
    let err = tokenize_dataset(&[long], &model.tokenizer, &model.template, 60, false).unwrap_err();
    assert!(
        err.to_string()
            .contains("no example has assistant tokens left"),
        "{err}"
    );
}

// The CUDA training setup (bf16 base, f32 LoRA weights and AdamW state), run on the CPU:
// it learns the taught answer like the f32 run, writes f32 PEFT tensors, and a resume
// from its checkpoint continues it.
#[test]
fn lora_training_with_a_bf16_base_learns_and_writes_f32_adapter_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let out = tmp.path().join("out");
    let c = config(
        "lora_r: 8\nlora_alpha: 16\nlora_dropout: 0\nlearning_rate: 0.01\nnum_epochs: 40\nmicro_batch_size: 4\nval_set_size: 0\nwarmup_steps: 2\nlr_scheduler: constant\nsave_steps: 40\n",
    );
    let mut j = job(&model, c.clone(), &out);
    j.examples = dataset();
    j.dtype = DType::BF16;
    let mut events = Vec::new();
    let outcome = train(j, &AtomicBool::new(false), &mut |e| events.push(e.clone())).unwrap();
    assert_eq!(outcome.ending, Ending::Finished);
    let losses = step_losses(&events);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first / 20.0, "loss {first} -> {last}");
    let tensors =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(!tensors.is_empty());
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));
    let adapter = LoraAdapter::load(&out, &model.llama.config, &model.llama.device).unwrap();
    assert_eq!(ask(&model, Some(&adapter)), ANSWER);

    // Resume from the step-40 checkpoint: the same losses from there on.
    let out2 = tmp.path().join("resumed");
    let mut j = job(&model, c, &out2);
    j.examples = dataset();
    j.dtype = DType::BF16;
    j.resume_from = Some(out.join("checkpoint-40"));
    let mut resumed = Vec::new();
    train(j, &AtomicBool::new(false), &mut |e| resumed.push(e.clone())).unwrap();
    assert_eq!(step_losses(&resumed), losses[40..].to_vec());
}
