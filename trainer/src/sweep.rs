//! Hyperparameter sweeps: grid or random search over training settings, each trial an
//! ordinary job; when the last trial ends its adapters are ranked by their report cards
//! (does it pass the gate, then what it learned on its held-out examples, then what it
//! kept: the least drift from the base model) and the best one may go through the
//! assistant's activation policy. Trials run in the worker that serves chat, on the base
//! model it already holds.

use crate::card::ReportCard;
use crate::events::TrainEvent;
use crate::job_card::{GateOptions, card_data, decide};
use loraloop_core::storage::{Db, JobState, TrainingJob};
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};

/// The most trials one sweep may create.
pub const MAX_TRIALS: usize = 64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Search {
    /// Every combination of the values.
    #[default]
    Grid,
    /// `trials` combinations drawn at random (seeded), without repeats.
    Random,
}

/// A stored dataset by id or by name (its latest version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DatasetRef {
    Id(i64),
    Name(String),
}

/// A sweep as `loraloop sweep --config` and `POST /api/v1/sweeps` take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub name: Option<String>,
    pub dataset: DatasetRef,
    /// The assistant the adapters are for (default: the dataset's, else the default one).
    pub assistant: Option<String>,
    #[serde(default)]
    pub search: Search,
    /// Random search: how many trials (default 8). Grid: all combinations.
    pub trials: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// Settings every trial shares (the training YAML's names, as a job's
    /// `hyperparameters`).
    #[serde(default)]
    pub hyperparameters: Map<String, Value>,
    /// What varies, each key with its values: `learning_rate`, `lora_r`, `epochs`,
    /// `replay_ratio`, `method` (lora, full, freeze, sft, dpo, kto), or any other
    /// hyperparameter.
    pub parameters: BTreeMap<String, Vec<Value>>,
    /// Put the best trial's adapter through the assistant's activation policy (gate,
    /// canary or manual) when the sweep ends.
    #[serde(default)]
    pub activate_best: bool,
}

/// One trial's settings: `method` and `epochs` apart, the rest as hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trial {
    pub method: Option<String>,
    pub epochs: Option<f64>,
    pub hyperparameters: Map<String, Value>,
    /// Just what this trial varies, for the ranking table.
    pub varied: Map<String, Value>,
}

impl SweepSpec {
    /// The trials, in a fixed order for a given spec (and seed).
    pub fn trials(&self) -> Result<Vec<Trial>, String> {
        if self.parameters.is_empty() {
            return Err("parameters is empty: name at least one setting and its values".into());
        }
        for (k, v) in &self.parameters {
            if v.is_empty() {
                return Err(format!("parameters.{k} has no values"));
            }
        }
        let keys: Vec<&String> = self.parameters.keys().collect();
        let sizes: Vec<usize> = keys.iter().map(|k| self.parameters[*k].len()).collect();
        let combos: usize = sizes
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .unwrap_or(usize::MAX);
        let pick = |mut n: usize| -> Vec<usize> {
            // Combination `n` in mixed radix, the last key fastest.
            let mut idx = vec![0; sizes.len()];
            for i in (0..sizes.len()).rev() {
                idx[i] = n % sizes[i];
                n /= sizes[i];
            }
            idx
        };
        let chosen: Vec<Vec<usize>> = match self.search {
            Search::Grid => {
                if combos > MAX_TRIALS {
                    return Err(format!(
                        "the grid has {combos} combinations, more than the {MAX_TRIALS} trials a sweep may run: use search: random with trials: N"
                    ));
                }
                (0..combos).map(pick).collect()
            }
            Search::Random => {
                let n = self.trials.unwrap_or(8);
                if n == 0 || n > MAX_TRIALS {
                    return Err(format!("trials must be from 1 to {MAX_TRIALS}, got {n}"));
                }
                if combos <= n {
                    (0..combos).map(pick).collect()
                } else {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
                    let mut seen = HashSet::new();
                    let mut out = Vec::new();
                    while out.len() < n {
                        let idx: Vec<usize> = sizes
                            .iter()
                            .map(|&s| {
                                *(0..s)
                                    .collect::<Vec<_>>()
                                    .choose(&mut rng)
                                    .expect("non-empty")
                            })
                            .collect();
                        if seen.insert(idx.clone()) {
                            out.push(idx);
                        }
                    }
                    out
                }
            }
        };
        chosen
            .into_iter()
            .map(|idx| {
                let mut t = Trial {
                    method: None,
                    epochs: None,
                    hyperparameters: self.hyperparameters.clone(),
                    varied: Map::new(),
                };
                for (k, i) in keys.iter().zip(idx) {
                    let v = self.parameters[*k][i].clone();
                    t.varied.insert((*k).clone(), v.clone());
                    match k.as_str() {
                        "method" => {
                            t.method = Some(
                                v.as_str()
                                    .ok_or_else(|| format!("parameters.method: {v} is not a name"))?
                                    .to_string(),
                            )
                        }
                        "epochs" | "n_epochs" | "num_epochs" => {
                            t.epochs =
                                Some(v.as_f64().ok_or_else(|| {
                                    format!("parameters.{k}: {v} is not a number")
                                })?)
                        }
                        "replay_ratio" => {
                            // A share above 0 means replay on; 0 means off.
                            let on = v.as_f64().is_some_and(|r| r > 0.0);
                            t.hyperparameters.insert("replay".into(), Value::Bool(on));
                            if on {
                                t.hyperparameters.insert((*k).clone(), v);
                            }
                        }
                        _ => {
                            t.hyperparameters.insert((*k).clone(), v);
                        }
                    }
                }
                Ok(t)
            })
            .collect()
    }
}

/// A trial's standing: what its report card says, for the ranking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Standing {
    pub job_id: i64,
    pub passes: bool,
    /// Held-out loss of the adapter (lower: learned more).
    pub heldout_loss: Option<f64>,
    /// Held-out loss of the base model on the same examples.
    pub base_heldout_loss: Option<f64>,
    /// KL from the base model on the retention probe (lower: kept more).
    pub drift_kl: f64,
}

impl Standing {
    pub fn of(job_id: i64, card: &ReportCard) -> Self {
        Self {
            job_id,
            passes: card.verdict.pass,
            heldout_loss: card.heldout.as_ref().map(|h| h.adapter.loss),
            base_heldout_loss: card.heldout.as_ref().map(|h| h.base.loss),
            drift_kl: card.retention.adapter.kl,
        }
    }
}

/// Best first: passing the gate, then the lowest held-out loss, then the least drift.
pub fn rank(standings: &mut [Standing]) {
    standings.sort_by(|a, b| {
        b.passes
            .cmp(&a.passes)
            .then(
                a.heldout_loss
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.heldout_loss.unwrap_or(f64::INFINITY)),
            )
            .then(a.drift_kl.total_cmp(&b.drift_kl))
    });
}

/// The standings of a sweep's trials that have a report card, best first.
pub async fn standings(db: &Db, jobs: &[TrainingJob]) -> anyhow::Result<Vec<Standing>> {
    let mut out = Vec::new();
    for j in jobs {
        if j.state() != JobState::Succeeded {
            continue;
        }
        let Some(adapter_id) = j.adapter_id else {
            continue;
        };
        let adapter = db.adapter(adapter_id).await?;
        if let Some(card) = adapter
            .report_card
            .as_deref()
            .and_then(|c| serde_json::from_str::<ReportCard>(c).ok())
        {
            out.push(Standing::of(j.id, &card));
        }
    }
    rank(&mut out);
    Ok(out)
}

/// When every trial of `sweep_id` has ended: rank them, close the sweep with the best,
/// and (with `activate_best`) put its adapter through the activation policy. Called by
/// the worker after each trial; only the call that closes the sweep acts.
pub async fn finish_if_done(db: &Db, gate: &GateOptions, sweep_id: i64) -> anyhow::Result<()> {
    let sweep = db.sweep(sweep_id).await?;
    if sweep.finished_at.is_some() {
        return Ok(());
    }
    let jobs = db.sweep_jobs(sweep_id).await?;
    if jobs.iter().any(|j| !j.state().is_final()) {
        return Ok(());
    }
    let spec: SweepSpec = serde_json::from_str(&sweep.spec)?;
    let ranked = standings(db, &jobs).await?;
    let Some(best) = ranked.first() else {
        db.finish_sweep(
            sweep_id,
            None,
            "no trial made an adapter with a report card",
        )
        .await?;
        return Ok(());
    };
    let best_job = jobs
        .iter()
        .find(|j| j.id == best.job_id)
        .expect("ranked from these jobs");
    let adapter_id = best_job.adapter_id.expect("a ranked trial has an adapter");
    let adapter = db.adapter(adapter_id).await?;
    let said = format!(
        "best of {} trials: job {} ({})",
        jobs.len(),
        best_job.id,
        adapter.name
    );
    if !db.finish_sweep(sweep_id, Some(best_job.id), &said).await? {
        return Ok(()); // another worker closed it
    }
    if !spec.activate_best {
        return Ok(());
    }
    let card: ReportCard = serde_json::from_str(adapter.report_card.as_deref().unwrap_or("null"))?;
    let data = card_data(db, gate, best_job.assistant_id, &HashSet::new()).await?;
    let decided = decide(db, gate, &data, adapter_id, &card).await?;
    let text = format!("{said}; {decided}");
    db.set_sweep_decision(sweep_id, &text).await?;
    let said = TrainEvent::Message {
        text: format!("sweep {sweep_id}: {text}"),
    };
    crate::job_events::store_event(db, best_job.id, &said).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> SweepSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_grid_is_every_combination_and_random_draws_distinct_ones() {
        let s = spec(
            json!({"dataset": "d", "parameters": {"learning_rate": [1e-4, 2e-4], "lora_r": [4, 8, 16]}}),
        );
        let t = s.trials().unwrap();
        assert_eq!(t.len(), 6);
        assert_eq!(t[0].hyperparameters["learning_rate"], 1e-4);
        assert_eq!(t[0].hyperparameters["lora_r"], 4);
        assert_eq!(t[5].hyperparameters["learning_rate"], 2e-4);
        assert_eq!(t[5].hyperparameters["lora_r"], 16);
        let r = spec(
            json!({"dataset": 1, "search": "random", "trials": 4, "seed": 7,
                            "parameters": {"learning_rate": [1, 2, 3], "lora_r": [4, 8, 16]}}),
        );
        let a = r.trials().unwrap();
        assert_eq!(a.len(), 4);
        let distinct: HashSet<String> = a
            .iter()
            .map(|t| Value::Object(t.varied.clone()).to_string())
            .collect();
        assert_eq!(distinct.len(), 4);
        assert_eq!(
            a,
            r.trials().unwrap(),
            "the same seed draws the same trials"
        );
    }

    #[test]
    fn method_epochs_and_replay_share_go_where_a_job_takes_them() {
        let s = spec(
            json!({"dataset": "d", "parameters": {"method": ["lora", "freeze"], "epochs": [2], "replay_ratio": [0, 0.2]}}),
        );
        let t = s.trials().unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].method.as_deref(), Some("lora"));
        assert_eq!(t[0].epochs, Some(2.0));
        assert_eq!(t[0].hyperparameters["replay"], false);
        assert_eq!(t[1].hyperparameters["replay"], true);
        assert_eq!(t[1].hyperparameters["replay_ratio"], 0.2);
    }

    #[test]
    fn a_grid_too_large_or_an_empty_list_is_refused() {
        let many: Vec<i64> = (0..10).collect();
        let s = spec(json!({"dataset": "d", "parameters": {"a": many, "b": many}}));
        assert!(s.trials().unwrap_err().contains("100 combinations"));
        let e = spec(json!({"dataset": "d", "parameters": {"lora_r": []}}));
        assert!(e.trials().unwrap_err().contains("no values"));
    }

    #[test]
    fn passing_trials_rank_first_then_lower_heldout_loss_then_less_drift() {
        let st = |id, passes, loss: Option<f64>, kl| Standing {
            job_id: id,
            passes,
            heldout_loss: loss,
            base_heldout_loss: None,
            drift_kl: kl,
        };
        let mut v = vec![
            st(1, false, Some(0.1), 0.0),
            st(2, true, Some(0.9), 0.5),
            st(3, true, Some(0.5), 0.9),
            st(4, true, Some(0.5), 0.1),
            st(5, true, None, 0.0),
        ];
        rank(&mut v);
        let order: Vec<i64> = v.iter().map(|s| s.job_id).collect();
        assert_eq!(order, [4, 3, 2, 5, 1]);
    }
}
