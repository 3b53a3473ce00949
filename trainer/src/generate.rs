//! Greedy generation for evaluation samples and replay: the same forward pass the engine
//! runs, without its threads and streaming.

use loraloop_model::engine::LoadedModel;
use loraloop_model::llama::BatchRow;
use loraloop_model::lora::LoraAdapter;
use loraloop_model::template::TemplateMessage;

/// The greedy reply to `messages` (at most `max_new_tokens`, stopping at end of turn).
pub fn greedy_reply(
    model: &LoadedModel,
    adapter: Option<&LoraAdapter>,
    messages: &[TemplateMessage],
    max_new_tokens: usize,
) -> Result<String, String> {
    let (_, out) = greedy_tokens(model, adapter, messages, max_new_tokens)?;
    model
        .tokenizer
        .decode(&out, true)
        .map_err(|e| e.to_string())
}

/// The prompt's tokens and the greedy reply's (without the end-of-turn token).
pub fn greedy_tokens(
    model: &LoadedModel,
    adapter: Option<&LoraAdapter>,
    messages: &[TemplateMessage],
    max_new_tokens: usize,
) -> Result<(Vec<u32>, Vec<u32>), String> {
    let (prompt, _) = model
        .chat_prompt(messages, max_new_tokens)
        .map_err(|e| e.to_string())?;
    let llama = &model.llama;
    let eos = model.tokenizer.eos_token_ids();
    let mut cache = llama.new_cache();
    let mut input = prompt.clone();
    let mut out = Vec::new();
    for _ in 0..max_new_tokens {
        let logits = llama
            .forward_batch(&mut [BatchRow {
                tokens: &input,
                cache: &mut cache,
                adapter,
            }])
            .map_err(|e| e.to_string())?
            .remove(0);
        let next = loraloop_model::sampling::argmax(&logits);
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    Ok((prompt, out))
}
