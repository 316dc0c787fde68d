//! The scale-out deployment with its objects on S3: `serve api`, `serve scheduler`, `serve
//! projector` and two `tributary agent` processes on fresh Kafka topics and a fresh PostgreSQL
//! database, every one given `--objects s3://BUCKET` on the MinIO of `scripts/setup-s3.sh`.
//! Builds pass an artifact and a cache from one job to the next through the bucket; the API
//! serves the artifact from it; nothing lands in a local directory.
//!
//! Needs Kafka and PostgreSQL (`scripts/setup-brokers.sh`) and MinIO (`scripts/setup-s3.sh`).

use crate::scale;

use std::time::Duration;

use scale::{Options, ScaleOut};
use tributary_objects::{Objects, S3Settings};
use tributary_proto::events::envelope::Payload;

const PIPELINE: &str = "jobs:\n  make:\n    cache:\n      key: deps-v1\n      paths: [vendor]\n    steps:\n      - run: mkdir -p dist vendor && head -c 300000 /dev/urandom > dist/blob.bin && sha256sum dist/blob.bin > dist/blob.sha && [ -f vendor/fetched ] || echo \"from-$TRIBUTARY_BUILD_ID\" > vendor/fetched\n    artifacts: [dist]\n  \
use:\n    needs: make\n    cache:\n      key: deps-v1\n      paths: [vendor]\n    steps:\n      - run: sha256sum -c dist/blob.sha && echo \"cache $(cat vendor/fetched)\"\n";

#[test]
#[ignore = "unfinished (issue 23): on the scale-out harness job `use` misses the cache `make` saved just before in the same build (vendor/fetched absent), then saves the key empty over it; find whether the lease's cache index lags the CacheSaved, then drop this ignore"]
fn scale_out_services_keep_artifacts_and_caches_in_s3() {
    let mut out = ScaleOut::start(Options {
        apis: 1,
        schedulers: 1,
        projectors: 1,
        agents: 2,
        s3_objects: true,
        ..Options::default()
    });
    out.project("p", PIPELINE);
    out.agent_id(0);
    out.agent_id(1);
    let builds: Vec<String> = (0..3).map(|_| out.trigger(0, "p")).collect();
    out.wait_finished(&builds, Duration::from_secs(300));
    let finished = out.finished();
    for id in &builds {
        assert_eq!(
            finished[id],
            "succeeded",
            "build {id}:\n{}",
            out.ok(0, &["logs", id])
        );
    }
    // The bucket holds every artifact and cache the log records, at its recorded size.
    let (s3, bucket) = out.s3.clone().expect("on S3");
    let store = Objects::open_with(
        &format!("s3://{bucket}"),
        &S3Settings {
            endpoint: Some(s3.endpoint.clone()),
            access_key_id: Some(s3.access_key_id.clone()),
            secret_access_key: Some(s3.secret_access_key.clone()),
            region: Some(s3.region.clone()),
            allow_http: true,
        },
    )
    .expect("open the bucket");
    // A cache saved again under the same key replaces its object: the last save counts.
    let recorded: std::collections::BTreeMap<String, u64> = out
        .events()
        .iter()
        .filter_map(|e| match &e.env.payload {
            Some(Payload::ArtifactUploaded(a)) => Some((a.object_key.clone(), a.size)),
            Some(Payload::CacheSaved(c)) => Some((c.object_key.clone(), c.size)),
            _ => None,
        })
        .collect();
    assert!(recorded.len() > 3, "{recorded:?}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (key, size) in &recorded {
        assert_eq!(
            rt.block_on(store.size(key)).unwrap(),
            Some(*size),
            "object {key} in the bucket"
        );
    }
    // A later build restored the first one's cache from the bucket.
    let last = out.ok(0, &["logs", &builds[2]]);
    assert!(last.contains("cache from-"), "{last}");
    // The API serves an artifact from the bucket.
    let got = out.root.join("got.bin");
    out.ok(
        0,
        &[
            "artifacts",
            "get",
            &builds[0],
            "dist/blob.bin",
            "-o",
            got.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::metadata(&got).unwrap().len(), 300_000);
    // Nothing in the local objects directory.
    let local: Vec<_> = std::fs::read_dir(out.root.join("objects"))
        .unwrap()
        .flatten()
        .collect();
    assert!(local.is_empty(), "{local:?}");
    out.assert_all_running();
}
