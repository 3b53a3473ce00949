//! The engine thread's loop: continuous batching.
//!
//! Each round it takes new requests into a waiting line, admits what fits (a cap on
//! sequences, a budget of cache positions, a cap per user, users with the fewest replies
//! running first), runs at most `prefill_chunk` prompt tokens of the sequences still on
//! their prompts (shortest first), then one decode step for every sequence past its prompt,
//! all of them in one forward pass (`Llama::forward_batch`: each weight read once per step,
//! each row on its own adapter). New sequences join at step boundaries, and a long prompt
//! delays the others' next token, and a shorter prompt behind it, by one chunk at most. Waiting callers hear their place in line.
//!
//! A sequence holds cache positions for what it has read and written and a block of
//! [`ROOM`] more, not its whole `max_new_tokens`: three requests asking for 8,192 tokens
//! no longer keep everyone else waiting for room they may never use. When the budget has
//! no block left for a sequence that writes on, the youngest sequence is parked (vLLM's
//! preemption by recompute): its cache goes to the prefix cache, it goes back to the
//! head of the line, and it reads its prompt and what it had written again when room
//! frees. Its caller sees a pause, never a different reply.

use super::prefix::PrefixCache;
use super::sequence::Sequence;
use super::{AdapterChoice, Counters, EngineLimits, Event, Job, LoadedModel, Shared};
use crate::llama::BatchRow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

/// Cache positions a sequence is given beyond what it holds, at admission and each time
/// it fills them (the attention cache grows by as much).
pub(super) const ROOM: usize = 256;

struct Waiting {
    job: Job,
    /// The place in line last reported to the caller.
    told: Option<usize>,
}

struct Scheduler<'m> {
    model: &'m LoadedModel,
    stats: &'m Counters,
    limits: EngineLimits,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence<'m>>,
    /// Sequences that gave up their cache for older ones, oldest first: they are resumed
    /// before anything new starts.
    parked: Vec<Sequence<'m>>,
    /// The next admission's order number.
    admitted: u64,
    prefixes: PrefixCache,
}

pub(super) fn run(shared: &Shared, jobs: mpsc::Receiver<Job>) {
    let model = Arc::clone(&shared.model);
    let mut s = Scheduler {
        model: &model,
        stats: &shared.stats,
        limits: shared.limits.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        parked: Vec::new(),
        admitted: 0,
        prefixes: PrefixCache::new(shared.limits.prefix_cache_positions),
    };
    loop {
        if s.running.is_empty() && s.waiting.is_empty() && s.parked.is_empty() {
            match jobs.recv() {
                Ok(job) => s.queue(job),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            s.queue(job);
        }
        s.round(shared);
    }
}

impl<'m> Scheduler<'m> {
    /// One round: drop what was cancelled, admit, tell places, one forward pass.
    fn round(&mut self, shared: &Shared) {
        self.waiting.retain(|w| !w.job.events.is_closed());
        self.running.retain(|seq| !seq.cancelled());
        self.parked.retain(|seq| !seq.cancelled());
        self.admit(shared);
        self.tell_places();
        self.step();
    }

    fn queue(&mut self, job: Job) {
        self.waiting.push_back(Waiting { job, told: None });
    }

    /// Cache positions a job is admitted with: its prompt and room for [`ROOM`] tokens
    /// (or as many as it may generate, when fewer).
    fn reserve(&self, job: &Job) -> usize {
        (job.prompt.len() + job.params.max_new_tokens.min(ROOM)).min(self.model.context_length())
    }

    fn running_for(&self, user: &Option<String>) -> usize {
        match user {
            None => 0,
            Some(u) => self
                .running
                .iter()
                .chain(&self.parked)
                .filter(|s| s.user.as_deref() == Some(u))
                .count(),
        }
    }

    /// Resume parked sequences, oldest first, then admit waiting jobs while they fit. The
    /// next job is the earliest of a user with the fewest replies running, skipping users
    /// at their cap; what does not fit the cache budget waits for room (nothing behind it
    /// overtakes it, so it cannot starve), unless nothing runs at all: then it runs alone.
    fn admit(&mut self, shared: &Shared) {
        let mut reserved: usize = self.running.iter().map(|s| s.reserved).sum();
        while self.running.len() < self.limits.max_sequences && !self.parked.is_empty() {
            let need = self.parked[0].resume_reservation(ROOM);
            if reserved + need > self.limits.kv_positions && !self.running.is_empty() {
                return;
            }
            let mut seq = self.parked.remove(0);
            seq.reserved = need;
            reserved += need;
            self.start_from_cached_prefix(&mut seq);
            self.running.push(seq);
        }
        if !self.parked.is_empty() {
            return;
        }
        while self.running.len() < self.limits.max_sequences {
            let pick = self
                .waiting
                .iter()
                .enumerate()
                .map(|(i, w)| (i, self.running_for(&w.job.user)))
                .filter(|&(_, n)| n < self.limits.max_per_user)
                .min_by_key(|&(i, n)| (n, i));
            let Some((i, _)) = pick else { break };
            let need = self.reserve(&self.waiting[i].job);
            if reserved + need > self.limits.kv_positions && !self.running.is_empty() {
                break;
            }
            let job = self.waiting.remove(i).expect("picked from the line").job;
            let adapter = match &job.adapter {
                AdapterChoice::Active => shared.adapter.load_full(),
                AdapterChoice::Base => None,
                AdapterChoice::Fixed(a) => Some(Arc::clone(a)),
            };
            reserved += need;
            self.admitted += 1;
            let mut seq = Sequence::admit(job, adapter, self.admitted, need, self.model);
            self.start_from_cached_prefix(&mut seq);
            self.running.push(seq);
        }
    }

    /// Start `seq` after the longest cached start of what it reads, if any.
    fn start_from_cached_prefix(&mut self, seq: &mut Sequence<'m>) {
        match self
            .prefixes
            .lookup(seq.adapter_key(), seq.prompt(), seq.reserved)
        {
            Ok(Some((len, cache))) => {
                seq.start_from(len, cache);
                self.stats
                    .reused_prompt_tokens
                    .fetch_add(len as u64, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("a cached prompt prefix could not be copied: {e}"),
        }
    }

    /// Room for the position each decoding sequence writes this step, oldest first: one
    /// past its reservation gets [`ROOM`] more (or what it may still write), and when the
    /// budget has no such block, the youngest sequence is parked until it does. One
    /// sequence alone may outgrow the budget.
    fn make_room(&mut self) {
        let mut reserved: usize = self.running.iter().map(|s| s.reserved).sum();
        let mut by_age: Vec<usize> = (0..self.running.len()).collect();
        by_age.sort_by_key(|&i| self.running[i].order);
        let mut parked = vec![false; self.running.len()];
        for &i in &by_age {
            while !parked[i] && self.running[i].positions_after_step() > self.running[i].reserved {
                let seq = &self.running[i];
                let block = ROOM
                    .min(seq.max_positions.saturating_sub(seq.reserved))
                    .max(seq.positions_after_step() - seq.reserved);
                let alone = parked.iter().filter(|p| !**p).count() == 1;
                if reserved + block <= self.limits.kv_positions || alone {
                    self.running[i].reserved += block;
                    reserved += block;
                } else {
                    let youngest = *by_age
                        .iter()
                        .rev()
                        .find(|&&j| !parked[j])
                        .expect("this one is not parked");
                    parked[youngest] = true;
                    reserved -= self.running[youngest].reserved;
                }
            }
        }
        if !parked.contains(&true) {
            return;
        }
        let before = std::mem::take(&mut self.running);
        for (mut seq, parked) in before.into_iter().zip(parked) {
            if !parked {
                self.running.push(seq);
                continue;
            }
            let (adapter, tokens, cache) = seq.park(self.model);
            if let Err(e) = self.prefixes.insert(adapter, tokens, &cache) {
                tracing::warn!("a parked reply's cache was not kept: {e}");
            }
            self.stats.parked.fetch_add(1, Ordering::Relaxed);
            self.parked.push(seq);
        }
        self.parked.sort_by_key(|s| s.order);
    }

    /// Tell each waiting caller its place in line when it changed.
    fn tell_places(&mut self) {
        for (i, w) in self.waiting.iter_mut().enumerate() {
            let place = i + 1;
            if w.told != Some(place) {
                let _ = w.job.events.send(Event::Queued { position: place });
                w.told = Some(place);
            }
        }
    }

    /// How the step's `prefill_chunk` prompt tokens are shared among the sequences still
    /// on their prompts, as (index in `running`, tokens). The first admitted gets a
    /// quarter of the chunk at least, so it always moves on; the rest goes to the shortest
    /// remaining prompts first, so a short prompt behind a long one waits one step, not
    /// the whole long prompt (first come, first served made a chat wait a minute behind a
    /// 7,000-word prompt).
    fn prefill_shares(&self) -> Vec<(usize, usize)> {
        let prefilling: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].is_prefilling())
            .collect();
        let mut shares = vec![0; self.running.len()];
        let mut budget = self.limits.prefill_chunk;
        if let Some(&first) = prefilling.first() {
            let floor = (budget / 4).max(1).min(self.running[first].prompt_left());
            shares[first] = floor;
            budget -= floor;
        }
        let mut shortest = prefilling.clone();
        shortest.sort_by_key(|&i| self.running[i].prompt_left() - shares[i]);
        for i in shortest {
            let take = (self.running[i].prompt_left() - shares[i]).min(budget);
            shares[i] += take;
            budget -= take;
        }
        prefilling
            .into_iter()
            .filter(|&i| shares[i] > 0)
            .map(|i| (i, shares[i]))
            .collect()
    }

    /// One step: a token for every sequence past its prompt (sampled and streamed), and
    /// up to `prefill_chunk` prompt tokens of the sequences still on their prompts (see
    /// `prefill_shares`), all run through the model in one batched pass. Finished sequences
    /// leave their caches to the prefix cache.
    fn step(&mut self) {
        let model = self.model;
        for mut seq in std::mem::take(&mut self.running) {
            if seq.is_prefilling() {
                self.running.push(seq);
                continue;
            }
            match seq.emit(model) {
                Ok(Some(_)) => self.running.push(seq),
                Ok(None) => {
                    let (adapter, tokens, cache) = seq.into_cache();
                    if let Err(e) = self.prefixes.insert(adapter, tokens, &cache) {
                        tracing::warn!("a finished reply's cache was not kept: {e}");
                    }
                }
                Err(e) => seq.fail(e),
            }
        }
        self.make_room();
        let n = self.running.len();
        // What each sequence runs in this pass.
        let mut runs: Vec<Option<Run>> = self
            .running
            .iter()
            .map(|seq| (!seq.is_prefilling()).then_some(Run::Decode))
            .collect();
        for (i, take) in self.prefill_shares() {
            runs[i] = Some(Run::Prompt(take));
        }
        let which: Vec<usize> = (0..n).filter(|&i| runs[i].is_some()).collect();
        if which.is_empty() {
            return;
        }
        let decoded = runs.iter().filter(|r| **r == Some(Run::Decode)).count() as u64;
        if decoded > 0 {
            self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            self.stats
                .decoded_rows
                .fetch_add(decoded, Ordering::Relaxed);
            self.stats
                .largest_batch
                .fetch_max(decoded, Ordering::Relaxed);
        }
        let mut rows: Vec<BatchRow<'_>> = self
            .running
            .iter_mut()
            .zip(&runs)
            .filter_map(|(seq, run)| match run {
                Some(Run::Decode) => Some(seq.decode_row()),
                Some(Run::Prompt(k)) => Some(seq.prompt_row(*k)),
                None => None,
            })
            .collect();
        let result = model.llama.forward_batch(&mut rows);
        drop(rows);
        match result {
            Ok(logits) => {
                for (&i, l) in which.iter().zip(logits) {
                    match runs[i] {
                        Some(Run::Prompt(k)) => self.running[i].prompt_ran(k, l),
                        _ => self.running[i].set_logits(l),
                    }
                }
            }
            Err(e) => {
                for &i in &which {
                    let what = match runs[i] {
                        Some(Run::Prompt(_)) => "prompt processing",
                        _ => "decoding",
                    };
                    self.running[i].fail(format!("{what} failed: {e}"));
                }
                let mut ran = runs.iter().map(Option::is_some);
                self.running.retain(|_| !ran.next().unwrap_or(false));
            }
        }
    }
}

/// What a sequence runs in a step's pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// The token it just sampled.
    Decode,
    /// The next this many prompt tokens.
    Prompt(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Finished;
    use crate::sampling::SamplingParams;
    use crate::testing::{TinySpec, write_tiny_chat_model};
    use tokio::sync::mpsc as tmpsc;

    fn shared(limits: EngineLimits) -> (tempfile::TempDir, Shared) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_chat_model(dir.path(), TinySpec::default()).unwrap();
        let model = LoadedModel::load(dir.path(), &candle_core::Device::Cpu).unwrap();
        (dir, Shared::new(model, limits))
    }

    fn scheduler(shared: &Shared) -> Scheduler<'_> {
        Scheduler {
            model: &shared.model,
            stats: &shared.stats,
            limits: shared.limits.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            parked: Vec::new(),
            admitted: 0,
            prefixes: PrefixCache::new(shared.limits.prefix_cache_positions),
        }
    }

    /// A job of `prompt_len` byte tokens that may generate `max_new` tokens; its events.
    fn job(
        prompt_len: usize,
        max_new: usize,
        user: Option<&str>,
    ) -> (Job, tmpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = tmpsc::unbounded_channel();
        let job = Job {
            prompt: (0..prompt_len).map(|i| 70 + (i % 50) as u32).collect(),
            params: SamplingParams::greedy(max_new),
            adapter: AdapterChoice::Base,
            user: user.map(String::from),
            events: tx,
        };
        (job, rx)
    }

    fn drain(rx: &mut tmpsc::UnboundedReceiver<Event>) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    fn places(events: &[Event]) -> Vec<usize> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Queued { position } => Some(*position),
                _ => None,
            })
            .collect()
    }

    fn started(events: &[Event]) -> bool {
        events.iter().any(|e| matches!(e, Event::Started { .. }))
    }

    #[test]
    fn a_short_prompt_behind_a_long_one_is_read_in_one_step_and_the_long_one_moves_on() {
        let limits = EngineLimits {
            prefill_chunk: 16,
            ..EngineLimits::default()
        };
        let (_dir, sh) = shared(limits);
        let mut s = scheduler(&sh);
        let (long, _long_rx) = job(100, 5, None);
        s.queue(long);
        s.round(&sh);
        assert_eq!(s.running[0].prefilled(), 16, "alone, the whole chunk");
        // Short prompts keep arriving behind it: each is read in the step it joins (it
        // waited for all 100 tokens before), and the long one still gets a quarter.
        let mut short_rx = Vec::new();
        for round in 1..=3 {
            let (short, rx) = job(4, 40, None);
            short_rx.push(rx);
            s.queue(short);
            s.round(&sh);
            let short = s.running.last().unwrap();
            assert!(!short.is_prefilling(), "round {round}");
            assert_eq!(s.running[0].prefilled(), 16 + 12 * round, "round {round}");
        }
    }

    #[test]
    fn a_long_prompt_runs_in_chunks_while_a_running_reply_keeps_decoding() {
        let limits = EngineLimits {
            prefill_chunk: 16,
            ..EngineLimits::default()
        };
        let (_dir, sh) = shared(limits);
        let mut s = scheduler(&sh);
        let (short, _short_rx) = job(4, 40, None);
        s.queue(short);
        s.round(&sh);
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.running[0].prefilled(), 4, "a short prompt in one round");
        assert_eq!(s.running[0].generated(), 0);
        let (long, _long_rx) = job(100, 5, None);
        s.queue(long);
        for round in 1..=7 {
            s.round(&sh);
            // In the same forward pass: one chunk of the long prompt, one token of the
            // short reply.
            assert_eq!(
                s.running[1].prefilled(),
                (16 * round).min(100),
                "round {round}"
            );
            assert_eq!(s.running[0].generated(), round, "round {round}");
        }
        assert!(!s.running[1].is_prefilling());
        s.round(&sh);
        assert_eq!(
            s.running[1].generated(),
            1,
            "its first token the round after its prompt"
        );
    }

    #[test]
    fn requests_beyond_the_sequence_cap_hear_their_place_and_start_when_room_frees() {
        let limits = EngineLimits {
            max_sequences: 1,
            ..EngineLimits::default()
        };
        let (_dir, sh) = shared(limits);
        let mut s = scheduler(&sh);
        let (a, mut a_rx) = job(3, 3, None);
        let (b, mut b_rx) = job(3, 3, None);
        let (c, mut c_rx) = job(3, 3, None);
        s.queue(a);
        s.queue(b);
        s.queue(c);
        s.round(&sh);
        assert!(started(&drain(&mut a_rx)));
        let (b_ev, c_ev) = (drain(&mut b_rx), drain(&mut c_rx));
        assert_eq!(places(&b_ev), [1]);
        assert_eq!(places(&c_ev), [2]);
        assert!(!started(&b_ev) && !started(&c_ev));
        // A runs its prompt in round 1, samples its 3 tokens in rounds 2 to 4.
        for _ in 0..3 {
            s.round(&sh);
        }
        assert!(
            drain(&mut a_rx)
                .iter()
                .any(|e| matches!(e, Event::Finished(_)))
        );
        assert!(s.running.is_empty());
        s.round(&sh);
        assert!(started(&drain(&mut b_rx)), "B runs once A is done");
        assert_eq!(places(&drain(&mut c_rx)), [1], "C moves up");
    }

    #[test]
    fn a_user_at_the_cap_waits_while_other_users_go_first() {
        let limits = EngineLimits {
            max_sequences: 8,
            max_per_user: 1,
            ..EngineLimits::default()
        };
        let (_dir, sh) = shared(limits);
        let mut s = scheduler(&sh);
        let (a1, _r1) = job(3, 20, Some("ann"));
        let (a2, mut a2_rx) = job(3, 20, Some("ann"));
        let (b1, _r3) = job(3, 20, Some("bob"));
        let (anon, _r4) = job(3, 20, None);
        for j in [a1, a2, b1, anon] {
            s.queue(j);
        }
        s.round(&sh);
        let users: Vec<Option<&str>> = s.running.iter().map(|q| q.user.as_deref()).collect();
        assert_eq!(users, [Some("ann"), Some("bob"), None]);
        assert_eq!(
            places(&drain(&mut a2_rx)),
            [1],
            "ann's second reply waits for her first"
        );
    }

    #[test]
    fn the_cache_budget_holds_a_request_back_until_it_fits_and_a_lone_one_always_runs() {
        let limits = EngineLimits {
            kv_positions: 100,
            ..EngineLimits::default()
        };
        let (_dir, sh) = shared(limits);
        let mut s = scheduler(&sh);
        let (a, _ra) = job(10, 50, None); // reserves 60
        let (b, mut b_rx) = job(10, 50, None); // 60 more: over 100
        s.queue(a);
        s.queue(b);
        s.round(&sh);
        assert_eq!(s.running.len(), 1);
        assert_eq!(places(&drain(&mut b_rx)), [1]);

        // Alone, a request larger than the whole budget still runs.
        let mut s = scheduler(&sh);
        let (big, mut big_rx) = job(10, 500, None);
        s.queue(big);
        s.round(&sh);
        assert!(started(&drain(&mut big_rx)));
    }

    /// A rank-4 adapter on every layer's q and v projections, random.
    fn random_adapter(cfg: &crate::llama::LlamaConfig) -> crate::lora::LoraAdapter {
        use crate::llama::Projection;
        let config = serde_json::from_value(serde_json::json!({
            "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]
        }))
        .unwrap();
        let mut tensors = std::collections::HashMap::new();
        for layer in 0..cfg.num_layers {
            for (p, name) in [(Projection::Q, "q_proj"), (Projection::V, "v_proj")] {
                let (inp, out) = cfg.projection_dims(p);
                let key = |s: &str| {
                    format!(
                        "base_model.model.model.layers.{layer}.self_attn.{name}.lora_{s}.weight"
                    )
                };
                let dev = &candle_core::Device::Cpu;
                tensors.insert(
                    key("A"),
                    candle_core::Tensor::randn(0f32, 0.5, (4, inp), dev).unwrap(),
                );
                tensors.insert(
                    key("B"),
                    candle_core::Tensor::randn(0f32, 0.5, (out, 4), dev).unwrap(),
                );
            }
        }
        crate::lora::LoraAdapter::from_tensors("random".into(), config, &tensors, cfg).unwrap()
    }

    /// Rounds until every sequence is past its prompt; the first one's logits then.
    fn prompt_logits(s: &mut Scheduler<'_>, sh: &Shared) -> Vec<f32> {
        s.round(sh);
        while s.running.iter().any(|q| q.is_prefilling()) {
            s.round(sh);
        }
        s.running[0].logits().to_vec()
    }

    /// Run `job` to its end.
    fn finish(s: &mut Scheduler<'_>, sh: &Shared, job: Job) {
        s.queue(job);
        run_out(s, sh);
    }

    /// Rounds until nothing runs, waits or is parked.
    fn run_out(s: &mut Scheduler<'_>, sh: &Shared) {
        while !(s.running.is_empty() && s.waiting.is_empty() && s.parked.is_empty()) {
            s.round(sh);
        }
    }

    /// The reply a job's events end with.
    fn finished(rx: &mut tmpsc::UnboundedReceiver<Event>) -> Finished {
        drain(rx)
            .into_iter()
            .find_map(|e| match e {
                Event::Finished(f) => Some(f),
                _ => None,
            })
            .expect("the job finished")
    }

    #[test]
    fn a_short_request_starts_beside_long_max_tokens_and_a_parked_reply_resumes_unchanged() {
        // Each long job alone: the reply it must give when it shares the engine too.
        let (_dir, sh) = shared(EngineLimits::default());
        let mut s = scheduler(&sh);
        let (alone, mut alone_rx) = job(10, 400, None);
        finish(&mut s, &sh, alone);
        let reference = finished(&mut alone_rx);
        assert_eq!(
            reference.completion_tokens, 400,
            "the random model stopped early"
        );

        // Two jobs that may write 400 tokens each and a short one behind them, in a budget
        // of 700 positions. Reserving all they may write (410 each) kept the short one,
        // and the second long one, waiting for the first to end. The parked one resumes
        // from its cache kept in the prefix cache, or with none kept, by reading again.
        for prefix_cache_positions in [EngineLimits::default().prefix_cache_positions, 0] {
            let (_dir, sh) = shared(EngineLimits {
                kv_positions: 700,
                prefix_cache_positions,
                ..EngineLimits::default()
            });
            let mut s = scheduler(&sh);
            let (a, mut a_rx) = job(10, 400, None);
            let (b, mut b_rx) = job(10, 400, None);
            let (c, mut c_rx) = job(10, 20, None);
            s.queue(a);
            s.queue(b);
            s.queue(c);
            s.round(&sh);
            assert_eq!(s.running.len(), 3, "all three start at once");
            // The short one ends while the long ones write on.
            while s.running.len() == 3 {
                s.round(&sh);
            }
            assert_eq!(finished(&mut c_rx).completion_tokens, 20);
            assert!(s.running.len() == 2 && s.parked.is_empty());
            // Past their first blocks (266 positions each, then 410 each: over 700), the
            // younger is parked and resumed when the older ends, and writes what it would
            // have alone.
            run_out(&mut s, &sh);
            assert_eq!(sh.stats.parked.load(Ordering::Relaxed), 1);
            for rx in [&mut a_rx, &mut b_rx] {
                assert_eq!(finished(rx).token_ids, reference.token_ids);
            }
        }
    }

    #[test]
    fn a_prompt_that_repeats_a_finished_conversation_starts_after_it_with_the_same_numbers() {
        let limits = EngineLimits {
            prefill_chunk: 7,
            ..EngineLimits::default()
        };
        let (_dir, sh) = shared(limits);
        // The second message of a conversation: the first prompt, the reply, then more.
        let (first, _r1) = job(20, 6, None);
        let first_prompt = first.prompt.clone();
        let mut s = scheduler(&sh);
        finish(&mut s, &sh, first);
        assert_eq!(
            s.prefixes.held(),
            20 + 5,
            "the prompt and the reply's first 5 tokens"
        );
        let reused_before = sh.stats.reused_prompt_tokens.load(Ordering::Relaxed);
        let (second, _r2) = job(40, 3, None);
        let mut prompt: Vec<u32> = first_prompt;
        prompt.extend([71, 72, 73, 74, 75]);
        prompt.extend((0..15).map(|i| 90 + i));
        let second = Job {
            prompt: prompt.clone(),
            ..second
        };
        s.queue(second);
        s.round(&sh);
        assert!(
            s.running[0].prefilled() >= 20,
            "started after the cached prefix"
        );
        let reused = sh.stats.reused_prompt_tokens.load(Ordering::Relaxed) - reused_before;
        assert!(reused >= 20, "{reused} tokens reused");
        let cached = prompt_logits_from(&mut s, &sh);

        // The same prompt on a scheduler with nothing cached, in other chunks.
        let mut fresh = scheduler(&sh);
        let (again, _r3) = job(40, 3, None);
        fresh.queue(Job { prompt, ..again });
        let uncached = prompt_logits(&mut fresh, &sh);
        assert_eq!(fresh.running[0].prefilled(), 40);
        assert_eq!(
            cached.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            uncached.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "the logits after the prompt are the same to the bit"
        );
    }

    /// Rounds until the running sequence is past its prompt; its logits then.
    fn prompt_logits_from(s: &mut Scheduler<'_>, sh: &Shared) -> Vec<f32> {
        while s.running[0].is_prefilling() {
            s.round(sh);
        }
        s.running[0].logits().to_vec()
    }

    #[test]
    fn a_cached_prefix_is_reused_only_on_the_same_adapter_and_within_its_budget() {
        let limits = EngineLimits {
            prefix_cache_positions: 30,
            ..EngineLimits::default()
        };
        let (_dir, sh) = shared(limits);
        let mut s = scheduler(&sh);
        let (a, _ra) = job(20, 1, None);
        finish(&mut s, &sh, a);
        assert_eq!(s.prefixes.held(), 20);
        // On an adapter the base model's keys and values do not apply.
        let prepared = Arc::new(super::super::ActiveAdapter {
            version: 7,
            adapter: random_adapter(&sh.model.llama.config),
        });
        let (b, _rb) = job(20, 1, None);
        s.queue(Job {
            adapter: AdapterChoice::Fixed(prepared),
            ..b
        });
        s.round(&sh);
        assert_eq!(s.running[0].prefilled(), 20, "ran the whole prompt itself");
        while !s.running.is_empty() {
            s.round(&sh);
        }
        // Two entries of 20 do not fit 30: the older one went.
        assert_eq!(s.prefixes.held(), 20);
        let (c, _rc) = job(20, 1, None);
        s.queue(c);
        s.round(&sh);
        assert_eq!(
            s.running[0].prefilled(),
            20,
            "the base model's entry was evicted"
        );
    }
}
