//! "Did you mean ...?" suggestions for misspelt keys and job names.

/// Optimal string alignment distance (Levenshtein plus adjacent transpositions), over chars:
/// `stesp` is one edit away from `steps`.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rolling rows: i-2, i-1, i.
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(prev2[j - 2] + 1);
            }
            cur[j] = d;
        }
        std::mem::swap(&mut prev2, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidate closest to `word` (case-insensitively), if it is close enough to be a likely
/// typo: at most one edit per three characters, and at least one.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (distance(&lower, &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= (lower.chars().count().max(c.chars().count()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Like [`closest`], but first looks `word` up in a table of well-known synonyms
/// (`depends_on` -> `needs`).
pub(crate) fn closest_key<'a>(
    word: &str,
    valid: &[&'a str],
    aliases: &[(&str, &'a str)],
) -> Option<&'a str> {
    let lower = word.to_lowercase().replace('_', "-");
    aliases
        .iter()
        .find(|(alias, _)| *alias == lower)
        .map(|(_, key)| *key)
        .or_else(|| closest(word, valid.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(distance("", ""), 0);
        assert_eq!(distance("abc", ""), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("steps", "steps"), 0);
        assert_eq!(distance("stesp", "steps"), 1);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("runs_on", "runs-on"), 1);
        assert_eq!(distance("ca", "abc"), 3);
    }

    #[test]
    fn suggestions() {
        let keys = [
            "steps", "needs", "matrix", "env", "timeout", "runs-on", "image", "retry",
        ];
        assert_eq!(closest("stesp", keys), Some("steps"));
        assert_eq!(closest("Steps", keys), Some("steps"));
        assert_eq!(closest("timout", keys), Some("timeout"));
        assert_eq!(closest("runson", keys), Some("runs-on"));
        assert_eq!(closest("envv", keys), Some("env"));
        assert_eq!(closest("banana", keys), None);
        assert_eq!(closest("x", keys), None);
        assert_eq!(
            closest_key("depends_on", &keys, &[("depends-on", "needs")]),
            Some("needs")
        );
    }
}
