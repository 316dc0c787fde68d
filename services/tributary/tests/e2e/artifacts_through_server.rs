//! Artifacts through the server: two real `tributary agent` processes with separate work
//! directories and no `--objects` pass a job's artifacts to the job that needs it through a
//! real `tributary up` (upload and fetch over the agents' own authenticated connections, sha256
//! checked by the server and by each agent).

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{job, start};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(s: &common::Server, name: &str) -> Proc {
    let log = std::fs::File::create(s.root.join(format!("agent-{name}.log"))).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args([
                "agent", "--server", &s.addr, "--token", &s.token, "--name", name,
            ])
            .args(["--labels", name, "--workdir"])
            .arg(s.root.join(format!("agent-{name}")))
            .env_remove("TRIBUTARY_OBJECTS")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn agents_without_object_storage_pass_artifacts_through_the_server() {
    let s = start(0);
    s.project(
        "app",
        "jobs:\n  make:\n    runs-on: [a]\n    steps:\n      - run: mkdir -p dist && head -c 3000000 /dev/urandom > dist/big.bin && sha256sum dist/big.bin > big.sha && cp big.sha dist/ && echo \"made in $PWD\" > dist/note.txt\n    artifacts: [dist]\n  \
         use:\n    needs: make\n    runs-on: [b]\n    steps:\n      - run: sha256sum -c dist/big.sha && cat dist/note.txt && echo \"used in $PWD\"\n",
    );
    let _a = agent(&s, "a");
    let _b = agent(&s, "b");
    let id = s.trigger("app");
    let b = s.finished(&id, Duration::from_secs(120));
    let logs = s.ok(&s.token, &["logs", &id]);
    assert_eq!(b["status"], "succeeded", "{b}\n{logs}");
    assert_eq!(job(&b, "use")["status"], "succeeded");
    // Each job ran under its own agent's work directory.
    let a_dir = s.root.join("agent-a");
    let b_dir = s.root.join("agent-b");
    assert!(
        logs.contains(&format!("made in {}", a_dir.display())),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("used in {}", b_dir.display())),
        "{logs}"
    );
    assert!(logs.contains("dist/big.bin: OK"), "{logs}");

    // The server stored what it verified: the recorded sha256 is the stored object's.
    let events = s.ok(
        &s.token,
        &[
            "events",
            "--data",
            s.data().to_str().unwrap(),
            "--build",
            &id,
            "--json",
        ],
    );
    let big = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["type"] == "artifact_uploaded" && e["path"] == "dist/big.bin")
        .expect("an artifact_uploaded for dist/big.bin");
    assert_eq!(big["size"], 3_000_000);
    let stored = s
        .data()
        .join("objects")
        .join(big["object_key"].as_str().unwrap());
    let sum = Command::new("sha256sum").arg(&stored).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(sum.split(' ').next(), big["sha256"].as_str(), "{stored:?}");

    // And `tributary artifacts get` serves it like any other.
    let out = s.root.join("got.bin");
    s.ok(
        &s.token,
        &[
            "artifacts",
            "get",
            &id,
            "dist/big.bin",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 3_000_000);
}
