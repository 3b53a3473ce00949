//! Loaded adapters kept in memory, least recently used first out, under a memory cap.
//! Evicting one only drops the cache's reference: replies already running on it keep
//! theirs, and the next request for it loads it again (off the engine thread).

use loraloop_model::engine::ActiveAdapter;
use std::collections::HashMap;
use std::sync::Arc;

pub struct AdapterCache {
    cap_bytes: usize,
    used_bytes: usize,
    clock: u64,
    /// Adapter id -> (the adapter, its bytes, when it was last used).
    entries: HashMap<i64, (Arc<ActiveAdapter>, usize, u64)>,
}

impl AdapterCache {
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            cap_bytes,
            used_bytes: 0,
            clock: 0,
            entries: HashMap::new(),
        }
    }

    /// The adapter, marked as just used.
    pub fn get(&mut self, id: i64) -> Option<Arc<ActiveAdapter>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(&id).map(|(a, _, used)| {
            *used = clock;
            Arc::clone(a)
        })
    }

    /// Keep `adapter`, evicting the least recently used others until the cap holds (the
    /// newest stays even when it alone is over the cap: it is about to run). Returns the
    /// ids evicted.
    pub fn insert(&mut self, id: i64, adapter: Arc<ActiveAdapter>) -> Vec<i64> {
        self.remove(id);
        self.clock += 1;
        let bytes = adapter.adapter.memory_bytes();
        self.entries.insert(id, (adapter, bytes, self.clock));
        self.used_bytes += bytes;
        let mut evicted = Vec::new();
        while self.used_bytes > self.cap_bytes {
            let oldest = self
                .entries
                .iter()
                .filter(|(k, _)| **k != id)
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| *k);
            let Some(k) = oldest else { break };
            self.remove(k);
            evicted.push(k);
        }
        evicted
    }

    pub fn remove(&mut self, id: i64) {
        if let Some((_, bytes, _)) = self.entries.remove(&id) {
            self.used_bytes -= bytes;
        }
    }

    /// Adapters held and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        (self.entries.len(), self.used_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use loraloop_model::llama::{LlamaConfig, Projection};
    use loraloop_model::lora::{LoraAdapter, PeftConfig, random_peft_tensors};

    fn config() -> LlamaConfig {
        LlamaConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}"#,
        )
        .unwrap()
    }

    fn adapter(version: u64) -> Arc<ActiveAdapter> {
        let cfg = config();
        let peft = PeftConfig::new(4, 8.0, &[Projection::Q]);
        let tensors = random_peft_tensors(&cfg, &peft, 0.02, &Device::Cpu).unwrap();
        let adapter = LoraAdapter::from_tensors("a".into(), peft, &tensors, &cfg).unwrap();
        Arc::new(ActiveAdapter { version, adapter })
    }

    #[test]
    fn an_adapter_counts_its_tensors_and_host_copies() {
        // By hand: rank 4 on q (32 -> 32) in 2 layers. Per layer: A^T 32x4 and sB^T 4x32
        // in f32 (1024 bytes), and the host copy in f32 + f16 (6 bytes a value) of A
        // (4x32) and B padded to whole 16-row tiles (32 rows x 4): 6 * 4 * 64 = 1536.
        assert_eq!(adapter(1).adapter.memory_bytes(), 2 * (1024 + 1536));
    }

    #[test]
    fn the_least_recently_used_adapter_goes_first_when_the_cap_is_reached() {
        let one = adapter(1).adapter.memory_bytes();
        let mut cache = AdapterCache::new(2 * one + one / 2);
        assert!(cache.insert(1, adapter(1)).is_empty());
        assert!(cache.insert(2, adapter(2)).is_empty());
        assert!(cache.get(1).is_some()); // 2 is now the least recently used
        assert_eq!(cache.insert(3, adapter(3)), [2]);
        assert!(cache.get(2).is_none());
        assert_eq!(cache.usage(), (2, 2 * one));
        // One adapter over the whole cap still stays: it is about to run.
        let mut small = AdapterCache::new(one / 2);
        assert!(small.insert(7, adapter(7)).is_empty());
        assert_eq!(small.usage(), (1, one));
    }
}
