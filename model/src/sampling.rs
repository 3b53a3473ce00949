//! Choosing the next token: repetition penalty, temperature, top-k, top-p, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Generation settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (always the most likely token).
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to `top_p`.
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0: no limit).
    pub top_k: usize,
    /// > 1 makes tokens seen in the last `repeat_last_n` less likely (1: off).
    pub repetition_penalty: f64,
    pub repeat_last_n: usize,
    pub max_new_tokens: usize,
    /// Same seed, same prompt, same model: same reply. None draws a random seed.
    pub seed: Option<u64>,
    /// Generation stops when the text ends with one of these (the stop string is cut).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            repetition_penalty: 1.1,
            repeat_last_n: 64,
            max_new_tokens: 512,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalty (reference comparisons, tests).
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            max_new_tokens,
            ..Self::default()
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch: (logit, token) pairs.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token from `logits`; `recent` holds the tokens seen so far (prompt and reply).
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            // As llama.cpp and transformers do: divide positive logits, multiply negative ones.
            let penalty = p.repetition_penalty as f32;
            let start = recent.len().saturating_sub(p.repeat_last_n);
            let mut seen = recent[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let k = if p.top_k == 0 || p.top_k > self.candidates.len() {
            self.candidates.len()
        } else {
            p.top_k
        };
        if k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let inv_t = 1.0 / p.temperature as f32;
        let max = self.candidates[0].0;
        let mut probs: Vec<f32> = self
            .candidates
            .iter()
            .map(|(l, _)| ((l - max) * inv_t).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, q) in probs[..keep].iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return self.candidates[i].1;
            }
        }
        self.candidates[keep - 1].1
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest_logit_and_the_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(1));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0], &[]), 1);
    }

    #[test]
    fn the_repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy(1)
        });
        // Token 0 (logit 3) was seen: 3 / 2 = 1.5 < 2.0, so token 1 wins.
        assert_eq!(s.sample(&mut [3.0, 2.0, -1.0], &[0]), 1);
        let mut logits = [3.0, 2.0, -1.0];
        s.sample(&mut logits, &[0, 2]);
        assert_eq!(logits, [1.5, 2.0, -2.0]);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_top_k_one_is_greedy() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params.clone()), draw(params.clone()));
        let other = draw(SamplingParams {
            seed: Some(8),
            ..params.clone()
        });
        assert_ne!(draw(params.clone()), other);
        let k1 = draw(SamplingParams { top_k: 1, ..params });
        assert!(k1.iter().all(|&t| t == argmax(&logits)));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities after softmax at T=1: token 0 holds ~0.9999; top_p 0.5 keeps only it.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: Some(1),
            ..SamplingParams::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0, 0.0], &[]), 0);
        }
    }
}
