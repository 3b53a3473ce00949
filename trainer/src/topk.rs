//! The `k` largest entries of a row of scores: the base model's most likely next tokens,
//! which distilled replay learns and the retention probe compares against.

/// Indices of the `k` largest values, largest first (`k` is clamped to 1..=len).
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if idx.is_empty() {
        return idx;
    }
    let k = k.clamp(1, idx.len());
    let by_value = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]);
    idx.select_nth_unstable_by(k - 1, by_value);
    idx.truncate(k);
    idx.sort_by(by_value);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_come_first() {
        let v = [0.1, 3.0, -1.0, 2.5, 7.0, 0.0];
        assert_eq!(top_k(&v, 3), [4, 1, 3]);
        assert_eq!(top_k(&v, 100).len(), 6);
        assert_eq!(top_k(&v, 0), [4]);
        assert!(top_k(&[], 4).is_empty());
    }
}
