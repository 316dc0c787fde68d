//! Property tests on `needs`: random DAGs (acyclic by construction) always load with needs
//! expanded to instances, and one back-edge always makes them a reported cycle.

use proptest::prelude::*;
use tributary_pipeline::load;

/// A random DAG over `n` jobs: job `i` may need only jobs `j < i` (in topological rank), then
/// declared in a shuffled order so `needs` also point forward in the file. Job `1` always
/// needs job `0`, so at least one path exists. Some jobs get a matrix.
#[derive(Debug, Clone)]
struct Dag {
    /// needs[i]: ranks job i needs.
    needs: Vec<Vec<usize>>,
    /// Number of matrix values of job i (0 = no matrix).
    matrix: Vec<usize>,
    /// Declaration order of the ranks.
    order: Vec<usize>,
}

fn dag() -> impl Strategy<Value = Dag> {
    (2usize..12).prop_flat_map(|n| {
        let needs = (0..n)
            .map(|i| {
                proptest::collection::vec(any::<bool>(), i).prop_map(move |picks| {
                    let mut v: Vec<usize> = (0..i).filter(|&j| picks[j]).collect();
                    if i == 1 && v.is_empty() {
                        v.push(0);
                    }
                    v
                })
            })
            .collect::<Vec<_>>();
        let matrix = proptest::collection::vec(0usize..3, n);
        let order = Just((0..n).collect::<Vec<usize>>()).prop_shuffle();
        (needs, matrix, order).prop_map(|(needs, matrix, order)| Dag {
            needs,
            matrix,
            order,
        })
    })
}

fn name(i: usize) -> String {
    format!("job{i}")
}

/// The pipeline text, with `extra` = (job, target) appended to job's needs.
fn render(dag: &Dag, extra: Option<(usize, usize)>) -> String {
    let mut text = String::from("jobs:\n");
    for &i in &dag.order {
        text.push_str(&format!("  {}:\n", name(i)));
        if dag.matrix[i] > 0 {
            let values: Vec<String> = (0..dag.matrix[i]).map(|v| format!("v{v}")).collect();
            text.push_str(&format!("    matrix:\n      x: [{}]\n", values.join(", ")));
        }
        let mut needs: Vec<usize> = dag.needs[i].clone();
        if let Some((from, to)) = extra {
            if from == i {
                needs.push(to);
            }
        }
        if !needs.is_empty() {
            text.push_str("    needs:\n");
            for n in needs {
                text.push_str(&format!("      - {}\n", name(n)));
            }
        }
        if dag.matrix[i] > 0 {
            text.push_str("    steps:\n      - echo ${{ matrix.x }}\n");
        } else {
            text.push_str("    steps:\n      - echo hi\n");
        }
    }
    text
}

fn instance_ids(dag: &Dag, i: usize) -> Vec<String> {
    if dag.matrix[i] == 0 {
        vec![name(i)]
    } else {
        (0..dag.matrix[i])
            .map(|v| format!("{}[x=v{v}]", name(i)))
            .collect()
    }
}

/// Does `from` (transitively) need `to`?
fn reaches(dag: &Dag, from: usize, to: usize) -> bool {
    let mut stack = vec![from];
    let mut seen = vec![false; dag.needs.len()];
    while let Some(j) = stack.pop() {
        if j == to {
            return true;
        }
        if !std::mem::replace(&mut seen[j], true) {
            stack.extend(&dag.needs[j]);
        }
    }
    false
}

proptest! {
    #[test]
    fn random_dags_load(dag in dag()) {
        let text = render(&dag, None);
        let plan = load("p.yml", &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let mut expected_ids = Vec::new();
        for &i in &dag.order {
            expected_ids.extend(instance_ids(&dag, i));
        }
        let ids: Vec<&str> = plan.jobs.iter().map(|j| j.id.as_str()).collect();
        prop_assert_eq!(ids, expected_ids.iter().map(String::as_str).collect::<Vec<_>>());
        for job in &plan.jobs {
            let rank: usize = job.name.trim_start_matches("job").parse().unwrap();
            let expected: Vec<String> =
                dag.needs[rank].iter().flat_map(|&n| instance_ids(&dag, n)).collect();
            prop_assert_eq!(&job.needs, &expected);
        }
    }

    #[test]
    fn a_back_edge_is_a_cycle(dag in dag(), pick in any::<proptest::sample::Index>()) {
        // Every (to, from) with `to` transitively needing `from`: `from needs to` closes a cycle.
        let n = dag.needs.len();
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|to| (0..n).map(move |from| (from, to)))
            .filter(|&(from, to)| from != to && reaches(&dag, to, from))
            .collect();
        prop_assert!(!pairs.is_empty());
        let (from, to) = pairs[pick.index(pairs.len())];
        let text = render(&dag, Some((from, to)));
        let err = load("p.yml", &text).expect_err("a cycle must be rejected");
        prop_assert!(err.message.starts_with("`needs` cycle: "), "{}", err.message);
        let path: Vec<&str> = err.message["`needs` cycle: ".len()..]
            .split(" (")
            .next()
            .unwrap()
            .split(" -> ")
            .collect();
        // The path is closed and, the rest being acyclic, goes through the new edge.
        prop_assert!(path.len() >= 3);
        prop_assert_eq!(path.first(), path.last());
        let edges: Vec<(&str, &str)> = path.windows(2).map(|w| (w[0], w[1])).collect();
        let (from_name, to_name) = (name(from), name(to));
        prop_assert!(edges.contains(&(from_name.as_str(), to_name.as_str())), "{:?}", path);
        // Every edge of the path is a real `needs` entry.
        for (a, b) in &edges {
            let ra: usize = a.trim_start_matches("job").parse().unwrap();
            let rb: usize = b.trim_start_matches("job").parse().unwrap();
            prop_assert!(dag.needs[ra].contains(&rb) || (ra, rb) == (from, to));
        }
        // Reported at the `needs` entry that closes the cycle: `- <first job of the path>`.
        let line = text.lines().nth(err.line as usize - 1).unwrap();
        let at = &line[err.column as usize - 1..];
        prop_assert_eq!(at, path[0], "line {:?}", line);
    }
}
