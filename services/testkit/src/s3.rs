//! The test S3 server: MinIO on loopback, started by `scripts/setup-s3.sh` with fixed test
//! credentials. Tests pass these explicitly (to `Objects::open_with`, or as the environment of
//! a child process they start), never through this process's environment.

use std::process::Command;

/// Where the test S3 server is and how to sign in (the values `scripts/setup-s3.sh` starts
/// MinIO with; `TRIBUTARY_TEST_S3_ENDPOINT` overrides the endpoint).
#[derive(Debug, Clone)]
pub struct TestS3 {
    /// `http://host:port`.
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

/// The test S3 server, checked to answer; panics naming the script that starts it.
pub fn s3() -> TestS3 {
    let endpoint = std::env::var("TRIBUTARY_TEST_S3_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:9090".into());
    let s3 = TestS3 {
        endpoint,
        access_key_id: "tributary-test".into(),
        secret_access_key: "tributary-test-secret".into(),
        region: "us-east-1".into(),
    };
    let ready = s3.curl(
        &["-o", "/dev/null", "-w", "%{http_code}"],
        "GET",
        "minio/health/ready",
    );
    assert!(
        ready.as_deref() == Ok("200"),
        "no MinIO at {} ({}): run scripts/setup-s3.sh (it builds and starts one on \
         127.0.0.1:9090), or set TRIBUTARY_TEST_S3_ENDPOINT",
        s3.endpoint,
        match ready {
            Ok(code) => format!("health check answered HTTP {code}"),
            Err(e) => e,
        }
    );
    s3
}

impl TestS3 {
    /// A fresh, empty bucket of the test's own: its name.
    pub fn fresh_bucket(&self) -> String {
        let bucket = format!(
            "tributary-test-{}",
            tributary_proto::new_id().replace('-', "")
        );
        let bucket = bucket[..bucket.len().min(63)].to_owned();
        let code = self
            .signed("PUT", &bucket, &[])
            .unwrap_or_else(|e| panic!("creating bucket {bucket} on {}: {e}", self.endpoint));
        assert_eq!(code, "200", "creating bucket {bucket} on {}", self.endpoint);
        bucket
    }

    /// Removes `bucket` with everything in it (MinIO's forced delete): a bucket that
    /// disappears under a running build.
    pub fn remove_bucket(&self, bucket: &str) {
        let code = self
            .signed("DELETE", bucket, &["-H", "x-minio-force-delete: true"])
            .unwrap_or_else(|e| panic!("removing bucket {bucket} on {}: {e}", self.endpoint));
        assert!(
            code == "204" || code == "200",
            "removing bucket {bucket} on {}: HTTP {code}",
            self.endpoint
        );
    }

    /// Whether `bucket` exists.
    pub fn bucket_exists(&self, bucket: &str) -> bool {
        let code = self
            .signed("HEAD", bucket, &["-I"])
            .unwrap_or_else(|e| panic!("checking bucket {bucket} on {}: {e}", self.endpoint));
        code == "200"
    }

    /// The `AWS_*` variables `object_store` reads, for a child process (`Command::envs`):
    /// `tributary up --objects s3://…`, `tributary agent --objects s3://…`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// A signed request (curl's `--aws-sigv4`) for `path` under the endpoint: its HTTP status.
    fn signed(&self, method: &str, path: &str, extra: &[&str]) -> Result<String, String> {
        let user = format!("{}:{}", self.access_key_id, self.secret_access_key);
        let sigv4 = format!("aws:amz:{}:s3", self.region);
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}", "--user", &user];
        args.extend(["--aws-sigv4", &sigv4]);
        args.extend_from_slice(extra);
        self.curl(&args, method, path)
    }

    fn curl(&self, args: &[&str], method: &str, path: &str) -> Result<String, String> {
        let url = format!("{}/{path}", self.endpoint.trim_end_matches('/'));
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "20"]).args(args);
        if method != "HEAD" {
            cmd.args(["-X", method]);
        }
        let out = cmd
            .arg(&url)
            .output()
            .map_err(|e| format!("cannot run curl ({e}); install curl"))?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if code.is_empty() || code == "000" {
            return Err(format!(
                "nothing answers at {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(code)
    }
}
