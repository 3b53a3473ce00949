//! How close a generated reply is to the reference reply: the token-overlap F1 of SQuAD's
//! evaluation script (lower-cased words, punctuation dropped, counted as a multiset).

use std::collections::HashMap;

fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// Token F1 of `reply` against `reference`, in [0, 1]; 1 when both are empty.
pub fn token_f1(reply: &str, reference: &str) -> f64 {
    let (got, want) = (words(reply), words(reference));
    if got.is_empty() || want.is_empty() {
        return if got.is_empty() && want.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &want {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0usize;
    for w in &got {
        if let Some(c) = counts.get_mut(w.as_str())
            && *c > 0
        {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / got.len() as f64;
    let recall = common as f64 / want.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::token_f1;

    #[test]
    fn token_f1_counts_shared_words_as_squad_does() {
        // By hand: reply words {the, shop, opens, at, nine}, reference {it, opens, at,
        // nine}: 3 shared; precision 3/5, recall 3/4, F1 = 2 * 0.6 * 0.75 / 1.35 = 2/3.
        let f = token_f1("The shop opens at nine.", "It opens at nine");
        assert!((f - 2.0 / 3.0).abs() < 1e-12, "{f}");
        assert_eq!(token_f1("Nine!", "nine"), 1.0);
        assert_eq!(token_f1("closed", "open"), 0.0);
        // A repeated word counts once per occurrence in the reference.
        let f = token_f1("no no no", "no");
        assert!((f - 0.5).abs() < 1e-12, "{f}");
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("", "x"), 0.0);
    }
}
