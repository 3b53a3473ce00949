//! Tests on the real default model (SmolLM2-135M-Instruct Q4_1), fetched by the README's
//! test command (`cargo run -- models fetch`) before `cargo test`.

use candle_core::Device;
use loraloop_model::engine::{Engine, Event, GenerateRequest, LoadedModel, Prompt};
use loraloop_model::sampling::SamplingParams;
use loraloop_model::template::TemplateMessage;
use std::path::PathBuf;
use std::sync::OnceLock;

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run `cargo run -- models fetch` first", p.display());
    p
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::start(LoadedModel::load(&model_path(), &Device::Cpu).unwrap()))
}

const PROMPT: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn greedy_decoding_matches_the_reference() {
    let e = engine();
    let ids = e.model().tokenizer.encode(PROMPT, false).unwrap();
    eprintln!("prompt ids: {ids:?}");
    let mut g = e
        .generate(GenerateRequest { prompt: Prompt::Tokens(ids), params: SamplingParams::greedy(32) })
        .unwrap();
    let mut text = String::new();
    while let Some(ev) = g.blocking_next() {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Finished(f) => {
                eprintln!("finished: {:?} {} tokens, decode {:.1} tok/s", f.reason, f.completion_tokens, f.completion_tokens as f64 / f.decode_secs);
                break;
            }
            Event::Failed(m) => panic!("{m}"),
            Event::Started { .. } => {}
        }
    }
    eprintln!("text: {text:?}");
    let _ = TemplateMessage::new("user", "x");
}
