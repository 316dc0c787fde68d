//! The jobs of a build as a DAG: a pure layout (columns by depth along `needs`, rows in plan
//! order) drawn as inline SVG, each job a link to its section of the page.

use maud::{html, Markup};
use tributary_projections::Job;

pub const NODE_W: u32 = 210;
pub const NODE_H: u32 = 54;
const COL_GAP: u32 = 56;
const ROW_GAP: u32 = 14;
const PAD: u32 = 8;

/// Where each job goes, and the edges between them (indices into the jobs).
#[derive(Debug, PartialEq)]
pub struct Layout {
    /// (column, row) per job, in plan order.
    pub cells: Vec<(u32, u32)>,
    /// (need, dependant).
    pub edges: Vec<(usize, usize)>,
    pub width: u32,
    pub height: u32,
}

/// Lays jobs out: a job's column is the length of the longest `needs` chain before it; rows
/// follow plan order within a column. Unknown needs are ignored; a cycle (which validation
/// rejects) cannot loop: depth is bounded by the number of jobs.
pub fn layout(jobs: &[Job]) -> Layout {
    let index = |id: &str| jobs.iter().position(|j| j.id == id);
    let mut edges = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        for need in &job.needs {
            if let Some(n) = index(need) {
                edges.push((n, i));
            }
        }
    }
    let mut depth = vec![0u32; jobs.len()];
    for _ in 0..jobs.len() {
        let mut changed = false;
        for &(from, to) in &edges {
            let want = (depth[from] + 1).min(jobs.len() as u32);
            if depth[to] < want {
                depth[to] = want;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut rows_in = std::collections::BTreeMap::<u32, u32>::new();
    let cells: Vec<(u32, u32)> = depth
        .iter()
        .map(|&col| {
            let row = rows_in.entry(col).or_insert(0);
            *row += 1;
            (col, *row - 1)
        })
        .collect();
    let cols = depth.iter().max().map_or(0, |d| d + 1);
    let rows = rows_in.values().max().copied().unwrap_or(0);
    Layout {
        cells,
        edges,
        width: 2 * PAD + cols * NODE_W + cols.saturating_sub(1) * COL_GAP,
        height: 2 * PAD + rows * NODE_H + rows.saturating_sub(1) * ROW_GAP,
    }
}

fn origin((col, row): (u32, u32)) -> (u32, u32) {
    (
        PAD + col * (NODE_W + COL_GAP),
        PAD + row * (NODE_H + ROW_GAP),
    )
}

/// Cuts `s` to `max` characters with an ellipsis.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The DAG as SVG; job `i` links to `#job-{i}`.
pub fn svg(jobs: &[Job]) -> Markup {
    let l = layout(jobs);
    html! {
        svg class="dag" xmlns="http://www.w3.org/2000/svg" width=(l.width) height=(l.height)
            viewBox={"0 0 " (l.width) " " (l.height)} role="img" aria-label="jobs and their needs" {
            @for &(from, to) in &l.edges {
                @let (x1, y1) = origin(l.cells[from]);
                @let (x2, y2) = origin(l.cells[to]);
                @let (x1, y1) = (x1 + NODE_W, y1 + NODE_H / 2);
                @let y2 = y2 + NODE_H / 2;
                @let mid = (x1 + x2) / 2;
                path class="edge" d={"M" (x1) " " (y1) " C" (mid) " " (y1) " " (mid) " " (y2) " " (x2) " " (y2)} {}
            }
            @for (i, job) in jobs.iter().enumerate() {
                @let (x, y) = origin(l.cells[i]);
                a href={"#job-" (i)} class="node" data-job=(job.id) {
                    rect class={"st-" (job.phase.name())} x=(x) y=(y) width=(NODE_W) height=(NODE_H) rx="6" {}
                    text class="name" x=(x + 10) y=(y + 21) { (clip(&job.name, 24)) }
                    @let matrix: Vec<String> = job.matrix.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    text class="sub" x=(x + 10) y=(y + 41) {
                        (job.phase.name())
                        @if !matrix.is_empty() { " · " (clip(&matrix.join(" "), 22)) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, needs: &[&str]) -> Job {
        Job {
            id: id.into(),
            name: id.into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            ..Job::default()
        }
    }

    #[test]
    fn columns_follow_the_longest_needs_chain() {
        let jobs = [
            job("build", &[]),
            job("lint", &[]),
            job("test[os=linux]", &["build"]),
            job("test[os=bsd]", &["build"]),
            job("deploy", &["test[os=linux]", "test[os=bsd]", "lint"]),
        ];
        let l = layout(&jobs);
        assert_eq!(l.cells, vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]);
        assert_eq!(l.edges, vec![(0, 2), (0, 3), (2, 4), (3, 4), (1, 4)]);
        assert_eq!(l.width, 2 * PAD + 3 * NODE_W + 2 * COL_GAP);
        assert_eq!(l.height, 2 * PAD + 2 * NODE_H + ROW_GAP);
    }

    #[test]
    fn unknown_needs_and_cycles_terminate() {
        let l = layout(&[job("a", &["b", "ghost"]), job("b", &["a"])]);
        assert_eq!(l.cells.len(), 2);
        assert!(l.width > 0);
        assert_eq!(layout(&[]).cells, vec![]);
    }

    #[test]
    fn the_svg_links_jobs_and_escapes_names() {
        let mut j = job("x", &[]);
        j.name = "<b>&".into();
        j.matrix = vec![("os".into(), "linux".into())];
        let out = svg(&[j]).into_string();
        assert!(out.contains("href=\"#job-0\""));
        assert!(out.contains("&lt;b&gt;&amp;"));
        assert!(out.contains("os=linux"));
    }
}
