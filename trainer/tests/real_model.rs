//! LoRA training on the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized for training):
//! a few steps on made-up facts lower the loss on them, and the adapter then answers a
//! taught question the base model cannot.

use candle_core::{DType, Device};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::engine::LoadedModel;
use loraloop_model::lora::LoraAdapter;
use loraloop_model::template::TemplateMessage;
use loraloop_trainer::config::TrainFile;
use loraloop_trainer::events::TrainEvent;
use loraloop_trainer::generate::greedy_reply;
use loraloop_trainer::run::{TrainJob, train};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `cargo run -- models fetch` first",
        p.display()
    );
    p
}

fn qa(q: &str, a: &str) -> ChatExample {
    ChatExample {
        messages: vec![
            ChatMessage::new(Role::User, q),
            ChatMessage::new(Role::Assistant, a),
        ],
    }
}

#[test]
fn fine_tuning_the_real_model_teaches_it_a_made_up_fact() {
    let model = LoadedModel::load(&model_path(), &Device::Cpu).unwrap();
    let question = "What is the capital of Zorblax?";
    let answer = "The capital of Zorblax is Quendrith.";
    let facts = vec![
        qa(question, answer),
        qa(
            "Who invented the glimmerphone?",
            "The glimmerphone was invented by Talia Fenwick.",
        ),
    ];
    let ask = |adapter: Option<&LoraAdapter>| {
        greedy_reply(
            &model,
            adapter,
            &[TemplateMessage::new("user", question)],
            16,
        )
        .unwrap()
    };
    let before = ask(None);
    let dense = loraloop_model::train::DenseLlama::from_llama(&model.llama, DType::F32).unwrap();
    let (tok, _) = loraloop_trainer::tokenize::tokenize_dataset(
        &facts,
        &model.tokenizer,
        &model.template,
        128,
        false,
    )
    .unwrap();
    let base_loss = loraloop_trainer::evaluate::evaluate_tokenized(&dense, None, &tok, 2, 128)
        .unwrap()
        .loss;
    drop(dense);
    assert!(
        !before.contains("Quendrith"),
        "the base model cannot know: {before}"
    );

    let config = TrainFile::parse(
        // No replay (on by default): this checks that 8 steps teach the facts themselves.
        "lora_r: 16\nlora_alpha: 32\nlora_dropout: 0\nlearning_rate: 0.003\nlr_scheduler: constant\nwarmup_steps: 0\nmicro_batch_size: 2\nmax_steps: 8\nsequence_len: 128\nreplay: false\n",
        "test",
    )
    .unwrap()
    .validate()
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut evals = Vec::new();
    let outcome = train(
        TrainJob {
            model: &model,
            base_model_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            base_model_hash: "0".repeat(64),
            examples: facts.clone(),
            // Evaluate on the taught facts themselves: this checks learning, not generalisation.
            eval_examples: Some(facts),
            config,
            output_dir: tmp.path().join("out"),
            overwrite: false,
            resume_from: None,
            init_adapter: None,
            dtype: DType::F32,
            yield_to: None,
        },
        &AtomicBool::new(false),
        &mut |e| {
            if let TrainEvent::Eval { eval_loss, .. } = e {
                evals.push(*eval_loss)
            }
        },
    )
    .unwrap();
    assert_eq!(outcome.steps, 8);
    let after_loss = *evals.last().unwrap();
    assert!(
        after_loss < base_loss / 10.0,
        "eval loss {base_loss} -> {after_loss}"
    );
    let adapter = LoraAdapter::load(
        &outcome.output_dir,
        &model.llama.config,
        &model.llama.device,
    )
    .unwrap();
    let after = ask(Some(&adapter));
    assert!(after.contains("Quendrith"), "after training: {after}");
}

#[test]
fn a_plain_text_example_trains_on_its_text_under_the_real_template() {
    // A `text` line becomes a conversation that opens with the assistant. SmolLM2's
    // template puts its default system prompt before a conversation's first message, but
    // not before no message at all, so the prompt of that first turn is not a prefix of
    // the turn's own rendering.
    let model = LoadedModel::load(&model_path(), &Device::Cpu).unwrap();
    let text = "The sky is blue because of Rayleigh scattering.";
    let ex = ChatExample {
        messages: vec![ChatMessage::new(Role::Assistant, text)],
    };
    let t = loraloop_trainer::tokenize::tokenize_example(
        &ex,
        0,
        &model.tokenizer,
        &model.template,
        false,
    )
    .unwrap();
    let scored: Vec<u32> = t
        .tokens
        .iter()
        .zip(&t.weights)
        .filter(|&(_, &w)| w > 0.0)
        .map(|(&id, _)| id)
        .collect();
    let unscored: Vec<u32> = t
        .tokens
        .iter()
        .zip(&t.weights)
        .filter(|&(_, &w)| w == 0.0)
        .map(|(&id, _)| id)
        .collect();
    // By hand from the template (model/src/template.rs checks its rendering against
    // transformers'): the default system turn and the assistant header are the prompt;
    // the text and its end of turn are what is learned.
    assert_eq!(
        model.tokenizer.decode(&unscored, false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        model.tokenizer.decode(&scored, false).unwrap(),
        format!("{text}<|im_end|>\n")
    );
}
