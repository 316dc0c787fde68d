//! The object store against real parts: a local directory, and a real S3 server on loopback
//! (MinIO, started by `scripts/setup-s3.sh`; `TRIBUTARY_TEST_S3_ENDPOINT` overrides where).

use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tributary_objects::{Objects, ObjectsError, S3Settings, Stored};

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: incompressible, reproducible.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Upload a multi-megabyte file (several multipart parts), download it verified, compare.
async fn roundtrip(objects: &Objects, dir: &Path) {
    let data = random_bytes(12 * 1024 * 1024 + 17, 7);
    let src = dir.join("big.bin");
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let key = "artifacts/acme/web/b1/build/dist/big.bin";
    let stored = objects.put_file(key, &src).await.unwrap();
    assert_eq!(
        stored,
        Stored {
            size: data.len() as u64,
            sha256: sha256(&data)
        }
    );
    assert_eq!(objects.size(key).await.unwrap(), Some(data.len() as u64));
    let dest = dir.join("down/nested/big.bin");
    objects.get_verified(key, &stored, &dest).await.unwrap();
    let mut got = Vec::new();
    std::fs::File::open(&dest)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == data, "downloaded bytes differ");
    // Nothing but the file is left in the destination directory.
    assert_eq!(
        std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
        1
    );

    let listed = objects.list("artifacts/acme/web/b1/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, key);
    assert_eq!(listed[0].size, data.len() as u64);

    objects.delete(key).await.unwrap();
    assert_eq!(objects.size(key).await.unwrap(), None);
    objects.delete(key).await.unwrap();
    match objects.get_verified(key, &stored, &dir.join("gone")).await {
        Err(ObjectsError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

/// An object changed after upload is refused on download, and no file appears.
async fn corruption_is_detected(objects: &Objects, dir: &Path, tamper: impl AsyncFnOnce(&str)) {
    let key = "artifacts/acme/web/b2/build/app.tar";
    let stored = objects
        .put_bytes(key, Bytes::from_static(b"the real artifact"))
        .await
        .unwrap();
    tamper(key).await;
    let dest = dir.join("corrupt/app.tar");
    let err = objects.get_verified(key, &stored, &dest).await.unwrap_err();
    match &err {
        ObjectsError::Corrupt {
            expected_sha256, ..
        } => assert_eq!(expected_sha256, &stored.sha256),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains("is corrupt"), "{err}");
    assert!(!dest.exists());
    assert_eq!(
        std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn local_directory_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let objects = Objects::open(tmp.path().join("objects").to_str().unwrap()).unwrap();
    roundtrip(&objects, tmp.path()).await;
}

#[tokio::test]
async fn local_file_url_and_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("objects");
    let url = format!("file://{}", root.display());
    let objects = Objects::open(&url).unwrap();
    corruption_is_detected(&objects, tmp.path(), async |key: &str| {
        // Same size, different bytes: only the hash can tell.
        std::fs::write(root.join(key), b"the fake artifact").unwrap();
    })
    .await;
}

#[test]
fn bad_urls_say_what_to_write() {
    let e = Objects::open("s3://").unwrap_err().to_string();
    assert!(e.contains("no bucket"), "{e}");
    let e = Objects::open("gs://bucket/x").unwrap_err().to_string();
    assert!(e.contains("s3://BUCKET/PREFIX"), "{e}");
}

// ---- S3 (MinIO of scripts/setup-s3.sh, credentials passed explicitly) ----

/// A fresh bucket on the test server, and the settings that reach it.
fn s3_bucket() -> (String, S3Settings) {
    let s3 = tributary_testkit::s3();
    let bucket = s3.fresh_bucket();
    let settings = S3Settings {
        endpoint: Some(s3.endpoint),
        access_key_id: Some(s3.access_key_id),
        secret_access_key: Some(s3.secret_access_key),
        region: Some(s3.region),
        allow_http: true,
    };
    (bucket, settings)
}

#[tokio::test]
async fn s3_roundtrip_with_prefix() {
    tributary_testkit::require!(S3);
    let (bucket, s3) = s3_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let objects = Objects::open_with(&format!("s3://{bucket}/tributary/prod"), &s3).unwrap();
    roundtrip(&objects, tmp.path()).await;
    // The prefix is really there: the same bucket without it lists the key under the prefix.
    let bare = Objects::open_with(&format!("s3://{bucket}"), &s3).unwrap();
    bare.put_bytes("tributary/prod/x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(objects.size("x").await.unwrap(), Some(1));
}

#[tokio::test]
async fn s3_corruption_is_detected() {
    tributary_testkit::require!(S3);
    let (bucket, s3) = s3_bucket();
    let tmp = tempfile::tempdir().unwrap();
    let objects = Objects::open_with(&format!("s3://{bucket}"), &s3).unwrap();
    let other = objects.clone();
    corruption_is_detected(&objects, tmp.path(), async move |key: &str| {
        other
            .put_bytes(key, Bytes::from_static(b"the fake artifact"))
            .await
            .unwrap();
    })
    .await;
}

/// Wrong credentials and a missing bucket are errors that name the store, not hangs.
#[tokio::test]
async fn s3_refusals_are_errors_that_name_the_store() {
    tributary_testkit::require!(S3);
    let (bucket, s3) = s3_bucket();
    let wrong = S3Settings {
        secret_access_key: Some("not-the-secret".into()),
        ..s3.clone()
    };
    let objects = Objects::open_with(&format!("s3://{bucket}"), &wrong).unwrap();
    let started = std::time::Instant::now();
    let err = objects
        .put_bytes("x", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ObjectsError::Store { .. }), "{err:?}");
    assert!(err.to_string().contains(&bucket), "{err}");

    let missing = Objects::open_with("s3://tributary-test-no-such-bucket", &s3).unwrap();
    let err = missing
        .put_bytes("x", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("tributary-test-no-such-bucket"),
        "{err}"
    );
    let took = started.elapsed();
    println!("two refused requests took {took:?}");
    assert!(took < std::time::Duration::from_secs(60), "{took:?}");
}
