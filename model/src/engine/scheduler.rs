//! The engine thread's loop: continuous batching.
//!
//! Each round it takes new requests into a waiting line, admits what fits (a cap on
//! sequences, a budget of cache positions, a cap per user, users with the fewest replies
//! running first), runs at most `prefill_chunk` prompt tokens of the sequences still on
//! their prompts, then one decode step for every sequence past its prompt, all of them in
//! one forward pass (`Llama::forward_batch`: each weight read once per step, each row on
//! its own adapter). New sequences join at step boundaries, and a long prompt delays the
//! others' next token by one chunk at most. Waiting callers hear their place in line.

use super::sequence::Sequence;
use super::{AdapterChoice, Counters, EngineLimits, Event, Job, LoadedModel, Shared};
use crate::llama::BatchRow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

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
}

pub(super) fn run(shared: &Shared, jobs: mpsc::Receiver<Job>) {
    let model = Arc::clone(&shared.model);
    let mut s = Scheduler {
        model: &model,
        stats: &shared.stats,
        limits: shared.limits.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
    };
    loop {
        if s.running.is_empty() && s.waiting.is_empty() {
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
        self.admit(shared);
        self.tell_places();
        self.step();
    }

    fn queue(&mut self, job: Job) {
        self.waiting.push_back(Waiting { job, told: None });
    }

    /// Cache positions a job needs: its prompt and the most it may generate.
    fn reserve(&self, job: &Job) -> usize {
        (job.prompt.len() + job.params.max_new_tokens).min(self.model.context_length())
    }

    fn running_for(&self, user: &Option<String>) -> usize {
        match user {
            None => 0,
            Some(u) => self
                .running
                .iter()
                .filter(|s| s.user.as_deref() == Some(u))
                .count(),
        }
    }

    /// Admit waiting jobs while they fit. The next is the earliest job of a user with the
    /// fewest replies running, skipping users at their cap; a job that does not fit the
    /// cache budget waits for room (nothing behind it overtakes it, so it cannot starve),
    /// unless nothing runs at all: then it runs alone.
    fn admit(&mut self, shared: &Shared) {
        let mut reserved: usize = self.running.iter().map(|s| s.reserved).sum();
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
            self.running
                .push(Sequence::admit(job, adapter, need, self.model));
        }
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

    /// One step: a token for every sequence past its prompt (sampled and streamed, then
    /// all run through the model in one batched pass), and up to `prefill_chunk` prompt
    /// tokens of the sequences still on their prompts, first admitted first.
    fn step(&mut self) {
        let model = self.model;
        let n = self.running.len();
        let (mut keep, mut decode) = (vec![true; n], vec![false; n]);
        for (i, seq) in self.running.iter_mut().enumerate() {
            if seq.is_prefilling() {
                continue;
            }
            match seq.emit(model) {
                Ok(Some(_)) => decode[i] = true,
                Ok(None) => keep[i] = false,
                Err(e) => {
                    seq.fail(e);
                    keep[i] = false;
                }
            }
        }
        let mut budget = self.limits.prefill_chunk;
        for (i, seq) in self.running.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            if !seq.is_prefilling() {
                continue;
            }
            let take = seq.prompt_left().min(budget);
            budget -= take;
            if let Err(e) = seq.prefill(model, take) {
                seq.fail(format!("prompt processing failed: {e}"));
                keep[i] = false;
            }
        }
        let which: Vec<usize> = (0..n).filter(|&i| decode[i]).collect();
        if !which.is_empty() {
            let rows_n = which.len() as u64;
            self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            self.stats.decoded_rows.fetch_add(rows_n, Ordering::Relaxed);
            self.stats
                .largest_batch
                .fetch_max(rows_n, Ordering::Relaxed);
            let mut rows: Vec<BatchRow<'_>> = self
                .running
                .iter_mut()
                .zip(&decode)
                .filter(|(_, d)| **d)
                .map(|(seq, _)| seq.decode_row())
                .collect();
            let result = model.llama.forward_batch(&mut rows);
            drop(rows);
            match result {
                Ok(logits) => {
                    for (i, l) in which.into_iter().zip(logits) {
                        self.running[i].set_logits(l);
                    }
                }
                Err(e) => {
                    for i in which {
                        self.running[i].fail(format!("decoding failed: {e}"));
                        keep[i] = false;
                    }
                }
            }
        }
        let mut keep = keep.into_iter();
        self.running.retain(|_| keep.next().unwrap_or(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
