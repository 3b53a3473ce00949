//! What stands between a trained adapter and the assistant's users: the activation policy
//! (`assistant.activation`) and the thresholds a report card is held to (`gate:`).

use serde::{Deserialize, Serialize};

crate::keywords! {
    /// How a finished job's adapter reaches users.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum ActivationPolicy ("activation policy") {
        /// Only when an operator activates it.
        Manual = "manual",
        /// At once when its report card passes the gate; otherwise it is held back, with the
        /// reasons on the card.
        #[default]
        Gate = "gate",
        /// When its card passes the gate, it serves a share of new conversations (`canary:`)
        /// and is promoted or rolled back by its users' ratings against the current adapter's.
        Canary = "canary",
    }
}

/// The thresholds of the report card's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// Retention: the share of the base model's own next tokens (on its greedy answers to
    /// the general prompts) the adapter must still predict.
    pub min_retention_agreement: f64,
    /// Retention: the largest mean KL divergence from the base model on those answers, in
    /// nats per token.
    pub max_retention_kl: f64,
    /// Learned: the adapter's held-out loss may be at most this share of the base model's
    /// (1.0: it must not be worse than the base).
    pub max_heldout_loss_ratio: f64,
    /// Kept: on 👍-rated conversations kept out of training, the adapter's loss may exceed
    /// that of the adapter users have now (or the base model) by at most this share.
    pub max_rated_loss_increase: f64,
    /// How many held-out examples get a generated reply scored against the reference.
    pub heldout_replies: usize,
    /// How many of the shipped general prompts the retention probe uses (0: all).
    pub retention_prompts: usize,
    /// How many recent 👍-rated replies the card scores.
    pub rated_replies: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            min_retention_agreement: 0.85,
            max_retention_kl: 0.35,
            max_heldout_loss_ratio: 1.0,
            max_rated_loss_increase: 0.10,
            heldout_replies: 8,
            retention_prompts: 0,
            rated_replies: 64,
        }
    }
}

/// A key, its value, whether a value is allowed and what is.
type Range = (&'static str, f64, fn(f64) -> bool, &'static str);

impl GateConfig {
    /// The first key whose value is out of range, with what is allowed.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        let at_least_0 = |v: f64| v.is_finite() && v >= 0.0;
        let above_0 = |v: f64| v.is_finite() && v > 0.0;
        let to_1000 = |v: f64| v <= 1000.0;
        let to_10000 = |v: f64| v <= 10_000.0;
        let keys: [Range; 6] = [
            (
                "gate.min_retention_agreement",
                self.min_retention_agreement,
                unit,
                "0 to 1",
            ),
            (
                "gate.max_retention_kl",
                self.max_retention_kl,
                at_least_0,
                "0 or more",
            ),
            (
                "gate.max_heldout_loss_ratio",
                self.max_heldout_loss_ratio,
                above_0,
                "above 0",
            ),
            (
                "gate.max_rated_loss_increase",
                self.max_rated_loss_increase,
                at_least_0,
                "0 or more",
            ),
            (
                "gate.heldout_replies",
                self.heldout_replies as f64,
                to_1000,
                "0 to 1000",
            ),
            (
                "gate.rated_replies",
                self.rated_replies as f64,
                to_10000,
                "0 to 10000",
            ),
        ];
        match keys.into_iter().find(|&(_, v, ok, _)| !ok(v)) {
            Some((key, got, _, allowed)) => Err((key, format!("got {got}; allowed: {allowed}"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(change: fn(&mut GateConfig)) -> (&'static str, String) {
        let mut g = GateConfig::default();
        change(&mut g);
        g.check().unwrap_err()
    }

    #[test]
    fn the_first_key_out_of_range_is_named_with_what_is_allowed() {
        assert_eq!(GateConfig::default().check(), Ok(()));
        let said = |key: &'static str, text: &str| (key, text.to_string());
        assert_eq!(
            refusal(|g| g.min_retention_agreement = 1.5),
            said("gate.min_retention_agreement", "got 1.5; allowed: 0 to 1")
        );
        assert_eq!(
            refusal(|g| g.max_retention_kl = f64::NAN),
            said("gate.max_retention_kl", "got NaN; allowed: 0 or more")
        );
        assert_eq!(
            refusal(|g| g.max_heldout_loss_ratio = 0.0),
            said("gate.max_heldout_loss_ratio", "got 0; allowed: above 0")
        );
        assert_eq!(
            refusal(|g| g.max_rated_loss_increase = -0.1),
            said(
                "gate.max_rated_loss_increase",
                "got -0.1; allowed: 0 or more"
            )
        );
        assert_eq!(
            refusal(|g| g.heldout_replies = 1001),
            said("gate.heldout_replies", "got 1001; allowed: 0 to 1000")
        );
        assert_eq!(
            refusal(|g| g.rated_replies = 10_001),
            said("gate.rated_replies", "got 10001; allowed: 0 to 10000")
        );
        // Two bad keys: the first is named.
        assert_eq!(
            refusal(|g| {
                g.rated_replies = 10_001;
                g.max_retention_kl = -1.0;
            })
            .0,
            "gate.max_retention_kl"
        );
        // The ends of each range are allowed.
        let edges = GateConfig {
            min_retention_agreement: 1.0,
            max_retention_kl: 0.0,
            max_rated_loss_increase: 0.0,
            heldout_replies: 1000,
            rated_replies: 10_000,
            ..GateConfig::default()
        };
        assert_eq!(edges.check(), Ok(()));
    }
}
