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
use:\n    needs: make\n    cache:\n      key: deps-v1\n      paths: [vendor]\n    steps:\n      - run: sha256sum -c dist/blob.sha && test -f vendor/fetched && echo \"cache $(cat vendor/fetched)\"\n";

/// Three builds at once save the same cache key: each save is an archive of its own, so
/// every `use` restores exactly the archive its lease names (one object per key, written
/// over by each save, made concurrent restores "corrupt" misses that then saved an empty
/// cache over the key).
#[test]
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
    // Every save is an object of its own: none is written twice, none deleted (superseded
    // archives wait an hour).
    let events = out.events();
    let mut recorded = std::collections::BTreeMap::new();
    for e in events {
        let (key, size) = match &e.env.payload {
            Some(Payload::ArtifactUploaded(a)) => (a.object_key.clone(), a.size),
            Some(Payload::CacheSaved(c)) => (c.object_key.clone(), c.size),
            Some(Payload::CacheEvicted(c)) => panic!("nothing is evicted here: {c:?}"),
            _ => continue,
        };
        assert!(
            recorded.insert(key, size).is_none(),
            "an object written twice"
        );
    }
    // Every `use` restored the cache its lease named, so none saved one.
    let of_use = |hit: bool| {
        events
            .iter()
            .filter(|e| match &e.env.payload {
                Some(Payload::CacheRestored(r)) => r.job == "use" && r.hit == hit,
                _ => false,
            })
            .count()
    };
    assert_eq!((of_use(true), of_use(false)), (3, 0), "{recorded:?}");
    let saved_by_use = events
        .iter()
        .any(|e| matches!(&e.env.payload, Some(Payload::CacheSaved(c)) if c.job == "use"));
    assert!(!saved_by_use, "a `use` job saved the cache");
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
