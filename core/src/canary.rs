//! Canary releases: a new adapter serves a share of new conversations, and the 👍 rates of
//! its replies and of the current adapter's replies decide whether it is promoted or rolled
//! back. This module holds the settings (`canary:` in the config), which conversations the
//! candidate serves, and the decision; storage and the services apply them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanaryConfig {
    /// The share of new conversations the candidate serves (above 0, below 1).
    pub share: f64,
    /// Rated replies each side needs before anything is decided.
    pub min_ratings: u64,
    /// Rated replies of the candidate after which an undecided canary is rolled back
    /// (users keep what they know when the evidence never settles).
    pub max_ratings: u64,
    /// One-sided confidence of the bound on the difference of 👍 rates.
    pub confidence: f64,
    /// Promote when, with that confidence, the candidate's 👍 rate is at most this much
    /// below the current adapter's (0.05: five points).
    pub max_drop: f64,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            share: 0.2,
            min_ratings: 30,
            max_ratings: 400,
            confidence: 0.95,
            max_drop: 0.05,
        }
    }
}

impl CanaryConfig {
    /// The first key whose value is out of range, with what is allowed.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let open_unit = |v: f64| v.is_finite() && v > 0.0 && v < 1.0;
        if !open_unit(self.share) {
            return Err((
                "canary.share",
                format!("got {}; allowed: above 0 and below 1", self.share),
            ));
        }
        if self.min_ratings == 0 {
            return Err(("canary.min_ratings", "got 0; allowed: 1 or more".into()));
        }
        if self.max_ratings < self.min_ratings {
            return Err((
                "canary.max_ratings",
                format!(
                    "got {}; allowed: at least canary.min_ratings ({})",
                    self.max_ratings, self.min_ratings
                ),
            ));
        }
        if !(self.confidence.is_finite() && (0.5..1.0).contains(&self.confidence)) {
            return Err((
                "canary.confidence",
                format!("got {}; allowed: 0.5 to below 1", self.confidence),
            ));
        }
        if !(self.max_drop.is_finite() && (0.0..1.0).contains(&self.max_drop)) {
            return Err((
                "canary.max_drop",
                format!("got {}; allowed: 0 to below 1", self.max_drop),
            ));
        }
        Ok(())
    }
}

/// Whether the canary `canary_id` serves conversation `conversation_id`: a hash of both,
/// so a conversation stays on one side for the whole canary and each canary draws anew.
pub fn serves(conversation_id: i64, canary_id: i64, share: f64) -> bool {
    let mut x = (conversation_id as u64) ^ (canary_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64's finalizer: consecutive ids land far apart.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    ((x >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// Rated replies of one side since the canary started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ratings {
    pub up: u64,
    pub rated: u64,
}

impl Ratings {
    pub fn rate(&self) -> Option<f64> {
        (self.rated > 0).then(|| self.up as f64 / self.rated as f64)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Wait { reason: String },
    Promote { reason: String },
    RollBack { reason: String },
}

/// The difference of 👍 rates (candidate minus current) with its confidence bounds, by
/// Agresti and Caffo's interval: one 👍 and one 👎 added to each side, which keeps the
/// bound honest when a side has all 👍 or none.
pub fn difference_bounds(candidate: Ratings, current: Ratings, confidence: f64) -> (f64, f64, f64) {
    let adjusted = |r: Ratings| {
        let n = r.rated as f64 + 2.0;
        let p = (r.up as f64 + 1.0) / n;
        (p, p * (1.0 - p) / n)
    };
    let (p1, v1) = adjusted(candidate);
    let (p0, v0) = adjusted(current);
    let d = p1 - p0;
    let half = normal_quantile(confidence) * (v1 + v0).sqrt();
    (d, d - half, d + half)
}

/// Promote, roll back or wait, from the ratings of both sides.
pub fn decide(candidate: Ratings, current: Ratings, c: &CanaryConfig) -> Decision {
    let pct = |v: f64| format!("{:.1}%", v * 100.0);
    let rates = format!(
        "👍 {} of {} rated replies ({}) against {} of {} ({}) for the current adapter",
        candidate.up,
        candidate.rated,
        candidate.rate().map(pct).unwrap_or("-".into()),
        current.up,
        current.rated,
        current.rate().map(pct).unwrap_or("-".into()),
    );
    if candidate.rated < c.min_ratings || current.rated < c.min_ratings {
        return Decision::Wait {
            reason: format!("{rates}; each side needs {} rated replies", c.min_ratings),
        };
    }
    let (d, low, high) = difference_bounds(candidate, current, c.confidence);
    let bound = format!(
        "difference {:+.1} points, {:.0}% bounds {:+.1} to {:+.1}",
        d * 100.0,
        c.confidence * 100.0,
        low * 100.0,
        high * 100.0
    );
    if high < 0.0 {
        return Decision::RollBack {
            reason: format!("{rates}: worse ({bound})"),
        };
    }
    if low > -c.max_drop {
        return Decision::Promote {
            reason: format!(
                "{rates}: at most {:.1} points worse ({bound})",
                c.max_drop * 100.0
            ),
        };
    }
    if candidate.rated >= c.max_ratings {
        return Decision::RollBack {
            reason: format!(
                "{rates}: still undecided after {} rated replies ({bound})",
                c.max_ratings
            ),
        };
    }
    Decision::Wait {
        reason: format!("{rates}: undecided ({bound})"),
    }
}

/// The standard normal quantile (inverse CDF) by Acklam's rational approximation
/// (relative error below 1.15e-9), for `p` in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const LOW: f64 = 0.02425;
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantiles_match_the_tables() {
        // Standard normal table values (e.g. NIST/SEMATECH e-Handbook, 1.3.6.7.1).
        for (p, z) in [
            (0.5, 0.0),
            (0.9, 1.281_551_6),
            (0.95, 1.644_853_6),
            (0.975, 1.959_964_0),
            (0.99, 2.326_347_9),
            (0.01, -2.326_347_9),
            (0.001, -3.090_232_3),
        ] {
            assert!((normal_quantile(p) - z).abs() < 1e-6, "p {p}");
        }
    }

    #[test]
    fn the_bounds_are_agresti_caffo_by_hand() {
        // 40 of 50 against 30 of 50, 95%: p1 = 41/52, p0 = 31/52, d = 10/52 = 0.19231,
        // se = sqrt(p1 q1/52 + p0 q0/52) = sqrt(0.0032075 + 0.0046299) = 0.088529,
        // half = 1.6448536 * 0.088529 = 0.14562 (checked with Python's statistics.NormalDist).
        let (d, lo, hi) = difference_bounds(
            Ratings { up: 40, rated: 50 },
            Ratings { up: 30, rated: 50 },
            0.95,
        );
        assert!((d - 0.192_31).abs() < 1e-4, "{d}");
        assert!((lo - (0.192_31 - 0.145_62)).abs() < 1e-4, "{lo}");
        assert!((hi - (0.192_31 + 0.145_62)).abs() < 1e-4, "{hi}");
    }

    #[test]
    fn decisions_wait_promote_and_roll_back() {
        let c = CanaryConfig::default();
        let r = |up, rated| Ratings { up, rated };
        // Too few ratings on one side: wait, whatever the rates.
        assert!(matches!(
            decide(r(29, 29), r(0, 100), &c),
            Decision::Wait { .. }
        ));
        // Bounds below are Agresti-Caffo by hand in Python (statistics.NormalDist).
        // 85% against 80%: bounds +0.05 to +9.4 points: promoted.
        assert!(matches!(
            decide(r(170, 200), r(800, 1000), &c),
            Decision::Promote { .. }
        ));
        // 37.5% against 80%: bounds -55.3 to -27.3 points: rolled back.
        assert!(matches!(
            decide(r(15, 40), r(80, 100), &c),
            Decision::RollBack { .. }
        ));
        // 75% against 80%: bounds -18.6 to +7.4 points, too few to tell: wait.
        assert!(matches!(
            decide(r(30, 40), r(80, 100), &c),
            Decision::Wait { .. }
        ));
        // 75% against 78% at max_ratings: bounds -6.8 to +0.6 points, neither clearly
        // worse nor within 5 points: rolled back, with why.
        match decide(r(300, 400), r(3120, 4000), &c) {
            Decision::RollBack { reason } => assert!(reason.contains("undecided"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_conversation_stays_on_one_side_and_the_share_holds() {
        let served = (1..=10_000).filter(|&id| serves(id, 3, 0.2)).count();
        assert!((1_800..=2_200).contains(&served), "{served}");
        assert!((1..=100).all(|id| serves(id, 3, 0.2) == serves(id, 3, 0.2)));
        // Another canary draws other conversations.
        let both = (1..=10_000)
            .filter(|&id| serves(id, 3, 0.2) && serves(id, 4, 0.2))
            .count();
        assert!(both < 600, "{both}");
    }
}
