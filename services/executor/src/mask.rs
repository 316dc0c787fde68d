//! Secret masking: every occurrence of a secret in a job's output becomes `***` before the
//! output leaves the executor, so no `LogChunk` on the log ever carries a secret.
//!
//! * [`Secrets`] is the set of byte patterns to mask, built from secret values. A multi-line
//!   value is masked line by line (as GitHub does: a secret printed with its lines
//!   re-indented or one line alone is still masked); lines shorter than [`MIN_SECRET_LEN`]
//!   bytes are not patterns of their own (they would mask every `ok` in a log). The secrets
//!   API refuses values that would give no pattern at all.
//! * [`Secrets::mask`] masks a whole text: left to right, at each position the longest pattern
//!   that matches there is replaced by `***`.
//! * [`Masker`] is the same function over a stream cut into arbitrary chunks: it holds back at
//!   most `max_len - 1` bytes at the end of a chunk (a possible beginning of a secret) until
//!   the next chunk or [`Masker::finish`] decides them. For every split of a text into chunks
//!   the concatenated output equals [`Secrets::mask`] of the text (property-tested below), so a
//!   secret printed in two halves with a pause between them is masked like one printed at once.
//!
//! A secret that contains `***` itself could be re-formed by the replacement next to
//! surrounding output; for secrets without `*` the masked text never contains one.

use std::sync::Arc;

/// What replaces each secret.
pub const MASK: &[u8] = b"***";

/// Shortest line of a secret that is masked on its own.
pub const MIN_SECRET_LEN: usize = 4;

/// The patterns to mask, longest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    patterns: Vec<Vec<u8>>,
    max_len: usize,
    /// Whether a byte starts some pattern (256 entries; empty when there is no pattern).
    first: Vec<bool>,
}

impl Secrets {
    /// The patterns of these secret values: each value, and each of its lines (without a
    /// trailing `\r`), that is at least [`MIN_SECRET_LEN`] bytes long.
    pub fn new<S: AsRef<[u8]>>(values: impl IntoIterator<Item = S>) -> Self {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for value in values {
            let value = value.as_ref();
            let mut candidates = vec![value];
            if value.contains(&b'\n') {
                candidates.extend(
                    value
                        .split(|b| *b == b'\n')
                        .map(|l| l.strip_suffix(b"\r").unwrap_or(l)),
                );
            }
            for c in candidates {
                if c.len() >= MIN_SECRET_LEN && !patterns.iter().any(|p| p == c) {
                    patterns.push(c.to_vec());
                }
            }
        }
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        let max_len = patterns.first().map_or(0, Vec::len);
        let mut first = vec![false; if patterns.is_empty() { 0 } else { 256 }];
        for p in &patterns {
            first[usize::from(p[0])] = true;
        }
        Secrets {
            patterns,
            max_len,
            first,
        }
    }

    /// No pattern: masking changes nothing.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether a value would be masked at all (it has a line of at least [`MIN_SECRET_LEN`]
    /// bytes).
    pub fn maskable(value: &[u8]) -> bool {
        !Secrets::new([value]).is_empty()
    }

    /// `text` with every secret replaced by `***`.
    pub fn mask(&self, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        let used = self.scan(text, true, &mut out);
        debug_assert_eq!(used, text.len());
        out
    }

    /// [`Secrets::mask`] for text.
    pub fn mask_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        String::from_utf8_lossy(&self.mask(text.as_bytes())).into_owned()
    }

    /// Masks `data` into `out` as far as it can be decided; returns how many bytes of `data`
    /// were consumed. With `at_end` everything is consumed; otherwise the scan stops at the
    /// first position where a pattern could still match with bytes not seen yet.
    fn scan(&self, data: &[u8], at_end: bool, out: &mut Vec<u8>) -> usize {
        if self.is_empty() {
            out.extend_from_slice(data);
            return data.len();
        }
        let mut i = 0;
        let mut literal_from = 0;
        while i < data.len() {
            if !self.first[usize::from(data[i])] {
                i += 1;
                continue;
            }
            let rest = &data[i..];
            if !at_end
                && rest.len() < self.max_len
                && self
                    .patterns
                    .iter()
                    .any(|p| p.len() > rest.len() && p.starts_with(rest))
            {
                break;
            }
            match self.patterns.iter().find(|p| rest.starts_with(p)) {
                Some(p) => {
                    out.extend_from_slice(&data[literal_from..i]);
                    out.extend_from_slice(MASK);
                    i += p.len();
                    literal_from = i;
                }
                None => i += 1,
            }
        }
        out.extend_from_slice(&data[literal_from..i]);
        i
    }
}

/// [`Secrets::mask`] over a stream of chunks.
#[derive(Debug, Clone)]
pub struct Masker {
    secrets: Arc<Secrets>,
    /// Undecided bytes: shorter than the longest pattern.
    pending: Vec<u8>,
}

impl Masker {
    pub fn new(secrets: Arc<Secrets>) -> Self {
        Masker {
            secrets,
            pending: Vec::new(),
        }
    }

    /// The masked output that `data` (after what came before) decides.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return data.to_vec();
        }
        self.pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.pending.len());
        let used = self.secrets.scan(&self.pending, false, &mut out);
        self.pending.drain(..used);
        out
    }

    /// The end of the stream: the rest, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let pending = std::mem::take(&mut self.pending);
        self.secrets.mask(&pending)
    }

    /// Bytes held back, waiting for the next chunk.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn masks_whole_values_and_lines() {
        let s = Secrets::new(["hunter22", "-----BEGIN\r\nabcdefgh\nxy\n-----END"]);
        assert_eq!(s.mask(b"pw=hunter22!"), b"pw=***!");
        assert_eq!(s.mask(b"hunter2"), b"hunter2");
        // Each line of a multi-line secret is masked alone; short lines are not.
        assert_eq!(s.mask(b"line abcdefgh and xy"), b"line *** and xy");
        assert_eq!(
            s.mask(b"-----BEGIN\r\nabcdefgh\nxy\n-----END"),
            b"***",
            "the whole value first"
        );
        assert_eq!(s.mask_str("key: -----END"), "key: ***");
    }

    #[test]
    fn short_values_are_not_patterns() {
        assert!(Secrets::new(["abc", ""]).is_empty());
        assert!(!Secrets::maskable(b"a\nb"));
        assert!(Secrets::maskable(b"ab\ncdef"));
        assert_eq!(Secrets::new(["abc"]).mask(b"abcabc"), b"abcabc");
    }

    #[test]
    fn longest_match_wins_even_across_chunks() {
        let s = Arc::new(Secrets::new(["abcd", "abcdefgh"]));
        let mut m = Masker::new(s.clone());
        let mut out = m.push(b"xxabcd");
        assert_eq!(out, b"xx", "abcd could still become abcdefgh");
        assert_eq!(m.pending(), 4);
        out.extend(m.push(b"efgh yy"));
        out.extend(m.finish());
        assert_eq!(out, b"xx*** yy");
        let mut m = Masker::new(s);
        let mut out = m.push(b"abcdef");
        out.extend(m.push(b"!"));
        out.extend(m.finish());
        assert_eq!(out, b"***ef!");
    }

    #[test]
    fn holds_back_less_than_the_longest_secret() {
        let s = Arc::new(Secrets::new(["s3cr3t-value"]));
        let mut m = Masker::new(s);
        for _ in 0..100 {
            m.push(b"s3cr3t-valu");
            assert!(m.pending() < "s3cr3t-value".len());
        }
    }

    fn secret() -> impl Strategy<Value = Vec<u8>> {
        // No `*`: the mask itself cannot re-form such a secret. Small alphabet: many overlaps.
        prop::collection::vec(prop::sample::select(b"ab\nc".to_vec()), 1..10)
    }

    fn text_with(secrets: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
        let pieces = prop::collection::vec(
            prop_oneof![
                prop::collection::vec(prop::sample::select(b"abc*\n".to_vec()), 0..6),
                prop::sample::select(secrets),
            ],
            0..12,
        );
        pieces.prop_map(|p| p.concat())
    }

    fn case() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>, Vec<usize>)> {
        prop::collection::vec(secret(), 1..4).prop_flat_map(|secrets| {
            let text = text_with(secrets.clone());
            (
                Just(secrets),
                text,
                prop::collection::vec(0usize..64, 0..10),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any split into chunks masks like the whole; the result holds no secret line.
        #[test]
        fn chunked_equals_whole_and_never_leaks((values, text, cuts) in case()) {
            let secrets = Arc::new(Secrets::new(&values));
            let whole = secrets.mask(&text);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut masker = Masker::new(secrets.clone());
            let mut streamed = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([text.len()]) {
                streamed.extend(masker.push(&text[from..cut]));
                prop_assert!(masker.pending() < secrets.max_len.max(1));
                from = cut;
            }
            streamed.extend(masker.finish());
            prop_assert_eq!(&streamed, &whole);
            for p in &secrets.patterns {
                prop_assert!(!contains(&whole, p), "{:?} in {:?}", p, whole);
            }
            // A value with a maskable line never appears whole.
            for v in values.iter().filter(|v| Secrets::maskable(v)) {
                prop_assert!(!contains(&whole, v));
            }
        }

        /// Without secrets nothing changes and nothing is held back.
        #[test]
        fn no_secrets_is_identity(text in prop::collection::vec(any::<u8>(), 0..100)) {
            let mut m = Masker::new(Arc::new(Secrets::new(Vec::<Vec<u8>>::new())));
            prop_assert_eq!(m.push(&text), text);
            prop_assert_eq!(m.pending(), 0);
        }
    }
}
