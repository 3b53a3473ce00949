//! Attention caches of finished replies, kept so that a later prompt that begins with the
//! same tokens starts after them: the next message of a conversation (its prompt repeats
//! the whole history, the last reply included) and any chat that shares a system prompt.
//!
//! Reuse changes no number: the engine runs prompts and decode steps through the same
//! batched host pass, whose result for a token does not depend on how the tokens before
//! it were split into passes, so a reply started from a cached prefix is the one it would
//! be without it (the scheduler's tests check the logits to the bit).

use crate::llama::Cache;

/// Finished sequences' caches, least recently used first, within a budget of positions.
pub(super) struct PrefixCache {
    budget: usize,
    held: usize,
    entries: Vec<Entry>,
}

struct Entry {
    /// The adapter the keys and values were computed with (its activation version).
    adapter: Option<u64>,
    /// The tokens whose keys and values `cache` holds, one position each.
    tokens: Vec<u32>,
    cache: Cache,
}

impl PrefixCache {
    /// Keep at most `budget` positions (0: keep nothing).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            held: 0,
            entries: Vec::new(),
        }
    }

    /// The longest cached start of `prompt` on `adapter`, short of its last token (which
    /// must run to give the next token's logits): its length and a copy of its cache with
    /// room for `capacity` positions.
    pub fn lookup(
        &mut self,
        adapter: Option<u64>,
        prompt: &[u32],
        capacity: usize,
    ) -> candle_core::Result<Option<(usize, Cache)>> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.adapter == adapter)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .filter(|&(_, len)| len > 0)
            .max_by_key(|&(i, len)| (len, i));
        let Some((i, len)) = best else {
            return Ok(None);
        };
        let entry = self.entries.remove(i);
        let cache = entry.cache.prefix(len, capacity);
        self.entries.push(entry);
        Ok(Some((len, cache?)))
    }

    /// Keep the cache of a finished sequence: `tokens` are the ones in `cache`. An entry
    /// it extends is dropped; one that already holds all of it is kept instead.
    pub fn insert(
        &mut self,
        adapter: Option<u64>,
        tokens: Vec<u32>,
        cache: &Cache,
    ) -> candle_core::Result<()> {
        let len = tokens.len();
        if len == 0 || len > self.budget || cache.len() != len {
            return Ok(());
        }
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.adapter == adapter && e.tokens.starts_with(&tokens))
        {
            let e = self.entries.remove(i);
            self.entries.push(e);
            return Ok(());
        }
        let held = &mut self.held;
        self.entries.retain(|e| {
            let dominated = e.adapter == adapter && tokens.starts_with(&e.tokens);
            if dominated {
                *held -= e.tokens.len();
            }
            !dominated
        });
        while self.held + len > self.budget && !self.entries.is_empty() {
            let e = self.entries.remove(0);
            self.held -= e.tokens.len();
        }
        // An exact-size copy: a running cache has room for more than it holds.
        let cache = cache.prefix(len, len)?;
        self.held += len;
        self.entries.push(Entry {
            adapter,
            tokens,
            cache,
        });
        Ok(())
    }

    /// Positions held.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
