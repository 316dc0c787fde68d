//! `image: {build: PATH, context: DIR}`: the plan it gives and the errors it makes.

mod common;

use common::rejects;
use tributary_pipeline::{load, IMAGE_STEP};
use tributary_proto::events::ImageBuild;

fn built(dockerfile: &str, context: &str) -> Option<ImageBuild> {
    Some(ImageBuild {
        dockerfile: dockerfile.into(),
        context: context.into(),
    })
}

#[test]
fn the_plan_has_the_build_and_a_first_step_for_it() {
    let plan = load(
        "p.yml",
        "jobs:\n  t:\n    image: {build: ci/Dockerfile}\n    network: true\n    steps: [make, \"make test\"]\n",
    )
    .unwrap();
    let job = &plan.jobs[0];
    assert_eq!(job.image_build, built("ci/Dockerfile", "ci"));
    assert_eq!(job.image, "");
    assert!(job.runs_in_container());
    assert_eq!(job.image_description(), "built from ci/Dockerfile");
    let names: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [IMAGE_STEP, "make", "make test"]);
    assert_eq!(job.steps[0].lines, ["build ci/Dockerfile (context ci)"]);
}

#[test]
fn context_defaults_to_the_dockerfiles_folder_and_paths_are_normalised() {
    let cases = [
        ("{build: Dockerfile}", "Dockerfile", "."),
        (
            "{build: ./ci//docker/Dockerfile}",
            "ci/docker/Dockerfile",
            "ci/docker",
        ),
        ("{build: ci/Dockerfile, context: .}", "ci/Dockerfile", "."),
        (
            "{build: docker/Dockerfile, context: ./app/}",
            "docker/Dockerfile",
            "app",
        ),
    ];
    for (image, dockerfile, context) in cases {
        let text = format!("jobs:\n  t:\n    image: {image}\n    steps: [make]\n");
        let plan = load("p.yml", &text).unwrap_or_else(|e| panic!("{image}: {e}"));
        assert_eq!(
            plan.jobs[0].image_build,
            built(dockerfile, context),
            "{image}"
        );
    }
}

#[test]
fn matrix_values_are_substituted_and_checked() {
    let plan = load(
        "p.yml",
        "jobs:\n  t:\n    matrix: {os: [alpine, debian]}\n    image:\n      build: ci/${{ matrix.os }}/Dockerfile\n    steps: [make]\n",
    )
    .unwrap();
    assert_eq!(
        plan.jobs[0].image_build,
        built("ci/alpine/Dockerfile", "ci/alpine")
    );
    assert_eq!(
        plan.jobs[1].image_build,
        built("ci/debian/Dockerfile", "ci/debian")
    );
    rejects(
        "jobs:\n  t:\n    matrix: {d: [\"..\"]}\n    image:\n      build: ${{ matrix.d }}/Dockerfile\n    steps: [make]\n",
        5,
        14,
        &["`build` of `image` of job \"t\" is \"../Dockerfile\"", "without `..`"],
    );
}

#[test]
fn errors_point_at_the_problem() {
    rejects(
        "jobs:\n  t:\n    image:\n      context: ci\n    steps: [make]\n",
        4,
        7,
        &[
            "`image` of job \"t\" has no `build`",
            "image: {build: ci/Dockerfile}",
        ],
    );
    rejects(
        "jobs:\n  t:\n    image:\n      dockerfile: ci/Dockerfile\n    steps: [make]\n",
        4,
        7,
        &["unknown key \"dockerfile\"", "did you mean \"build\"?"],
    );
    rejects(
        "jobs:\n  t:\n    image: {build: /etc/Dockerfile}\n    steps: [make]\n",
        3,
        20,
        &["\"/etc/Dockerfile\" is absolute"],
    );
    rejects(
        "jobs:\n  t:\n    image: {build: ci/Dockerfile, context: ../x}\n    steps: [make]\n",
        3,
        44,
        &["`context` of `image` of job \"t\"", "contains `..`"],
    );
    rejects(
        "jobs:\n  t:\n    image: {build: \"\"}\n    steps: [make]\n",
        3,
        20,
        &[
            "`build` of `image` of job \"t\" is empty",
            "e.g. `build: ci/Dockerfile`",
        ],
    );
    rejects(
        "jobs:\n  t:\n    image: {build: ./}\n    steps: [make]\n",
        3,
        20,
        &["names the repository's root"],
    );
    rejects(
        "jobs:\n  t:\n    image: {build: 3}\n    steps: [make]\n",
        3,
        20,
        &["expected a string for `build` of `image` of job \"t\""],
    );
}
