//! `${{ matrix.NAME }}` substitution. Text without `${{` (including shell `$VAR` and `${VAR}`)
//! passes through untouched.

use crate::parse::{Axis, Text};
use crate::suggest::closest;
use crate::yaml::Source;
use crate::PipelineError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// Index of a matrix axis of the job.
    Axis(usize),
}

/// A string with its `${{ matrix.NAME }}` references resolved to axis indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Validates every `${{ ... }}` in `text` against the axes of `job`. `what` says where the
    /// text is, for error messages (`env "TARGET" of job "test"`).
    pub fn compile(
        src: &Source<'_>,
        text: &Text,
        axes: &[Axis],
        job: &str,
        what: &str,
    ) -> Result<Template, PipelineError> {
        Template::compile_with(src, text, axes, job, what, false)
    }

    /// As [`Template::compile`], also accepting `${{ hashFiles('PATTERN', ...) }}`, which is
    /// kept as written (the agent evaluates it in the workspace): cache keys.
    pub fn compile_cache_key(
        src: &Source<'_>,
        text: &Text,
        axes: &[Axis],
        job: &str,
        what: &str,
    ) -> Result<Template, PipelineError> {
        Template::compile_with(src, text, axes, job, what, true)
    }

    fn compile_with(
        src: &Source<'_>,
        text: &Text,
        axes: &[Axis],
        job: &str,
        what: &str,
        hash_files: bool,
    ) -> Result<Template, PipelineError> {
        let mut pieces = Vec::new();
        let mut rest = text.value.as_str();
        while let Some(start) = rest.find("${{") {
            if start > 0 {
                pieces.push(Piece::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 3..];
            let Some(end) = after.find("}}") else {
                let shown: String = rest[start..].chars().take(40).collect();
                return Err(src.error(
                    text.loc,
                    format!("unterminated expression {shown:?} in {what}; close it with `}}}}`"),
                ));
            };
            let expr = after[..end].trim();
            let whole = &rest[start..start + 3 + end + 2];
            if hash_files && expr.starts_with("hashFiles") {
                crate::cache::hash_files_args(expr)
                    .map_err(|e| src.error(text.loc, format!("{whole:?} in {what}: {e}")))?;
                pieces.push(Piece::Literal(whole.to_owned()));
                rest = &after[end + 2..];
                continue;
            }
            let axis = expr
                .strip_prefix("matrix.")
                .filter(|name| {
                    !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                })
                .ok_or_else(|| {
                    src.error(
                        text.loc,
                        format!(
                            "unsupported expression {whole:?} in {what}; only \
                             `${{{{ matrix.<axis> }}}}` is supported{} (for shell variables \
                             write `$NAME` or `${{NAME}}`)",
                            if hash_files {
                                " besides `${{ hashFiles('PATTERN') }}`"
                            } else {
                                ""
                            }
                        ),
                    )
                })?;
            let index = axes
                .iter()
                .position(|a| a.name == axis)
                .ok_or_else(|| src.error(text.loc, unknown_axis(whole, what, axes, job, axis)))?;
            pieces.push(Piece::Axis(index));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        Ok(Template { pieces })
    }

    /// The text for one matrix instance; `values[i]` is the value of axis `i`.
    pub fn render(&self, values: &[&str]) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(s) => s.as_str(),
                Piece::Axis(i) => values[*i],
            })
            .collect()
    }
}

fn unknown_axis(whole: &str, what: &str, axes: &[Axis], job: &str, axis: &str) -> String {
    if axes.is_empty() {
        return format!(
            "{whole:?} in {what} refers to matrix axis {axis:?}, but job {job:?} has no \
             `matrix`; add `matrix: {{{axis}: [...]}}` to the job, or remove the expression"
        );
    }
    let names: Vec<&str> = axes.iter().map(|a| a.name.as_str()).collect();
    let hint = match closest(axis, names.iter().copied()) {
        Some(s) => format!("did you mean {s:?}? "),
        None => String::new(),
    };
    format!(
        "{whole:?} in {what} refers to matrix axis {axis:?}, which job {job:?} does not have; \
         {hint}Its axes: {}",
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::Loc;

    fn compile(s: &str) -> Result<Template, PipelineError> {
        let src = Source {
            file: "f",
            text: "",
        };
        let axes = vec![
            Axis {
                name: "os".into(),
                values: vec!["linux".into()],
            },
            Axis {
                name: "rust-version".into(),
                values: vec!["1.80".into()],
            },
        ];
        let text = Text {
            value: s.into(),
            loc: Loc::START,
        };
        Template::compile(&src, &text, &axes, "job", "here")
    }

    #[test]
    fn substitutes() {
        let t =
            compile("a ${{ matrix.os }}-${{matrix.rust-version}} $HOME ${HOME} $${{ matrix.os}}")
                .unwrap();
        assert_eq!(
            t.render(&["linux", "1.80"]),
            "a linux-1.80 $HOME ${HOME} $linux"
        );
        assert_eq!(compile("plain").unwrap().render(&[]), "plain");
        assert_eq!(compile("").unwrap().render(&[]), "");
        assert_eq!(compile("${ {x}} }}").unwrap().render(&[]), "${ {x}} }}");
    }

    #[test]
    fn rejects() {
        let msg = |s: &str| compile(s).unwrap_err().message;
        assert!(msg("${{ github.sha }}").contains("unsupported expression \"${{ github.sha }}\""));
        assert!(msg("${{ matrix.os.x }}").contains("unsupported expression"));
        assert!(msg("${{ matrix. }}").contains("unsupported expression"));
        assert!(msg("${{ matrix.os").contains("unterminated expression"));
        assert!(msg("${{ matrix.oss }}").contains("did you mean \"os\""));
    }
}
