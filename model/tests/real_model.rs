//! Tests on the real default model (SmolLM2-135M-Instruct Q4_1), fetched by the README's
//! test command (`cargo run -- models fetch`) before `cargo test`.
//!
//! Reference values come from llama.cpp commit 0c1e57098 (vendored in the
//! llama-cpp-python 0.3.36 source distribution), built for this CPU with
//! `cmake -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF`,
//! and a 60-line C++ program against its libllama that tokenizes the prompt (no BOS,
//! specials parsed), decodes it in one batch with 2 threads and then steps greedily
//! (`llama_sampler_init_greedy`), printing each chosen id and the top-5 logits.

use candle_core::{Device, Tensor};
use loraloop_model::engine::{Engine, Event, FinishReason, GenerateRequest, LoadedModel, Prompt};
use loraloop_model::llama::BatchRow;
use loraloop_model::sampling::{SamplingParams, argmax};
use loraloop_model::template::TemplateMessage;
use std::path::PathBuf;
use std::sync::OnceLock;

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

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::start(LoadedModel::load(&model_path(), &Device::Cpu).unwrap()))
}

const PROMPT: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

/// llama.cpp's ids for PROMPT (27 tokens).
const PROMPT_IDS: [u32; 27] = [
    1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
    4649, 47, 2, 198, 1, 520, 9531, 198,
];

/// llama.cpp's 32 greedy tokens after PROMPT (it does not stop at `<|im_end|>` = 2):
/// "The capital of France is Paris.<|im_end|>\n<|im_end|><|im_start|>system\n..."
const GREEDY_IDS: [u32; 32] = [
    504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1, 4093, 198, 57, 5248,
    3946, 288, 7198, 253, 725, 1406, 281, 260, 2342, 30, 339, 3543,
];

#[test]
fn the_prompt_tokenizes_like_llama_cpp() {
    assert_eq!(
        engine().model().tokenizer.encode(PROMPT, false).unwrap(),
        PROMPT_IDS
    );
}

/// Run `ids` after what `cache` holds; the logits of the last position.
fn next_logits(
    llama: &loraloop_model::llama::Llama,
    cache: &mut loraloop_model::llama::Cache,
    ids: &[u32],
) -> Vec<f32> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    llama
        .forward(&input, cache, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn greedy_decoding_gives_llama_cpps_tokens_and_close_logits() {
    let llama = &engine().model().llama;
    let mut cache = llama.new_cache();
    let mut logits = next_logits(llama, &mut cache, &PROMPT_IDS);
    // llama.cpp's top-5 logits at the first generated position (id, logit).
    let reference = [
        (504, 24.022202),
        (15319, 23.88921),
        (7026, 23.646494),
        (60, 23.58765),
        (2219, 22.956703),
    ];
    let (mut worst, mut worst_gap) = (0f32, 0f32);
    for (id, value) in reference {
        let diff = (logits[id] - value).abs();
        // Sampling only sees the differences between logits: each one's distance to the
        // top logit, ours against llama.cpp's.
        let gap = ((logits[id] - logits[reference[0].0]) - (value - reference[0].1)).abs();
        eprintln!(
            "logit {id}: ours {} llama.cpp {value} diff {diff} gap diff {gap}",
            logits[id]
        );
        worst = worst.max(diff);
        worst_gap = worst_gap.max(gap);
    }
    // Not bit-exact: llama.cpp keeps its KV cache in f16 (we keep f32), and every layer
    // rounds its input to 8 bits per block, so a last-bit difference in one sum can move
    // a value to the next 8-bit step and the logits with it. Measured: the portable Q4_1
    // loop gives a worst difference of 0.13 (gaps 0.21); the AVX2 kernel, which sums in
    // llama.cpp's own order but whose float rounding differs from both, moves the top-5
    // together by 0.40 to 0.56 with gaps within 0.16 (and the same 32 greedy tokens).
    assert!(worst < 0.75, "max logit difference {worst}");
    assert!(
        worst_gap < 0.25,
        "max difference of a logit's distance to the top one {worst_gap}"
    );
    let mut ours: Vec<usize> = (0..logits.len()).collect();
    ours.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    assert_eq!(ours[..5], reference.map(|r| r.0), "top-5 order");

    // The engine's path: the batched host pass with llama.cpp's f16 attention cache
    // (`kv_f16`, as loaded), the prompt in one pass and in two, against the same numbers.
    for split in [PROMPT_IDS.len(), 11] {
        let mut host_cache = llama.new_cache();
        let (a, b) = PROMPT_IDS.split_at(split);
        let mut host = Vec::new();
        for part in [a, b].into_iter().filter(|p| !p.is_empty()) {
            host = llama
                .forward_batch(&mut [BatchRow {
                    tokens: part,
                    cache: &mut host_cache,
                    adapter: None,
                }])
                .unwrap()
                .remove(0);
        }
        let top = reference[0];
        let host_gap = reference
            .iter()
            .map(|&(id, v)| ((host[id] - host[top.0]) - (v - top.1)).abs())
            .fold(0f32, f32::max);
        eprintln!("host pass, prompt split at {split}: worst gap difference {host_gap}");
        assert!(host_gap < 0.25, "host pass: {host_gap}");
        let mut order: Vec<usize> = (0..host.len()).collect();
        order.sort_by(|a, b| host[*b].total_cmp(&host[*a]));
        assert_eq!(order[..5], reference.map(|r| r.0), "host pass top-5 order");
    }
    let mut generated = Vec::new();
    for _ in 0..GREEDY_IDS.len() {
        let next = argmax(&logits);
        generated.push(next);
        logits = next_logits(llama, &mut cache, &[next]);
    }
    eprintln!("ours: {generated:?}");
    assert_eq!(generated, GREEDY_IDS);
}

#[test]
fn a_chat_reply_streams_and_stops_at_the_end_of_turn() {
    let messages = vec![
        TemplateMessage::new("system", "You are a helpful assistant."),
        TemplateMessage::new("user", "What is the capital of France?"),
    ];
    let mut g = engine()
        .generate(GenerateRequest {
            prompt: Prompt::Chat(messages),
            params: SamplingParams::greedy(64),
            adapter: loraloop_model::engine::AdapterChoice::Active,
            user: None,
        })
        .unwrap();
    assert_eq!(g.prompt_tokens, PROMPT_IDS.len());
    let mut streamed = String::new();
    let finished = loop {
        match g.blocking_next().expect("the engine answers") {
            Event::Text(t) => streamed.push_str(&t),
            Event::Finished(f) => break f,
            Event::Failed(m) => panic!("{m}"),
            Event::Started { adapter } => assert!(adapter.is_none()),
            Event::Queued { .. } => {}
        }
    };
    assert_eq!(finished.text, "The capital of France is Paris.");
    assert_eq!(streamed, finished.text);
    assert_eq!(finished.reason, FinishReason::Stop);
    assert_eq!(finished.token_ids, GREEDY_IDS[..7]);
}

#[test]
fn the_same_seed_gives_the_same_sampled_reply() {
    let params = SamplingParams {
        temperature: 0.9,
        seed: Some(42),
        max_new_tokens: 24,
        ..SamplingParams::default()
    };
    let run = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let g = engine()
            .generate(GenerateRequest {
                prompt: Prompt::Chat(vec![TemplateMessage::new(
                    "user",
                    "Tell me a story about a fox.",
                )]),
                params: params.clone(),
                adapter: loraloop_model::engine::AdapterChoice::Active,
                user: None,
            })
            .unwrap();
        rt.block_on(g.finish()).unwrap().token_ids
    };
    assert_eq!(run(), run());
}

#[test]
fn bad_prompts_get_clear_errors() {
    let e = engine();
    let empty = e.generate(GenerateRequest {
        prompt: Prompt::Chat(vec![TemplateMessage::new("user", "  ")]),
        params: SamplingParams::greedy(4),
        adapter: loraloop_model::engine::AdapterChoice::Active,
        user: None,
    });
    assert!(matches!(
        empty,
        Err(loraloop_model::engine::EngineError::EmptyPrompt)
    ));
    // One message longer than the whole context window (8192 tokens).
    let huge = "word ".repeat(9000);
    let err = e
        .generate(GenerateRequest {
            prompt: Prompt::Chat(vec![TemplateMessage::new("user", huge)]),
            params: SamplingParams::greedy(4),
            adapter: loraloop_model::engine::AdapterChoice::Active,
            user: None,
        })
        .unwrap_err();
    assert!(err.to_string().contains("context window"), "{err}");
}

#[test]
fn a_conversation_longer_than_the_context_drops_its_oldest_turns_but_keeps_the_system_prompt() {
    let model = engine().model();
    let long = "lorem ipsum ".repeat(700); // ~1400 tokens per turn
    let mut messages = vec![TemplateMessage::new("system", "SYSTEM-MARKER")];
    for i in 0..8 {
        messages.push(TemplateMessage::new("user", format!("question {i} {long}")));
        messages.push(TemplateMessage::new("assistant", format!("answer {i}")));
    }
    messages.push(TemplateMessage::new("user", "final question"));
    let (ids, dropped) = model.chat_prompt(&messages, 256).unwrap();
    assert!(dropped > 0);
    assert!(ids.len() <= model.context_length() - 256);
    let text = model.tokenizer.decode(&ids, false).unwrap();
    assert!(text.contains("SYSTEM-MARKER"));
    assert!(text.contains("final question"));
    assert!(
        !text.contains("question 0 "),
        "the oldest turn should be gone"
    );
    // The fewest turns are dropped: the first conversation that fits, dropping question
    // and answer pairs one at a time from the oldest, drops as many.
    let fits = |pairs: usize| {
        let mut m = vec![messages[0].clone()];
        m.extend(messages[1 + 2 * pairs..].iter().cloned());
        let text = model.template.render(&m, true).unwrap();
        model.tokenizer.encode(&text, false).unwrap().len() <= model.context_length() - 256
    };
    let pairs = (0..8).find(|&p| fits(p)).unwrap();
    assert_eq!(dropped, 2 * pairs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_decoded_together_give_llama_cpps_greedy_reply() {
    // Expected: llama.cpp's greedy reply to this ChatML prompt (see the test above); four
    // of them decoded in the same batched steps (one forward pass per token for all
    // four) must each still be it.
    let engine = engine();
    let messages = vec![
        TemplateMessage::new("system", "You are a helpful assistant."),
        TemplateMessage::new("user", "What is the capital of France?"),
    ];
    let gens: Vec<_> = (0..4)
        .map(|_| {
            engine
                .generate(GenerateRequest {
                    prompt: Prompt::Chat(messages.clone()),
                    params: SamplingParams::greedy(64),
                    adapter: loraloop_model::engine::AdapterChoice::Base,
                    user: None,
                })
                .unwrap()
        })
        .collect();
    for g in gens {
        assert_eq!(
            g.finish().await.unwrap().text,
            "The capital of France is Paris."
        );
    }
    assert!(
        engine.stats().largest_batch >= 2,
        "the replies were not decoded together: {:?}",
        engine.stats()
    );
}
