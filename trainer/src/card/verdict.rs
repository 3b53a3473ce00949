//! The card's verdict: each measurement held to its threshold from the `gate:` config.
//! A check without data (no held-out examples, no rated conversations) is left out rather
//! than passed: the card says which checks it made.

use super::{Compared, Retention};
use loraloop_core::gate::GateConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// A stable name: `retention_agreement`, `retention_kl`, `heldout_loss`, `rated_loss`.
    pub name: String,
    pub value: f64,
    pub limit: f64,
    pub pass: bool,
    /// The check in words, with its numbers.
    pub says: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub pass: bool,
    pub checks: Vec<Check>,
}

impl Verdict {
    pub fn of(
        heldout: Option<&Compared>,
        rated: Option<&Compared>,
        retention: &Retention,
        gate: &GateConfig,
    ) -> Self {
        let mut checks = Vec::new();
        let d = retention.adapter;
        if d.agreement.is_finite() {
            let pass = d.agreement >= gate.min_retention_agreement;
            checks.push(Check {
                name: "retention_agreement".into(),
                value: d.agreement,
                limit: gate.min_retention_agreement,
                pass,
                says: format!(
                    "predicts {:.1}% of the base model's next tokens on {} general prompts (needs at least {:.1}%)",
                    d.agreement * 100.0,
                    retention.prompts,
                    gate.min_retention_agreement * 100.0
                ),
            });
        }
        if d.kl.is_finite() {
            checks.push(Check {
                name: "retention_kl".into(),
                value: d.kl,
                limit: gate.max_retention_kl,
                pass: d.kl <= gate.max_retention_kl,
                says: format!(
                    "KL divergence from the base model {:.3} nats/token on the general prompts (at most {:.3})",
                    d.kl, gate.max_retention_kl
                ),
            });
        }
        if let Some(h) = heldout
            && h.base.loss.is_finite()
            && h.adapter.loss.is_finite()
            && h.base.loss > 0.0
        {
            let ratio = h.adapter.loss / h.base.loss;
            checks.push(Check {
                name: "heldout_loss".into(),
                value: ratio,
                limit: gate.max_heldout_loss_ratio,
                pass: ratio <= gate.max_heldout_loss_ratio,
                says: format!(
                    "held-out loss {:.3} against the base model's {:.3} ({:.0}% of it; at most {:.0}%)",
                    h.adapter.loss,
                    h.base.loss,
                    ratio * 100.0,
                    gate.max_heldout_loss_ratio * 100.0
                ),
            });
        }
        if let Some(r) = rated {
            let (reference, who) = match &r.current {
                Some(c) => (c.loss, "the current adapter's"),
                None => (r.base.loss, "the base model's"),
            };
            if reference.is_finite() && r.adapter.loss.is_finite() && reference > 0.0 {
                let increase = r.adapter.loss / reference - 1.0;
                checks.push(Check {
                    name: "rated_loss".into(),
                    value: increase,
                    limit: gate.max_rated_loss_increase,
                    pass: increase <= gate.max_rated_loss_increase,
                    says: format!(
                        "loss on {} 👍-rated replies kept out of training {:.3} against {who} {:.3} ({:+.1}%; at most {:+.1}%)",
                        r.examples,
                        r.adapter.loss,
                        reference,
                        increase * 100.0,
                        gate.max_rated_loss_increase * 100.0
                    ),
                });
            }
        }
        Self {
            pass: checks.iter().all(|c| c.pass),
            checks,
        }
    }

    /// The failed checks, in words.
    pub fn reasons(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.says.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Scores;
    use crate::card::probe::Drift;

    fn scores(loss: f64) -> Scores {
        Scores {
            loss,
            accuracy: 0.5,
            reply_f1: None,
        }
    }

    fn compared(base: f64, current: Option<f64>, adapter: f64) -> Compared {
        Compared {
            examples: 10,
            tokens: 100,
            replies: 0,
            base: scores(base),
            current: current.map(scores),
            adapter: scores(adapter),
        }
    }

    fn retention(agreement: f64, kl: f64) -> Retention {
        Retention {
            prompts: 200,
            tokens: 5000,
            adapter: Drift { agreement, kl },
            current: None,
        }
    }

    #[test]
    fn an_adapter_that_learned_and_kept_passes() {
        let g = GateConfig::default();
        let v = Verdict::of(
            Some(&compared(2.0, None, 1.0)),
            None,
            &retention(0.95, 0.05),
            &g,
        );
        assert!(v.pass, "{v:?}");
        let names: Vec<&str> = v.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["retention_agreement", "retention_kl", "heldout_loss"]
        );
        assert!(v.reasons().is_empty());
    }

    #[test]
    fn each_threshold_holds_an_adapter_back_and_says_why() {
        let g = GateConfig::default();
        // Forgot: agreement under the threshold.
        let v = Verdict::of(None, None, &retention(0.5, 0.05), &g);
        assert!(!v.pass);
        assert_eq!(v.reasons().len(), 1);
        assert!(v.reasons()[0].contains("50.0%"), "{:?}", v.reasons());
        // Drifted: KL over the limit.
        let v = Verdict::of(None, None, &retention(0.99, 2.0), &g);
        assert!(!v.pass && v.reasons()[0].contains("KL"));
        // Learned nothing: held-out loss above the base model's.
        let v = Verdict::of(
            Some(&compared(1.0, None, 1.2)),
            None,
            &retention(0.99, 0.01),
            &g,
        );
        assert!(!v.pass && v.reasons()[0].contains("held-out loss 1.200"));
        // Worse on the rated replies than the adapter users have now (+20% > +10%).
        let v = Verdict::of(
            None,
            Some(&compared(2.0, Some(1.0), 1.2)),
            &retention(0.99, 0.01),
            &g,
        );
        assert!(!v.pass, "{v:?}");
        assert!(v.reasons()[0].contains("current adapter's 1.000"), "{v:?}");
    }
}
