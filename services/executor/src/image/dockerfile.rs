//! Which Dockerfile line a builder's failing step is. Pure.
//!
//! Builders report steps by their text (`STEP 3/3: RUN false` from Podman, `Step 3/3 : RUN
//! false` from Docker's classic builder) and fail "at STEP ..." without a line number, so the
//! job's failure is matched back to the Dockerfile's instructions.

/// An instruction of a Dockerfile: the line it starts on (1-based) and its text with
/// continuation lines joined and whitespace collapsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub line: u32,
    pub text: String,
}

/// The instructions of `text`, in order: comments and blank lines skipped, lines ending in `\`
/// continued (comment lines inside a continuation are skipped, as Docker does).
pub fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current: Option<(u32, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let number = u32::try_from(n + 1).unwrap_or(u32::MAX);
        if line.starts_with('#') || (line.is_empty() && current.is_none()) {
            continue;
        }
        let (body, continues) = match line.strip_suffix('\\') {
            Some(body) => (body, true),
            None => (line, false),
        };
        let entry = current.get_or_insert_with(|| (number, String::new()));
        if !entry.1.is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(body.trim());
        if !continues {
            if let Some((line, text)) = current.take() {
                out.push(Instruction {
                    line,
                    text: collapse(&text),
                });
            }
        }
    }
    if let Some((line, text)) = current {
        out.push(Instruction {
            line,
            text: collapse(&text),
        });
    }
    out
}

/// A step a builder announced: `STEP 2/3: RUN make` (Podman, also after a `[1/2] ` stage
/// prefix) or `Step 2/3 : RUN make` (Docker). Returns (step number, instruction text).
pub fn announced_step(line: &str) -> Option<(u32, String)> {
    let line = line.trim();
    let line = match line.strip_prefix('[') {
        Some(rest) => rest.split_once("] ").map_or(line, |(_, r)| r),
        None => line,
    };
    let rest = line
        .strip_prefix("STEP ")
        .or_else(|| line.strip_prefix("Step "))?;
    let (numbers, text) = rest.split_once(':')?;
    let number = numbers.trim().split('/').next()?.trim().parse().ok()?;
    Some((number, collapse(text)))
}

/// The instruction a failing step is: the first one whose text is the step's
/// (instruction words compared without case), else the `number`th one.
pub fn locate(instructions: &[Instruction], step: &(u32, String)) -> Option<Instruction> {
    let (number, text) = step;
    let same = |i: &&Instruction| {
        let (a_word, a_rest) = split_word(&i.text);
        let (b_word, b_rest) = split_word(text);
        a_word.eq_ignore_ascii_case(b_word) && a_rest == b_rest
    };
    instructions
        .iter()
        .find(same)
        .or_else(|| {
            usize::try_from(*number)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| instructions.get(i))
        })
        .cloned()
}

fn split_word(text: &str) -> (&str, &str) {
    text.split_once(' ').unwrap_or((text, ""))
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# syntax comment\nFROM localhost/ci-busybox\n\nRUN echo a && \\\n  # inside\n    echo b\nrun   false\nCOPY . /src\n";

    #[test]
    fn instructions_with_their_lines() {
        let got = instructions(FILE);
        let lines: Vec<(u32, &str)> = got.iter().map(|i| (i.line, i.text.as_str())).collect();
        assert_eq!(
            lines,
            [
                (2, "FROM localhost/ci-busybox"),
                (4, "RUN echo a && echo b"),
                (7, "run false"),
                (8, "COPY . /src"),
            ]
        );
    }

    #[test]
    fn builder_steps_are_found() {
        let got = instructions(FILE);
        for (announced, line) in [
            ("STEP 3/4: RUN false", 7),
            ("Step 3/4 : RUN false", 7),
            ("[2/2] STEP 1/4: RUN false", 7),
            ("STEP 2/4: RUN echo a && echo b", 4),
            // Text the builder rewrote: by number.
            ("STEP 4/4: COPY --chown=0 . /src", 8),
        ] {
            let step = announced_step(announced).unwrap();
            assert_eq!(
                locate(&got, &step).map(|i| i.line),
                Some(line),
                "{announced}"
            );
        }
        assert_eq!(announced_step("--> 50a768606ce"), None);
        assert_eq!(locate(&got, &(9, "NOPE".into())), None);
    }
}
