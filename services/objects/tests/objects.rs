//! The object store against real parts: a local directory, and a real S3-compatible server on
//! loopback (started by `scripts/setup-s3.sh`; `TRIBUTARY_TEST_S3_ENDPOINT` overrides where).

use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tributary_objects::{Objects, ObjectsError, Stored};

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

// ---- S3 ----

fn s3_endpoint() -> String {
    std::env::var("TRIBUTARY_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9090".into())
}

/// A fresh bucket on the test server, and the environment object_store reads.
async fn s3_bucket() -> String {
    let endpoint = s3_endpoint();
    let hostport = endpoint.trim_start_matches("http://").to_owned();
    let bucket = format!("tributary-test-{}", uuid::Uuid::now_v7().simple());
    let mut stream = tokio::net::TcpStream::connect(&hostport)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no S3-compatible server at {endpoint} ({e}): start one with scripts/setup-s3.sh \
             (or set TRIBUTARY_TEST_S3_ENDPOINT)"
            )
        });
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await.unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "creating the bucket: {resp}"
    );
    // SAFETY of set_var: every S3 test sets the same values.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ENDPOINT", &endpoint);
        std::env::set_var("AWS_ALLOW_HTTP", "true");
    }
    bucket
}

#[tokio::test]
async fn s3_roundtrip_with_prefix() {
    tributary_testkit::require!(S3);
    let bucket = s3_bucket().await;
    let tmp = tempfile::tempdir().unwrap();
    let objects = Objects::open(&format!("s3://{bucket}/tributary/prod")).unwrap();
    roundtrip(&objects, tmp.path()).await;
    // The prefix is really there: the same bucket without it lists the key under the prefix.
    let bare = Objects::open(&format!("s3://{bucket}")).unwrap();
    bare.put_bytes("tributary/prod/x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(objects.size("x").await.unwrap(), Some(1));
}

#[tokio::test]
async fn s3_corruption_is_detected() {
    tributary_testkit::require!(S3);
    let bucket = s3_bucket().await;
    let tmp = tempfile::tempdir().unwrap();
    let objects = Objects::open(&format!("s3://{bucket}")).unwrap();
    let other = objects.clone();
    corruption_is_detected(&objects, tmp.path(), async move |key: &str| {
        other
            .put_bytes(key, Bytes::from_static(b"the fake artifact"))
            .await
            .unwrap();
    })
    .await;
}
