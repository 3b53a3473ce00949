//! What stands between a trained adapter and the assistant's users: the activation policy
//! (`assistant.activation`) and the thresholds a report card is held to (`gate:`).

use serde::{Deserialize, Serialize};

/// How a finished job's adapter reaches users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationPolicy {
    /// Only when an operator activates it.
    Manual,
    /// At once when its report card passes the gate; otherwise it is held back, with the
    /// reasons on the card.
    #[default]
    Gate,
    /// When its card passes the gate, it serves a share of new conversations (`canary:`)
    /// and is promoted or rolled back by its users' ratings against the current adapter's.
    Canary,
}

impl ActivationPolicy {
    pub const NAMES: [&'static str; 3] = ["manual", "gate", "canary"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Gate => "gate",
            Self::Canary => "canary",
        }
    }

    /// The policy an assistant row names (None: unknown or unset).
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Manual, Self::Gate, Self::Canary]
            .into_iter()
            .find(|p| p.as_str() == s)
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

impl GateConfig {
    /// The first key whose value is out of range, with what is allowed.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !unit(self.min_retention_agreement) {
            return Err((
                "gate.min_retention_agreement",
                format!("got {}; allowed: 0 to 1", self.min_retention_agreement),
            ));
        }
        if !non_negative(self.max_retention_kl) {
            return Err((
                "gate.max_retention_kl",
                format!("got {}; allowed: 0 or more", self.max_retention_kl),
            ));
        }
        if !(self.max_heldout_loss_ratio.is_finite() && self.max_heldout_loss_ratio > 0.0) {
            return Err((
                "gate.max_heldout_loss_ratio",
                format!("got {}; allowed: above 0", self.max_heldout_loss_ratio),
            ));
        }
        if !non_negative(self.max_rated_loss_increase) {
            return Err((
                "gate.max_rated_loss_increase",
                format!("got {}; allowed: 0 or more", self.max_rated_loss_increase),
            ));
        }
        if self.heldout_replies > 1000 {
            return Err((
                "gate.heldout_replies",
                format!("got {}; allowed: 0 to 1000", self.heldout_replies),
            ));
        }
        if self.rated_replies > 10_000 {
            return Err((
                "gate.rated_replies",
                format!("got {}; allowed: 0 to 10000", self.rated_replies),
            ));
        }
        Ok(())
    }
}
