//! How much the engine runs at once, and what waits.

/// The engine's admission limits. Requests beyond them wait in line (and hear their
/// place), up to `max_in_flight` in all.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineLimits {
    /// Sequences decoded together at most.
    pub max_sequences: usize,
    /// Replies running at once for one user (`GenerateRequest::user`).
    pub max_per_user: usize,
    /// Prompt tokens run per step: a long prompt delays the others' next token by about
    /// this many tokens' work at most.
    pub prefill_chunk: usize,
    /// Attention-cache positions the running sequences may reserve together (each holds
    /// what it has read and written and room for a few hundred more, taken as it writes);
    /// see [`EngineLimits::kv_positions`].
    pub kv_positions: usize,
    /// Attention-cache positions of finished replies kept to start later prompts that
    /// begin with the same tokens (a conversation's next message, a shared system
    /// prompt); 0 keeps none.
    pub prefix_cache_positions: usize,
    /// Replies running or waiting at most: a request beyond is refused at once
    /// ([`crate::engine::EngineError::Busy`]) instead of growing the line without end.
    pub max_in_flight: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_sequences: 32,
            max_per_user: 4,
            prefill_chunk: 128,
            // The default model's f32 cache takes 45 KiB a position: about 1 GiB.
            kv_positions: 24_576,
            // About 256 MiB for the default model.
            prefix_cache_positions: 5_824,
            max_in_flight: 512,
        }
    }
}

impl EngineLimits {
    /// Cache positions that fit `mib` MiB of attention cache for `config` in `dtype_bytes`
    /// per value (keys and values of every layer).
    pub fn kv_positions(
        config: &crate::llama::LlamaConfig,
        mib: usize,
        dtype_bytes: usize,
    ) -> usize {
        let per_position =
            config.num_layers * 2 * config.num_kv_heads * config.head_dim * dtype_bytes;
        (mib << 20) / per_position.max(1)
    }
}
