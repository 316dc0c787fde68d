//! Cache keys: `${{ hashFiles('PATTERN', ...) }}` in a job's `cache: {key: ...}`.
//!
//! The pipeline keeps `hashFiles` expressions in [`tributary_proto::events::CacheSpec::key`]
//! (only `${{ matrix.X }}` is substituted when planning); the agent evaluates them in the job's
//! workspace after checkout with [`expand_key`] and [`hash_files`], GitHub Actions' semantics:
//! the sha256 of each matched file, then the sha256 over those digests in sorted path order;
//! the empty string when nothing matches. Patterns are the artifact pattern language
//! ([`crate::artifacts`]).

use sha2::{Digest, Sha256};

/// One piece of a cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPiece {
    Literal(String),
    /// `hashFiles(...)` with its patterns.
    HashFiles(Vec<String>),
}

/// Splits a planned cache key into literal text and `hashFiles` calls. Any other `${{ }}`
/// expression is an error (the pipeline refused it already; a hand-made plan may not have).
pub fn parse_key(key: &str) -> Result<Vec<KeyPiece>, String> {
    let mut pieces = Vec::new();
    let mut rest = key;
    while let Some(start) = rest.find("${{") {
        if start > 0 {
            pieces.push(KeyPiece::Literal(rest[..start].to_owned()));
        }
        let after = &rest[start + 3..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unterminated expression in cache key {key:?}"))?;
        let expr = after[..end].trim();
        pieces.push(KeyPiece::HashFiles(hash_files_args(expr).map_err(|e| {
            format!("unsupported expression `${{{{ {expr} }}}}` in cache key {key:?}: {e}")
        })?));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        pieces.push(KeyPiece::Literal(rest.to_owned()));
    }
    Ok(pieces)
}

/// The patterns of `hashFiles('a', "b")`, each a quoted string, at least one; an error says
/// what is wrong.
pub fn hash_files_args(expr: &str) -> Result<Vec<String>, String> {
    let inner = expr
        .strip_prefix("hashFiles")
        .map(str::trim_start)
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.trim_end().strip_suffix(')'))
        .ok_or("only `hashFiles('PATTERN', ...)` is supported here")?;
    let mut patterns = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let quote = rest
            .chars()
            .next()
            .filter(|c| *c == '\'' || *c == '"')
            .ok_or("each hashFiles argument must be a quoted pattern, e.g. 'Cargo.lock'")?;
        let body = &rest[1..];
        let close = body
            .find(quote)
            .ok_or("a hashFiles argument is missing its closing quote")?;
        let pattern = &body[..close];
        if pattern.trim().is_empty() {
            return Err("a hashFiles pattern is empty".into());
        }
        if let Some(problem) = crate::artifacts::pattern_problem(pattern) {
            return Err(format!("pattern {pattern:?} {problem}"));
        }
        patterns.push(pattern.to_owned());
        rest = body[close + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
            if rest.is_empty() {
                return Err("a trailing comma in hashFiles(...)".into());
            }
        } else if !rest.is_empty() {
            return Err("separate hashFiles arguments with commas".into());
        }
    }
    if patterns.is_empty() {
        return Err("hashFiles needs at least one pattern, e.g. hashFiles('Cargo.lock')".into());
    }
    Ok(patterns)
}

/// The key with every `hashFiles` call replaced by `hash(patterns)`.
pub fn expand_key(
    key: &str,
    mut hash: impl FnMut(&[String]) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    for piece in parse_key(key)? {
        match piece {
            KeyPiece::Literal(s) => out.push_str(&s),
            KeyPiece::HashFiles(patterns) => out.push_str(&hash(&patterns)?),
        }
    }
    Ok(out)
}

/// `hashFiles` over files given as (workspace-relative path, sha256 digest of the content):
/// sha256 over the digests in sorted path order, hex; `""` when there are none.
pub fn hash_files(files: &[(String, [u8; 32])]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let mut sorted: Vec<&(String, [u8; 32])> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (_, digest) in sorted {
        hasher.update(digest);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_split_into_literals_and_hash_files() {
        assert_eq!(
            parse_key("cargo-${{ hashFiles('Cargo.lock', \"**/Cargo.toml\") }}-v1").unwrap(),
            [
                KeyPiece::Literal("cargo-".into()),
                KeyPiece::HashFiles(vec!["Cargo.lock".into(), "**/Cargo.toml".into()]),
                KeyPiece::Literal("-v1".into()),
            ]
        );
        assert_eq!(
            parse_key("plain").unwrap(),
            [KeyPiece::Literal("plain".into())]
        );
        for bad in [
            "${{ matrix.os }}",
            "${{ hashFiles() }}",
            "${{ hashFiles(Cargo.lock) }}",
            "${{ hashFiles('a' 'b') }}",
            "${{ hashFiles('a',) }}",
            "${{ hashFiles('../x') }}",
            "${{ hashFiles('/etc/passwd') }}",
            "${{ hashFiles('a')",
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn expand_replaces_each_call() {
        let key = expand_key("k-${{ hashFiles('a') }}-${{hashFiles('b','c')}}", |p| {
            Ok(p.join("+"))
        })
        .unwrap();
        assert_eq!(key, "k-a-b+c");
    }

    #[test]
    fn hash_files_is_githubs() {
        assert_eq!(hash_files(&[]), "");
        let d = |s: &str| -> [u8; 32] { Sha256::digest(s.as_bytes()).into() };
        let mut h = Sha256::new();
        h.update(d("lock"));
        h.update(d("toml"));
        let expected = hex::encode(h.finalize());
        assert_eq!(
            hash_files(&[
                ("b/Cargo.toml".into(), d("toml")),
                ("a.lock".into(), d("lock"))
            ]),
            expected
        );
    }

    proptest! {
        /// The hash does not depend on the order files were found in, and changes with any
        /// file's content.
        #[test]
        fn hash_is_order_independent(names in proptest::collection::btree_set("[a-z]{1,6}", 1..6)) {
            let files: Vec<(String, [u8; 32])> = names
                .iter()
                .map(|n| (n.clone(), Sha256::digest(n.as_bytes()).into()))
                .collect();
            let mut reversed = files.clone();
            reversed.reverse();
            prop_assert_eq!(hash_files(&files), hash_files(&reversed));
            let mut changed = files.clone();
            changed[0].1[0] ^= 1;
            prop_assert_ne!(hash_files(&files), hash_files(&changed));
        }
    }
}
