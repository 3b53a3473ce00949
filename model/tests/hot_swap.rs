//! The engine's hot swap under concurrent generation, on the tiny random llama fixture
//! (`fixtures/gen_tiny.py`).

use candle_core::Device;
use loraloop_model::engine::{AdapterChoice, Engine, Event, GenerateRequest, LoadedModel, Prompt};
use loraloop_model::sampling::SamplingParams;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// tiny-llama plus a word-level tokenizer over its 64 ids (`t0` .. `t63`), which the
/// engine needs to stream text.
fn tiny_engine() -> (Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), dir.path().join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let model = LoadedModel::load(dir.path(), &Device::Cpu).unwrap();
    (Engine::start(model), dir)
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Tokens(vec![3, 17, 42, 8]),
        params: SamplingParams::greedy(12),
        adapter: loraloop_model::engine::AdapterChoice::Active,
        user: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_adapters_under_concurrent_generation_gives_each_reply_exactly_one_adapter() {
    let (engine, _dir) = tiny_engine();
    let adapters = [
        None,
        Some(
            engine
                .load_adapter(fixtures().join("tiny-llama-lora"))
                .await
                .unwrap(),
        ),
        Some(
            engine
                .load_adapter(fixtures().join("tiny-llama-lora-rs"))
                .await
                .unwrap(),
        ),
    ];
    // What each adapter alone produces (greedy, so deterministic).
    let mut expected = Vec::new();
    for a in &adapters {
        engine.set_adapter(a.clone());
        expected.push(
            engine
                .generate(request())
                .unwrap()
                .finish()
                .await
                .unwrap()
                .token_ids,
        );
    }
    assert_ne!(
        expected[0], expected[1],
        "the adapter must change the reply for this test to mean anything"
    );
    assert_ne!(expected[1], expected[2]);
    // Back to the base model: a generation admitted before the swapper's first swap must
    // not run on an activation from above, which the map below does not know.
    engine.set_adapter(None);

    // version -> which adapter; version 0 stands for "no adapter".
    let kinds: Arc<Mutex<HashMap<u64, usize>>> = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (engine, kinds, stop, adapters) = (
            engine.clone(),
            kinds.clone(),
            stop.clone(),
            adapters.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let kind = i % 3;
                // Record the version before it can be observed by a generation.
                {
                    let mut map = kinds.lock().unwrap();
                    if let Some(tag) = engine.set_adapter(adapters[kind].clone()) {
                        map.insert(tag.version, kind);
                    }
                }
                i += 1;
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
            i
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut g = engine.generate(request()).unwrap();
            let mut started = None;
            loop {
                match g.next().await {
                    Some(Event::Started { adapter }) => started = Some(adapter),
                    Some(Event::Finished(f)) => return (started.expect("Started comes first"), f),
                    Some(Event::Failed(m)) => panic!("a generation failed: {m}"),
                    Some(Event::Text(_) | Event::Queued { .. }) => {}
                    None => panic!("the stream ended without a result"),
                }
            }
        }));
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        let (started, finished) = t.await.expect("no generation panicked");
        assert_eq!(
            started, finished.adapter,
            "a reply switched adapters midway"
        );
        let kind = match &finished.adapter {
            None => 0,
            Some(tag) => kinds.lock().unwrap()[&tag.version],
        };
        assert_eq!(
            finished.token_ids, expected[kind],
            "reply does not match adapter kind {kind}"
        );
        seen.insert(kind);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let swaps = swapper.await.unwrap();
    assert!(swaps > 3, "only {swaps} swaps happened");
    assert!(
        seen.len() >= 2,
        "all replies used one adapter ({seen:?}): no swap happened mid-run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_decoded_together_on_different_adapters_match_each_reply_decoded_alone() {
    let (engine, _dir) = tiny_engine();
    let mut choices = vec![AdapterChoice::Base];
    for name in ["tiny-llama-lora", "tiny-llama-lora-rs"] {
        let a = engine.load_adapter(fixtures().join(name)).await.unwrap();
        choices.push(AdapterChoice::Fixed(engine.prepare_adapter(a)));
    }
    let request = |i: usize| GenerateRequest {
        prompt: Prompt::Tokens(
            vec![3 + i as u32, 17, 42, 8 + (i % 4) as u32][..2 + i % 3].to_vec(),
        ),
        params: SamplingParams::greedy(30),
        adapter: choices[i % 3].clone(),
        user: None,
    };
    // Expected: each request alone (one row per decode step: the path the tiny-model
    // tests check against the numpy reference).
    let mut alone = Vec::new();
    for i in 0..9 {
        let f = engine.generate(request(i)).unwrap().finish().await.unwrap();
        alone.push(f.token_ids);
    }
    assert_eq!(engine.stats().largest_batch, 1);
    assert_ne!(alone[0], alone[1], "the adapters must change the replies");
    // All nine at once: they decode together, rows on different adapters in one step.
    let generations: Vec<_> = (0..9)
        .map(|i| engine.generate(request(i)).unwrap())
        .collect();
    for (i, g) in generations.into_iter().enumerate() {
        let f = g.finish().await.unwrap();
        assert_eq!(f.token_ids, alone[i], "request {i} decoded in a batch");
    }
    let stats = engine.stats();
    assert!(
        stats.largest_batch >= 2,
        "the replies were not decoded together: {stats:?}"
    );
}

#[tokio::test]
async fn an_adapter_that_does_not_fit_is_refused_and_the_active_one_stays() {
    let (engine, _dir) = tiny_engine();
    let good = engine
        .load_adapter(fixtures().join("tiny-llama-lora"))
        .await
        .unwrap();
    let tag = engine.set_adapter(Some(good));
    // An adapter for a model with another hidden size: lora_A is [r, 31] instead of [r, 32].
    let bad = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-llama-lora");
    std::fs::copy(
        src.join("adapter_config.json"),
        bad.path().join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let narrowed = tensors[key].narrow(1, 0, 31).unwrap();
    tensors.insert(key.to_string(), narrowed);
    candle_core::safetensors::save(&tensors, bad.path().join("adapter_model.safetensors")).unwrap();
    let err = engine
        .load_adapter(bad.path().to_path_buf())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not fit the base model"),
        "{err}"
    );
    assert!(err.to_string().contains("[4, 31]"), "{err}");
    assert_eq!(engine.active_adapter(), tag);
    let missing = engine
        .load_adapter(bad.path().join("nope"))
        .await
        .unwrap_err();
    assert!(
        missing.to_string().contains("adapter_config.json"),
        "{missing}"
    );
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_generation_and_the_engine_keeps_serving() {
    let (engine, _dir) = tiny_engine();
    let long = GenerateRequest {
        prompt: Prompt::Tokens(vec![3, 17]),
        params: SamplingParams::greedy(50),
        adapter: loraloop_model::engine::AdapterChoice::Active,
        user: None,
    };
    let mut g = engine.generate(long).unwrap();
    assert!(matches!(g.next().await, Some(Event::Started { .. })));
    drop(g);
    let f = engine.generate(request()).unwrap().finish().await.unwrap();
    assert_eq!(f.token_ids.len(), 12);
}
