//! The artifact pattern language: globs relative to the job's workspace (`dist/*.tar.gz`,
//! `**/*.log`, or a directory such as `out`, which keeps everything under it). `*` and `?` do
//! not cross `/`; `**` does. Patterns that could reach outside the workspace are refused.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Why `pattern` is not a valid artifact pattern (phrased to follow "pattern X in ..."), or None.
/// Patterns with `${{ }}` are checked once the matrix values are in (by [`matcher`]).
pub fn pattern_problem(pattern: &str) -> Option<String> {
    let p = pattern.trim();
    if p.starts_with('/') {
        return Some("is absolute; write it relative to the workspace, e.g. `dist/*.tar`".into());
    }
    if p.contains('\\') {
        return Some("contains a backslash; use / between directories".into());
    }
    if p.split('/').any(|c| c == "..") {
        return Some("contains `..`: artifacts must come from inside the workspace".into());
    }
    if p.contains("${{") {
        return None;
    }
    glob(p).err()
}

fn glob(pattern: &str) -> Result<globset::Glob, String> {
    GlobBuilder::new(
        pattern
            .trim()
            .trim_start_matches("./")
            .trim_end_matches('/'),
    )
    .literal_separator(true)
    .backslash_escape(false)
    .build()
    .map_err(|e| format!("is not a valid pattern: {}", e.kind()))
}

/// The set of `patterns`, for matching workspace-relative paths (`/`-separated). A path matches
/// when it or one of its parent directories matches a pattern.
pub fn matcher(patterns: &[String]) -> Result<Matcher, String> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        if let Some(problem) = pattern_problem(p) {
            return Err(format!("artifact pattern {p:?} {problem}"));
        }
        set.add(glob(p).map_err(|e| format!("artifact pattern {p:?} {e}"))?);
    }
    let set = set.build().map_err(|e| e.to_string())?;
    Ok(Matcher { set })
}

pub struct Matcher {
    set: GlobSet,
}

impl Matcher {
    /// Indexes of the patterns that `path` (or a parent directory of it) matches.
    pub fn matches(&self, path: &str) -> Vec<usize> {
        let mut hits = self.set.matches(path);
        let mut dir = path;
        while let Some((parent, _)) = dir.rsplit_once('/') {
            hits.extend(self.set.matches(parent));
            dir = parent;
        }
        hits.sort_unstable();
        hits.dedup();
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(patterns: &[&str]) -> Matcher {
        matcher(&patterns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn globs_directories_and_recursion() {
        let set = m(&["dist/*.tar", "out", "**/*.log", "./report.txt"]);
        assert_eq!(set.matches("dist/app.tar"), [0]);
        assert!(
            set.matches("dist/sub/app.tar").is_empty(),
            "* does not cross /"
        );
        assert_eq!(set.matches("out/a/b/c.bin"), [1]);
        assert_eq!(set.matches("x/y/z.log"), [2]);
        assert_eq!(set.matches("z.log"), [2]);
        assert_eq!(set.matches("report.txt"), [3]);
        assert!(set.matches("src/main.rs").is_empty());
    }

    #[test]
    fn escaping_and_broken_patterns_are_refused() {
        assert!(pattern_problem("/etc/*").unwrap().contains("absolute"));
        assert!(pattern_problem("../x").unwrap().contains(".."));
        assert!(pattern_problem("a/../../x").unwrap().contains(".."));
        assert!(pattern_problem("a\\b").unwrap().contains("backslash"));
        assert!(pattern_problem("dist/[a-")
            .unwrap()
            .contains("not a valid pattern"));
        assert_eq!(pattern_problem("dist/${{ matrix.os }}/*.tar"), None);
        assert!(matcher(&["dist/[a-".into()]).is_err());
    }
}
