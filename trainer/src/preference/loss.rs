//! The preference losses of one example as TRL defines them, with their derivative with
//! respect to the policy's summed log-probability of each completion: the run turns that
//! derivative into (possibly negative) token weights of the ordinary cross-entropy
//! backward, since d(sum log p)/dθ = -d(sum nll)/dθ.

/// `log σ(x)`, stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// One DPO pair, TRL's `DPOTrainer` with `loss_type="sigmoid"` and no label smoothing:
/// `logits = (πc - πr) - (rc - rr)`, `loss = -log σ(β · logits)`, where π are the
/// policy's and r the reference's summed log-probabilities of the chosen (c) and
/// rejected (r) completions. Returns the loss and `dL/dπc` (`dL/dπr` is its negative).
pub fn dpo(pc: f64, pr: f64, rc: f64, rr: f64, beta: f64) -> (f64, f64) {
    let logits = (pc - pr) - (rc - rr);
    let loss = -log_sigmoid(beta * logits);
    (loss, -beta * sigmoid(-beta * logits))
}

/// The weights of KTO's two kinds of examples (TRL's `desirable_weight`,
/// `undesirable_weight`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoWeights {
    pub desirable: f64,
    pub undesirable: f64,
}

/// KTO's reference point, TRL's `KTOTrainer`: the mean log-ratio of the policy to the
/// reference on mismatched prompt/completion pairs, clamped at 0 and held constant (no
/// gradient flows through it).
pub fn kto_reference_point(policy_kl: &[f64], reference_kl: &[f64]) -> f64 {
    if policy_kl.is_empty() {
        return 0.0;
    }
    let sum: f64 = policy_kl.iter().zip(reference_kl).map(|(p, r)| p - r).sum();
    (sum / policy_kl.len() as f64).max(0.0)
}

/// One KTO example, TRL's `KTOTrainer` with `loss_type="kto"`: with `r = π - ref` the
/// completion's log-ratio and `z0` the reference point, a desirable completion costs
/// `w_d (1 - σ(β (r - z0)))` and an undesirable one `w_u (1 - σ(β (z0 - r)))`. Returns
/// the loss and `dL/dπ`.
pub fn kto(
    pi: f64,
    reference: f64,
    desirable: bool,
    z0: f64,
    beta: f64,
    w: KtoWeights,
) -> (f64, f64) {
    let r = pi - reference;
    if desirable {
        let s = sigmoid(beta * (r - z0));
        (w.desirable * (1.0 - s), -w.desirable * beta * s * (1.0 - s))
    } else {
        let s = sigmoid(beta * (z0 - r));
        (
            w.undesirable * (1.0 - s),
            w.undesirable * beta * s * (1.0 - s),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn dpo_matches_trls_formula_by_hand() {
        // Python, math only, TRL's sigmoid loss: logits = (-10 - -12) - (-11 - -11.5) = 1.5;
        // -log(sigmoid(0.15)) = 0.620957047789532; d/dπc = -0.1 * sigmoid(-0.15).
        let (loss, g) = dpo(-10.0, -12.0, -11.0, -11.5, 0.1);
        assert!(close(loss, 0.620_957_047_789_532), "{loss}");
        assert!(close(g, -0.046_257_015_465_625_05), "{g}");
        // Far from the decision boundary the loss is finite and its gradient vanishes.
        let (loss, g) = dpo(0.0, -1e4, 0.0, 0.0, 0.1);
        assert!(
            (0.0..1e-300).contains(&loss) && g.abs() < 1e-300,
            "{loss} {g}"
        );
        let (loss, _) = dpo(-1e4, 0.0, 0.0, 0.0, 0.1);
        assert!(close(loss, 1000.0), "{loss}");
    }

    #[test]
    fn kto_matches_trls_formula_by_hand() {
        // Python, math only: r = -8 - -9 = 1, z0 = 0.3, β = 0.1.
        let w = KtoWeights {
            desirable: 1.0,
            undesirable: 1.33,
        };
        let (loss, g) = kto(-8.0, -9.0, true, 0.3, 0.1, w);
        assert!(close(loss, 0.482_507_142_333_610_25), "{loss}");
        assert!(close(g, -0.024_969_399_993_066_344), "{g}");
        let (loss, g) = kto(-8.0, -9.0, false, 0.3, 0.1, w);
        assert!(close(loss, 0.688_265_500_696_298_4), "{loss}");
        assert!(close(g, 0.033_209_301_990_778_234), "{g}");
        // The reference point is the clamped mean log-ratio.
        assert!(close(
            kto_reference_point(&[-5.0, -7.0], &[-6.0, -6.5]),
            0.25
        ));
        assert_eq!(kto_reference_point(&[-7.0], &[-6.0]), 0.0);
    }
}
