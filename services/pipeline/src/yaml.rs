//! The YAML layer: loading with marked-yaml, locations of nodes, scalar types, and turning
//! loader errors into [`PipelineError`]s.
//!
//! marked-yaml quirks handled here:
//! * an empty value (`key:` with nothing after it, or a bare `-`) is an empty plain scalar whose
//!   marker points at the *next* token, possibly lines further down; we point at its key, or at
//!   the `-` of the list entry, instead;
//! * a block mapping's marker is at the `:` of its first key; we point at the first key;
//! * it stops after the first YAML document and silently ignores the rest; we reject a second
//!   document;
//! * with `prevent_coercion(true)`, `may_coerce()` tells whether a scalar was plain (unquoted),
//!   which is what decides between "the number 10" and "the string '10'".

use marked_yaml::types::{MarkedScalarNode, MarkedSequenceNode, Node};
use marked_yaml::{LoadError, LoaderOptions, Marker};

use crate::PipelineError;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub line: u32,
    pub column: u32,
}

impl Loc {
    pub const START: Loc = Loc { line: 1, column: 1 };

    fn of_marker(m: &Marker) -> Loc {
        Loc {
            line: u32::try_from(m.line()).unwrap_or(u32::MAX).max(1),
            column: u32::try_from(m.column()).unwrap_or(u32::MAX).max(1),
        }
    }
}

/// Who holds a node: decides where an empty value is reported.
#[derive(Clone, Copy)]
pub(crate) enum Owner<'n> {
    /// The value of this key in a mapping.
    Key(&'n MarkedScalarNode),
    /// Entry `.1` (0-based) of a list.
    Entry(&'n MarkedSequenceNode, usize),
}

/// The type of a scalar, following the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Null,
    Bool,
    Int,
    Float,
    Str,
}

/// The pipeline text being loaded, and the display name of its file.
pub(crate) struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn error(&self, loc: Loc, message: impl Into<String>) -> PipelineError {
        PipelineError {
            file: self.file.to_owned(),
            line: loc.line,
            column: loc.column,
            message: message.into(),
        }
    }

    /// Parses the text into a node tree (top level: a mapping), rejecting duplicate keys.
    pub fn parse(&self) -> Result<Node, PipelineError> {
        let options = LoaderOptions::default()
            .error_on_duplicate_keys(true)
            .prevent_coercion(true);
        match marked_yaml::parse_yaml_with_options(0, self.text, options) {
            Ok(node) => {
                self.check_single_document()?;
                Ok(node)
            }
            // `---\n---\njobs: ...`: the first document is empty, the real one comes second.
            Err(e @ LoadError::TopLevelMustBeMapping(_)) => {
                self.check_single_document()?;
                Err(self.load_error(e))
            }
            Err(e) => Err(self.load_error(e)),
        }
    }

    pub fn key_loc(&self, key: &MarkedScalarNode) -> Loc {
        key.span().start().map_or(Loc::START, Loc::of_marker)
    }

    /// Where to report a problem with `node`.
    pub fn loc(&self, node: &Node, owner: Owner<'_>) -> Loc {
        match node {
            Node::Scalar(s) if is_empty_plain(s) => match owner {
                Owner::Key(k) => self.key_loc(k),
                Owner::Entry(seq, index) => self
                    .entry_indicator(seq, index)
                    .unwrap_or_else(|| seq.span().start().map_or(Loc::START, Loc::of_marker)),
            },
            Node::Scalar(s) => self.key_loc(s),
            Node::Mapping(m) => match m.keys().next() {
                Some(first) => self.key_loc(first),
                None => m.span().start().map_or(Loc::START, Loc::of_marker),
            },
            Node::Sequence(q) => q.span().start().map_or(Loc::START, Loc::of_marker),
        }
    }

    /// The `-` of entry `index` of a block list: where an empty entry (a bare `-`) really is.
    /// Entries of a block list all have their `-` in the list's column, preceded only by
    /// spaces (the first one may follow another `-` in a compact nested list); nested content,
    /// block scalars and continuation lines are indented further.
    fn entry_indicator(&self, seq: &MarkedSequenceNode, index: usize) -> Option<Loc> {
        let start = seq.span().start()?;
        let column = start.column();
        let mut lines = self.text.split('\n').skip(start.line().checked_sub(1)?);
        let first = lines.next()?;
        if first.chars().nth(column - 1) != Some('-') {
            return None; // a flow list `[...]`
        }
        if index == 0 {
            return Some(Loc::of_marker(start));
        }
        let mut seen = 0;
        for (offset, line) in lines.enumerate() {
            let mut chars = line.chars();
            let indented = chars
                .by_ref()
                .take(column - 1)
                .filter(|&c| c == ' ')
                .count()
                == column - 1;
            if indented && chars.next() == Some('-') && chars.next().is_none_or(char::is_whitespace)
            {
                seen += 1;
                if seen == index {
                    return Some(Loc {
                        line: u32::try_from(start.line() + offset + 1).ok()?,
                        column: u32::try_from(column).ok()?,
                    });
                }
            }
        }
        None
    }

    fn load_error(&self, e: LoadError) -> PipelineError {
        match e {
            LoadError::TopLevelMustBeMapping(m) => {
                if is_blank_document(self.text) {
                    self.empty_file()
                } else {
                    self.error(
                        Loc::of_marker(&m),
                        "the top level of a pipeline must be a mapping with a `jobs` key \
                         (e.g. `jobs:` on the first line, then the jobs indented below it)",
                    )
                }
            }
            LoadError::TopLevelMustBeSequence(m) => self.error(
                Loc::of_marker(&m),
                "the top level of a pipeline must be a mapping with a `jobs` key",
            ),
            LoadError::UnexpectedAnchor(m) => self.error(
                Loc::of_marker(&m),
                "YAML anchors and aliases (`&name`, `*name`) are not supported in pipelines; \
                 write the value out in full instead",
            ),
            LoadError::MappingKeyMustBeScalar(m) => self.error(
                Loc::of_marker(&m),
                "mapping keys must be plain strings, not lists or mappings; use a name as the key",
            ),
            LoadError::UnexpectedTag(m) => self.error(
                Loc::of_marker(&m),
                "YAML tags (`!!str`, `!custom`, ...) are not supported in pipelines; \
                 remove the tag (quote the value if you want it taken as text)",
            ),
            LoadError::ScanError(m, e) => {
                let info = e.info();
                self.error(
                    Loc::of_marker(&m),
                    format!("invalid YAML: {info}; {}", scan_hint(info)),
                )
            }
            LoadError::DuplicateKey(inner) => {
                let first = self.key_loc(&inner.prev_key);
                self.error(
                    self.key_loc(&inner.key),
                    format!(
                        "duplicate key {:?}: it is already defined at line {}, column {}; \
                         remove or rename one of them",
                        inner.key.as_str(),
                        first.line,
                        first.column
                    ),
                )
            }
        }
    }

    pub fn empty_file(&self) -> PipelineError {
        self.error(
            Loc::START,
            "the pipeline file is empty; it needs a `jobs` mapping, e.g.\n\
             jobs:\n  build:\n    steps:\n      - make",
        )
    }

    /// marked-yaml reads the first YAML document only; a pipeline is one document, so anything
    /// after a `---` or `...` that ends the first document is an error rather than ignored.
    fn check_single_document(&self) -> Result<(), PipelineError> {
        let mut seen_content = false;
        let mut started = false;
        let mut ended = false;
        for (i, line) in self.text.lines().enumerate() {
            let loc = Loc {
                line: u32::try_from(i + 1).unwrap_or(u32::MAX),
                column: 1,
            };
            let is_marker = |m: &str| {
                line.strip_prefix(m)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
            };
            let second = || {
                self.error(
                    loc,
                    "a pipeline file holds a single YAML document, but a second one starts \
                     here; remove this line and everything after it, or merge it into the \
                     first document",
                )
            };
            let trimmed = line.trim();
            let blank = trimmed.is_empty() || trimmed.starts_with('#');
            let directive = line.starts_with('%') && !started && !seen_content;
            if is_marker("---") {
                if started || seen_content || ended {
                    return Err(second());
                }
                started = true;
                let rest = line[3..].trim();
                seen_content = !rest.is_empty() && !rest.starts_with('#');
            } else if is_marker("...") {
                ended = true;
            } else if ended {
                if !blank {
                    return Err(second());
                }
            } else if !(blank || directive) {
                seen_content = true;
            }
        }
        Ok(())
    }
}

/// True for an empty value written as nothing at all (`key:`), whose marker is unreliable.
pub(crate) fn is_empty_plain(s: &MarkedScalarNode) -> bool {
    s.may_coerce() && s.as_str().is_empty()
}

/// The YAML 1.2 (core schema) type of a scalar; quoted and block scalars are strings.
pub(crate) fn kind(s: &MarkedScalarNode) -> Kind {
    if !s.may_coerce() {
        return Kind::Str;
    }
    match s.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => Kind::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => Kind::Bool,
        t if is_int(t) => Kind::Int,
        t if is_float(t) => Kind::Float,
        _ => Kind::Str,
    }
}

/// "a list", "a number (10)", ...: what was found, for "expected X, found Y" messages.
pub(crate) fn describe(node: &Node) -> String {
    match node {
        Node::Scalar(s) => match kind(s) {
            Kind::Null => "an empty value (null)".to_owned(),
            Kind::Bool => format!("a boolean ({})", s.as_str()),
            Kind::Int | Kind::Float => format!("a number ({})", s.as_str()),
            Kind::Str => format!("a string ({:?})", s.as_str()),
        },
        Node::Sequence(_) => "a list".to_owned(),
        Node::Mapping(_) => "a mapping".to_owned(),
    }
}

fn is_int(t: &str) -> bool {
    let digits = |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c.is_digit(radix));
    if let Some(h) = t.strip_prefix("0x") {
        return digits(h, 16);
    }
    if let Some(o) = t.strip_prefix("0o") {
        return digits(o, 8);
    }
    digits(t.strip_prefix(['-', '+']).unwrap_or(t), 10)
}

fn is_float(t: &str) -> bool {
    let unsigned = t.strip_prefix(['-', '+']).unwrap_or(t);
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") || matches!(t, ".nan" | ".NaN" | ".NAN") {
        return true;
    }
    // [0-9]*(\.[0-9]*)?([eE][-+]?[0-9]+)? with at least one mantissa digit.
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
        None => (unsigned, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = all_digits(int) && all_digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    mantissa_ok && exponent_ok
}

/// Nothing but blank lines, comments, directives and document markers.
fn is_blank_document(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty()
            || t.starts_with('#')
            || l.starts_with('%')
            || ["---", "..."].iter().any(|m| {
                l.strip_prefix(m).is_some_and(|r| {
                    let r = r.trim();
                    r.is_empty() || r.starts_with('#')
                })
            })
    })
}

fn scan_hint(info: &str) -> &'static str {
    if info.contains("tab") {
        "indent with spaces, YAML does not allow tabs here"
    } else if info.contains("mapping values are not allowed") {
        "check the indentation, and quote values that contain \": \""
    } else if info.contains("did not find expected key")
        || info.contains("did not find expected '-'")
    {
        "check the indentation of this line against the lines above it"
    } else if info.contains("unknown anchor") {
        "aliases (`*name`) are not supported; write the value out in full"
    } else if info.contains("quoted scalar") {
        "close the quote, or escape the quote character inside the string"
    } else if info.contains("flow sequence") {
        "close the list with `]` and separate entries with `,`"
    } else if info.contains("flow mapping") {
        "close the mapping with `}` and separate entries with `,`"
    } else {
        "fix the YAML syntax here (check indentation and quoting)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_kinds() {
        let k = |s: &str| kind(&MarkedScalarNode::from(s));
        assert_eq!(k(""), Kind::Null);
        assert_eq!(k("~"), Kind::Null);
        assert_eq!(k("True"), Kind::Bool);
        assert_eq!(k("yes"), Kind::Str); // YAML 1.2: not a boolean
        assert_eq!(k("10"), Kind::Int);
        assert_eq!(k("-3"), Kind::Int);
        assert_eq!(k("0x1F"), Kind::Int);
        assert_eq!(k("1.80"), Kind::Float);
        assert_eq!(k("1e3"), Kind::Float);
        assert_eq!(k(".5"), Kind::Float);
        assert_eq!(k("-.inf"), Kind::Float);
        assert_eq!(k("1.2.3"), Kind::Str);
        assert_eq!(k("1e"), Kind::Str);
        assert_eq!(k("."), Kind::Str);
        assert_eq!(k("10m"), Kind::Str);
        let mut quoted = MarkedScalarNode::from("10");
        quoted.set_coerce(false);
        assert_eq!(kind(&quoted), Kind::Str);
    }

    #[test]
    fn blank_documents() {
        assert!(is_blank_document(""));
        assert!(is_blank_document("# c\n\n---\n...\n"));
        assert!(!is_blank_document("~\n"));
        assert!(!is_blank_document("--- x\n"));
    }
}
