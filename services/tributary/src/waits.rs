//! What `trigger --follow` and `logs -f` say about jobs that wait: the reasons `get` shows
//! (the API's `waiting_for`, from the scheduler's own routing rules), printed when a queued job
//! starts waiting and again when its reason changes. Pure: the caller polls `GetBuild` and
//! prints what [`WaitNotes::update`] returns.

use std::collections::BTreeMap;

use tributary_proto::api;

/// The last reason printed for each waiting job.
#[derive(Debug, Default)]
pub struct WaitNotes {
    printed: BTreeMap<String, String>,
}

impl WaitNotes {
    /// The `(job, reason)` notes to print for this state of the build: queued jobs whose reason
    /// is new or changed. Jobs waiting for their `needs` are not news (the DAG says so), and a
    /// job that stopped waiting is forgotten, so a later wait is printed again.
    pub fn update(&mut self, build: &api::Build) -> Vec<(String, String)> {
        let mut notes = Vec::new();
        let mut waiting = BTreeMap::new();
        for job in &build.jobs {
            if job.status != "queued" || job.waiting_for.is_empty() {
                continue;
            }
            if self.printed.get(&job.id) != Some(&job.waiting_for) {
                notes.push((job.id.clone(), job.waiting_for.clone()));
            }
            waiting.insert(job.id.clone(), job.waiting_for.clone());
        }
        self.printed = waiting;
        notes
    }
}

/// What Ctrl-C of a follower prints: the build goes on without it.
pub fn left_running(build_id: &str) -> String {
    format!(
        "stopped following; build {build_id} keeps running on the server. Follow it again with \
         `tributary logs {build_id} -f`, cancel it with `tributary cancel {build_id}`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(jobs: &[(&str, &str, &str)]) -> api::Build {
        api::Build {
            jobs: jobs
                .iter()
                .map(|(id, status, why)| api::Job {
                    id: (*id).into(),
                    status: (*status).into(),
                    waiting_for: (*why).into(),
                    ..api::Job::default()
                })
                .collect(),
            ..api::Build::default()
        }
    }

    #[test]
    fn a_wait_is_printed_once_then_on_change_and_again_after_a_run() {
        let mut w = WaitNotes::default();
        let no_engine = "needs an agent that can run containers";
        assert_eq!(
            w.update(&build(&[
                ("a", "queued", no_engine),
                ("b", "pending", "waiting for a")
            ])),
            [("a".to_owned(), no_engine.to_owned())]
        );
        assert!(w.update(&build(&[("a", "queued", no_engine)])).is_empty());
        assert_eq!(
            w.update(&build(&[("a", "queued", "busy")])),
            [("a".to_owned(), "busy".to_owned())]
        );
        assert!(w.update(&build(&[("a", "running", "")])).is_empty());
        assert_eq!(w.update(&build(&[("a", "queued", "busy")])).len(), 1);
    }

    #[test]
    fn ctrl_c_says_how_to_follow_and_cancel() {
        let text = left_running("b1");
        assert!(text.contains("keeps running") && text.contains("tributary cancel b1"));
    }
}
