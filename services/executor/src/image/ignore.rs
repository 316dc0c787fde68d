//! `.dockerignore`, as Docker reads it. Pure.
//!
//! One pattern a line; blank lines and lines starting with `#` are skipped; a leading `!` makes
//! an exception (the path is kept). Patterns are relative to the context's root (a leading `/`
//! changes nothing), `*` and `?` stay within one path component, `**` matches any number of
//! them. A path is excluded when the last pattern matching it or one of its parent directories
//! is not an exception.

use globset::{GlobBuilder, GlobMatcher};

/// The rules of one `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    /// (pattern, exception) in file order.
    rules: Vec<(GlobMatcher, bool)>,
}

impl DockerIgnore {
    /// Reads the rules; a pattern that is not a valid glob is an error naming its line.
    pub fn parse(text: &str) -> Result<DockerIgnore, String> {
        let mut rules = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let pattern = clean(pattern);
            if pattern.is_empty() {
                continue;
            }
            let glob = GlobBuilder::new(&pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!(".dockerignore line {}: {:?}: {}", n + 1, line, e.kind()))?;
            rules.push((glob.compile_matcher(), exception));
        }
        Ok(DockerIgnore { rules })
    }

    /// Whether `path` (relative to the context, `/`-separated) is left out of the context.
    pub fn excludes(&self, path: &str) -> bool {
        let mut excluded = false;
        for (glob, exception) in &self.rules {
            if matches_or_parent(glob, path) {
                excluded = !exception;
            }
        }
        excluded
    }
}

/// `pattern` without `./`, a leading `/`, repeated or trailing `/`.
fn clean(pattern: &str) -> String {
    pattern
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// `path` or one of its parent directories matches.
fn matches_or_parent(glob: &GlobMatcher, path: &str) -> bool {
    if glob.is_match(path) {
        return true;
    }
    path.match_indices('/')
        .any(|(i, _)| glob.is_match(&path[..i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept<'a>(rules: &str, paths: &[&'a str]) -> Vec<&'a str> {
        let ignore = DockerIgnore::parse(rules).unwrap();
        paths
            .iter()
            .copied()
            .filter(|p| !ignore.excludes(p))
            .collect()
    }

    const PATHS: &[&str] = &[
        "Dockerfile",
        "README.md",
        "docs/a.md",
        "src/main.rs",
        "src/deep/x.md",
        "target/debug/bin",
        "tools/keep.sh",
        "tools/drop.sh",
    ];

    #[test]
    fn patterns_exceptions_and_directories() {
        assert_eq!(kept("", PATHS), PATHS);
        assert_eq!(
            kept("# comment\n\n*.md\ntarget\n", PATHS),
            [
                "Dockerfile",
                "docs/a.md",
                "src/main.rs",
                "src/deep/x.md",
                "tools/keep.sh",
                "tools/drop.sh"
            ]
        );
        assert_eq!(
            kept("**/*.md\n/target/\n", PATHS),
            [
                "Dockerfile",
                "src/main.rs",
                "tools/keep.sh",
                "tools/drop.sh"
            ]
        );
        // Exclude everything, then take back what the image needs; the last match wins.
        assert_eq!(
            kept("*\n!Dockerfile\n!tools\ntools/drop.sh\n", PATHS),
            ["Dockerfile", "tools/keep.sh"]
        );
        assert_eq!(
            kept("./src/*\n", PATHS),
            [
                "Dockerfile",
                "README.md",
                "docs/a.md",
                "target/debug/bin",
                "tools/keep.sh",
                "tools/drop.sh"
            ]
        );
    }

    #[test]
    fn a_bad_pattern_names_its_line() {
        let err = DockerIgnore::parse("ok\n[z-a\n").unwrap_err();
        assert!(err.starts_with(".dockerignore line 2"), "{err}");
    }
}
