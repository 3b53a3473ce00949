//! Classification metrics, as scikit-learn's `classification_report` and
//! `confusion_matrix` define them: accuracy, per-class precision / recall / F1 (0 where
//! undefined, sklearn's `zero_division=0`), their macro average, and the confusion matrix
//! (rows: true label, columns: predicted).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub per_class: Vec<ClassMetrics>,
    pub confusion_matrix: Vec<Vec<usize>>,
    pub examples: usize,
}

impl Metrics {
    /// From true and predicted label indices and the mean loss.
    pub fn compute(truth: &[usize], predicted: &[usize], labels: &[String], loss: f64) -> Self {
        let k = labels.len();
        let mut cm = vec![vec![0usize; k]; k];
        for (&t, &p) in truth.iter().zip(predicted) {
            cm[t][p] += 1;
        }
        let n = truth.len();
        let correct: usize = (0..k).map(|i| cm[i][i]).sum();
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_class: Vec<ClassMetrics> = (0..k)
            .map(|c| {
                let tp = cm[c][c];
                let predicted_c: usize = (0..k).map(|t| cm[t][c]).sum();
                let support: usize = cm[c].iter().sum();
                let precision = ratio(tp, predicted_c);
                let recall = ratio(tp, support);
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                ClassMetrics {
                    label: labels[c].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let mean = |f: fn(&ClassMetrics) -> f64| {
            if k == 0 {
                0.0
            } else {
                per_class.iter().map(f).sum::<f64>() / k as f64
            }
        };
        Self {
            loss,
            accuracy: ratio(correct, n),
            macro_f1: mean(|c| c.f1),
            macro_precision: mean(|c| c.precision),
            macro_recall: mean(|c| c.recall),
            per_class,
            confusion_matrix: cm,
            examples: n,
        }
    }

    /// A metric by name (`loss`, `accuracy`, `macro_f1`, `macro_precision`, `macro_recall`,
    /// `f1:LABEL`, `precision:LABEL`, `recall:LABEL`).
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "loss" | "eval_loss" => Some(self.loss),
            "accuracy" => Some(self.accuracy),
            "f1" | "macro_f1" => Some(self.macro_f1),
            "precision" | "macro_precision" => Some(self.macro_precision),
            "recall" | "macro_recall" => Some(self.macro_recall),
            _ => {
                let (what, label) = name.split_once(':')?;
                let c = self.per_class.iter().find(|c| c.label == label)?;
                match what {
                    "f1" => Some(c.f1),
                    "precision" => Some(c.precision),
                    "recall" => Some(c.recall),
                    _ => None,
                }
            }
        }
    }

    /// A human-readable report: the summary line, the per-class table and the matrix.
    pub fn report(&self) -> String {
        let mut s = format!(
            "loss {:.4}  accuracy {:.2}%  macro-F1 {:.4}  ({} examples)\n",
            self.loss,
            self.accuracy * 100.0,
            self.macro_f1,
            self.examples
        );
        let w = self
            .per_class
            .iter()
            .map(|c| c.label.len())
            .max()
            .unwrap_or(5)
            .max(5);
        s.push_str(&format!(
            "{:>w$}  precision  recall      f1  support\n",
            "label"
        ));
        for c in &self.per_class {
            s.push_str(&format!(
                "{:>w$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n",
                c.label, c.precision, c.recall, c.f1, c.support
            ));
        }
        s.push_str("confusion matrix (rows: true, columns: predicted)\n");
        for (c, row) in self.per_class.iter().zip(&self.confusion_matrix) {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
            s.push_str(&format!("{:>w$} {}\n", c.label, cells.join("")));
        }
        s
    }
}

/// Whether a larger value of the metric is better (everything but the loss).
pub fn higher_is_better(name: &str) -> bool {
    !matches!(name, "loss" | "eval_loss")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_scikit_learns_report_on_a_hand_checked_case() {
        // sklearn.metrics.classification_report(y_true=[0,0,0,1,1,2], y_pred=[0,0,1,1,2,2]):
        // class 0: p 1.00 r 0.667 f1 0.800; class 1: p 0.50 r 0.50 f1 0.50;
        // class 2: p 0.50 r 1.00 f1 0.667; accuracy 4/6; macro-F1 0.6556.
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let m = Metrics::compute(&[0, 0, 0, 1, 1, 2], &[0, 0, 1, 1, 2, 2], &labels, 0.5);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert!((m.per_class[0].f1 - 0.8).abs() < 1e-12);
        assert!((m.per_class[1].f1 - 0.5).abs() < 1e-12);
        assert!((m.per_class[2].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.macro_f1 - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(
            m.confusion_matrix,
            vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]
        );
        assert_eq!(m.get("f1:c"), Some(2.0 / 3.0));
        // A class never predicted: precision 0 (zero_division=0), not NaN.
        let m = Metrics::compute(&[0, 1], &[0, 0], &labels[..2], 0.0);
        assert_eq!(m.per_class[1].precision, 0.0);
        assert_eq!(m.per_class[1].f1, 0.0);
    }
}
