//! One admitted request: its prompt (run in chunks), its attention cache, its
//! sampler, and the text it has streamed so far.

use super::{ActiveAdapter, Event, FinishReason, Finished, Job, LoadedModel};
use crate::llama::{BatchRow, Cache};
use crate::sampling::Sampler;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc as tmpsc;

pub(super) struct Sequence<'m> {
    /// Who asked (fairness and the per-user cap), if the caller said.
    pub user: Option<String>,
    /// Admission order, kept when it is parked: the oldest sequences keep their room.
    pub order: u64,
    /// Cache positions set aside for it: what it has read and written, plus room for the
    /// next tokens (the scheduler adds room as it writes).
    pub reserved: usize,
    /// The most positions it can take: its prompt and `max_new_tokens`, within the context.
    pub max_positions: usize,
    pub adapter: Option<Arc<ActiveAdapter>>,
    pub cache: Cache,
    pub events: tmpsc::UnboundedSender<Event>,
    /// The tokenizer's end-of-sequence ids, looked up once per sequence.
    eos_ids: Vec<u32>,
    sampler: Sampler,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    /// Tokens to read before it samples: the prompt, or after it was parked, the prompt
    /// and all it had written.
    fill_to: usize,
    /// Tokens of `fill_to` already in the cache; the sequence decodes once all are.
    prefilled: usize,
    /// The next token's logits (set by the last prefill chunk, then by each decode step).
    logits: Vec<f32>,
    stream: crate::tokenizer::TokenStream<'m>,
    text: String,
    /// Bytes of `text` already sent (the rest may be the start of a stop string).
    sent: usize,
    admitted: Instant,
    prompt_secs: f64,
    decode_start: Instant,
}

impl<'m> Sequence<'m> {
    /// Admit `job`: its adapter is resolved now (an adapter swapped in later does not
    /// change a reply under way) and the caller hears that it started.
    pub fn admit(
        job: Job,
        adapter: Option<Arc<ActiveAdapter>>,
        order: u64,
        reserved: usize,
        model: &'m LoadedModel,
    ) -> Self {
        let _ = job.events.send(Event::Started {
            adapter: adapter.as_ref().map(|a| a.tag()),
        });
        Self {
            user: job.user,
            order,
            reserved,
            max_positions: (job.prompt.len() + job.params.max_new_tokens)
                .min(model.context_length()),
            adapter,
            cache: model.llama.new_cache(),
            events: job.events,
            eos_ids: model.tokenizer.eos_token_ids(),
            sampler: Sampler::new(job.params),
            prompt_tokens: job.prompt.len(),
            fill_to: job.prompt.len(),
            tokens: job.prompt,
            prefilled: 0,
            logits: Vec::new(),
            stream: model.tokenizer.stream(true),
            text: String::new(),
            sent: 0,
            admitted: Instant::now(),
            prompt_secs: 0.0,
            decode_start: Instant::now(),
        }
    }

    /// Prompt tokens in the cache so far.
    #[cfg(test)]
    pub fn prefilled(&self) -> usize {
        self.prefilled
    }

    /// Tokens generated so far.
    #[cfg(test)]
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_tokens
    }

    pub fn is_prefilling(&self) -> bool {
        self.prefilled < self.fill_to
    }

    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Tokens to read not yet in the cache.
    pub fn prompt_left(&self) -> usize {
        self.fill_to - self.prefilled
    }

    /// The tokens it reads before it samples (the prompt, and after it was parked, what it
    /// had written too).
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.fill_to]
    }

    /// Cache positions it holds once this step's decode token has run (its prompt rows
    /// stay within its reservation).
    pub fn positions_after_step(&self) -> usize {
        if self.is_prefilling() {
            0
        } else {
            self.tokens.len()
        }
    }

    /// The reservation to resume with after it was parked: what it has, and up to `room`
    /// more.
    pub fn resume_reservation(&self, room: usize) -> usize {
        (self.tokens.len() + room).min(self.max_positions.max(self.tokens.len()))
    }

    /// Give up the cache, to read everything again when resumed: the tokens it held,
    /// with the cache (for the prefix cache, which may spare the reading).
    pub fn park(&mut self, model: &LoadedModel) -> (Option<u64>, Vec<u32>, Cache) {
        let cache = std::mem::replace(&mut self.cache, model.llama.new_cache());
        let held = self.tokens[..cache.len()].to_vec();
        self.fill_to = self.tokens.len();
        self.prefilled = 0;
        self.reserved = 0;
        (self.adapter_key(), held, cache)
    }

    /// The adapter's activation version (None: the base model): what a cached prefix
    /// must have been computed with to be reused.
    pub fn adapter_key(&self) -> Option<u64> {
        self.adapter.as_ref().map(|a| a.version)
    }

    /// Start after `len` prompt tokens whose keys and values `cache` already holds.
    pub fn start_from(&mut self, len: usize, cache: Cache) {
        debug_assert!(len < self.fill_to && cache.len() == len);
        self.cache = cache;
        self.prefilled = len;
    }

    /// The batch row that runs the next `n` prompt tokens.
    pub fn prompt_row(&mut self, n: usize) -> BatchRow<'_> {
        BatchRow {
            tokens: &self.tokens[self.prefilled..self.prefilled + n],
            cache: &mut self.cache,
            adapter: self.adapter.as_ref().map(|a| &a.adapter),
        }
    }

    /// `n` more prompt tokens ran; `logits` are those after the last of them (the first
    /// token's, once the whole prompt is in).
    pub fn prompt_ran(&mut self, n: usize, logits: Vec<f32>) {
        self.prefilled += n;
        if !self.is_prefilling() {
            self.logits = logits;
            // (A resumed sequence keeps the times of its first reading.)
            if self.fill_to == self.prompt_tokens {
                self.prompt_secs = self.admitted.elapsed().as_secs_f64();
                self.decode_start = Instant::now();
            }
        }
    }

    /// The logits of the next token (tests compare them).
    #[cfg(test)]
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// A finished sequence's attention cache with the tokens it holds, to keep for later
    /// prompts that begin with them.
    pub fn into_cache(mut self) -> (Option<u64>, Vec<u32>, Cache) {
        let key = self.adapter_key();
        self.tokens.truncate(self.cache.len());
        (key, self.tokens, self.cache)
    }

    /// The batch row that runs the token just sampled.
    pub fn decode_row(&mut self) -> BatchRow<'_> {
        BatchRow {
            tokens: &self.tokens[self.tokens.len() - 1..],
            cache: &mut self.cache,
            adapter: self.adapter.as_ref().map(|a| &a.adapter),
        }
    }

    /// The logits after the token of [`Self::decode_row`].
    pub fn set_logits(&mut self, logits: Vec<f32>) {
        self.logits = logits;
    }

    /// Sample the next token and stream its text. Returns the token to run through the
    /// model next, or `None` when the sequence is finished (its last event sent).
    pub fn emit(&mut self, model: &'m LoadedModel) -> Result<Option<u32>, String> {
        let token = self.sampler.sample(&mut self.logits, &self.tokens);
        let eos = self.eos_ids.contains(&token);
        let completion = self.tokens.len() - self.prompt_tokens;
        if !eos {
            self.tokens.push(token);
            if let Some(piece) = self.stream.push(token).map_err(|e| e.to_string())? {
                self.text.push_str(&piece);
            }
        }
        let params = self.sampler.params();
        // Stop strings: cut at the first match; otherwise hold back a possible prefix of one.
        let mut stop_at = None;
        for s in &params.stop {
            if let Some(i) = self.text.find(s.as_str()) {
                stop_at = Some(stop_at.map_or(i, |j: usize| j.min(i)));
            }
        }
        let hit_length =
            completion + 1 >= params.max_new_tokens || self.tokens.len() >= model.context_length();
        let done = eos || stop_at.is_some() || hit_length;
        if let Some(i) = stop_at {
            self.text.truncate(i);
        } else if done
            && let Some(rest) = std::mem::replace(&mut self.stream, model.tokenizer.stream(true))
                .finish()
                .map_err(|e| e.to_string())?
        {
            self.text.push_str(&rest);
        }
        let hold = if done {
            0
        } else {
            held_back(&self.text, &params.stop)
        };
        let upto = self.text.len() - hold;
        if upto > self.sent {
            let _ = self
                .events
                .send(Event::Text(self.text[self.sent..upto].to_string()));
            self.sent = upto;
        }
        if !done {
            return Ok(Some(token));
        }
        let _ = self.events.send(Event::Finished(Finished {
            text: std::mem::take(&mut self.text),
            token_ids: self.tokens[self.prompt_tokens..].to_vec(),
            reason: if eos || stop_at.is_some() {
                FinishReason::Stop
            } else {
                FinishReason::Length
            },
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.tokens.len() - self.prompt_tokens,
            adapter: self.adapter.as_ref().map(|a| a.tag()),
            prompt_secs: self.prompt_secs,
            decode_secs: self.decode_start.elapsed().as_secs_f64(),
        }));
        Ok(None)
    }

    pub fn fail(&self, message: String) {
        let _ = self.events.send(Event::Failed(message));
    }
}

/// Bytes at the end of `text` that could begin a stop string (not yet safe to send).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for len in (1..s.len()).rev() {
            if len <= text.len()
                && text.is_char_boundary(text.len() - len)
                && s.is_char_boundary(len)
                && text.ends_with(&s[..len])
            {
                hold = hold.max(len);
                break;
            }
        }
    }
    hold
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(held_back("Hello\nUs", &stops), 3);
        assert_eq!(held_back("Hello", &stops), 0);
        assert_eq!(held_back("Hello\n", &stops), 1);
    }
}
