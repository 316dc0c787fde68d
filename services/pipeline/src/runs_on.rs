//! What `runs-on` means once a job has an agent: the generic fallback made visible.

/// The note for a job that asked for labels `runs_on` and runs on the agent `name` carrying
/// `labels` without them: a generic agent stood in (no connected agent had them). `None` when
/// the agent has every label. Shown at the top of the job's log and by `get`.
pub fn fallback_note(runs_on: &[String], labels: &[String], name: &str) -> Option<String> {
    if runs_on.iter().all(|l| labels.contains(l)) {
        return None;
    }
    Some(format!(
        "no agent has {}; ran on generic agent {name} (to require the labels: `runs-on: \
         {{labels: [{}], fallback: false}}`)",
        runs_on.join(","),
        runs_on.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn only_an_agent_without_the_labels_gets_a_note() {
        assert_eq!(fallback_note(&[], &[], "a"), None);
        assert_eq!(fallback_note(&v(&["gpu"]), &v(&["gpu", "x"]), "a"), None);
        assert_eq!(
            fallback_note(&v(&["gpu", "arm"]), &[], "box-1").as_deref(),
            Some(
                "no agent has gpu,arm; ran on generic agent box-1 (to require the labels: \
                 `runs-on: {labels: [gpu, arm], fallback: false}`)"
            )
        );
    }
}
