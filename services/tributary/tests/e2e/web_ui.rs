//! The web UI in a real browser (Debian's headless chromium through chromedriver, driven by
//! fantoccini) against a real `tributary up` process and real git repositories: sign-in, a
//! log that shows lines while the build still runs, final exit codes, ANSI colours, links to
//! lines, cancel from the page, and tenant isolation (in the browser and at the HTTP level).
//!
//! Needs `chromium` and `chromedriver` on the PATH: `scripts/setup-browser.sh` installs them.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    free_port, start, start_allowing_local_repos, wait_for_async, wait_for_port, wait_until_async,
};

use fantoccini::{Client, ClientBuilder, Locator};
use http_body_util::BodyExt;

/// Lines every job log starts with: the commands to recreate the job locally (services/agent
/// recreate.rs), before the job's own output.
const PREAMBLE: usize = 3;
const WAIT: Duration = Duration::from_secs(90);

// ------------------------------------------------------------------ the browser

/// chromedriver on a free port of its own, and a headless chromium session through it.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn which(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Browser {
    async fn start() -> Browser {
        assert!(
            which("chromedriver") && which("chromium"),
            "chromium and chromedriver are missing: run scripts/setup-browser.sh (scripts/setup.sh \
             calls it)"
        );
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        wait_for_port(&format!("127.0.0.1:{port}"), "chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1800",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a chromium session through chromedriver");
        Browser {
            driver,
            client: Some(client),
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }

    /// Signs in through the login page with `token`, starting from `url` (a UI page).
    async fn sign_in(&self, url: &str, token: &str) {
        let c = self.c();
        c.goto(url).await.unwrap();
        let field = c
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css("input[name=token]"))
            .await
            .expect("the sign-in form");
        field.send_keys(token).await.unwrap();
        c.find(Locator::Css("form button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.until("signed in (away from the sign-in page)", || async {
            let url = c.current_url().await.ok()?;
            (url.path() != "/ui/login").then_some(())
        })
        .await;
    }

    /// Clicks the element matching `css`; retries when a live refresh replaced it meanwhile.
    async fn click(&self, css: &str) {
        self.until(&format!("a click on {css}"), || async {
            let el = self.c().find(Locator::Css(css)).await.ok()?;
            el.click().await.ok()
        })
        .await;
    }

    /// Runs `script` with `box` bound to the first job's log box; returns its value.
    async fn log_js(&self, script: &str) -> serde_json::Value {
        self.c()
            .execute(
                &format!("var box = document.querySelector('details.joblog .log'); {script}"),
                vec![],
            )
            .await
            .unwrap()
    }

    /// Text of the first element matching `css`, if any.
    /// The text of the first element matching `css`, None if there is none. The live page
    /// replaces parts of itself (the summary) at any time: an element found and replaced before
    /// its text is read (stale) is looked up again.
    async fn text(&self, css: &str) -> Option<String> {
        for _ in 0..5 {
            let el = self.c().find(Locator::Css(css)).await.ok()?;
            if let Ok(text) = el.text().await {
                return Some(text);
            }
        }
        None
    }

    async fn count(&self, css: &str) -> usize {
        self.c()
            .find_all(Locator::Css(css))
            .await
            .map_or(0, |v| v.len())
    }

    /// Polls `probe` until it returns Some (or panics after a generous timeout).
    async fn until<T, F, Fut>(&self, what: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        wait_for_async(what, WAIT, async || probe().await.ok_or_else(String::new)).await
    }
}

/// The build page's history slider, moved with the keyboard, shows the finished build as it
/// stood at an earlier step (a line running, a job pending), folded by the server; "Now" goes
/// back to the present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_slider_shows_the_build_as_it_was() {
    let s = start(1);
    s.project_as(
        &s.token,
        "past",
        "jobs:\n  slow:\n    steps:\n      - script:\n          - sleep 1\n          - echo done\n  \
         after:\n    needs: slow\n    steps:\n      - run: echo after\n",
    );
    let build = s.trigger_as(&s.token, "past");
    s.finished(&build, WAIT);
    let b = Browser::start().await;
    b.sign_in(&format!("{}/ui/builds/{build}", s.addr), &s.token)
        .await;
    b.until("the finished summary", || async {
        b.text("article.job[data-job='slow'] h2")
            .await
            .filter(|t| t.contains("succeeded"))
    })
    .await;
    b.click("details#history > summary").await;
    b.until("the slider, once the steps are loaded", || async {
        let v = b
            .c()
            .execute(
                "return !document.getElementById('history-slider').disabled;",
                vec![],
            )
            .await
            .ok()?;
        (v == serde_json::json!(true)).then_some(())
    })
    .await;
    // To the first step, then right until the first line of `slow` has started.
    let slider = b.c().find(Locator::Css("#history-slider")).await.unwrap();
    slider.send_keys(&fantoccini::key::Key::Home).await.unwrap();
    let target = "line 1 of step 1 of job slow started";
    for _ in 0..200 {
        let label = b.text("#history-label").await.unwrap_or_default();
        if label.contains(target) {
            break;
        }
        slider
            .send_keys(&fantoccini::key::Key::Right)
            .await
            .unwrap();
    }
    let label = b.text("#history-label").await.unwrap_or_default();
    assert!(label.contains(target), "{label}");
    b.until("the build as it was then", || async {
        b.c().find(Locator::Css("#asof")).await.ok()?;
        let slow = b
            .c()
            .find(Locator::Css("article.job[data-job='slow']"))
            .await
            .ok()?;
        let line = b.c().find(Locator::Css("#line-0-0-0")).await.ok()?;
        let after = b
            .c()
            .find(Locator::Css("article.job[data-job='after']"))
            .await
            .ok()?;
        let running = slow.attr("data-status").await.ok()?? == "running"
            && line.attr("data-status").await.ok()?? == "running"
            && after.attr("data-status").await.ok()?? == "pending";
        running.then_some(())
    })
    .await;
    // The past has no actions; the page was not reloaded (the slider keeps its place).
    assert_eq!(b.count("#summary #rerun, #summary #cancel").await, 0);
    assert!(b.text("#history-label").await.unwrap().contains(target));
    // Back to now.
    b.click("#history-now").await;
    b.until("the present again", || async {
        if b.count("#asof").await > 0 {
            return None;
        }
        let slow = b
            .c()
            .find(Locator::Css("article.job[data-job='slow']"))
            .await
            .ok()?;
        (slow.attr("data-status").await.ok()?? == "succeeded").then_some(())
    })
    .await;
    b.close().await;
}

// ------------------------------------------------------------------ plain HTTP

struct Http {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: String,
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Http {
    fn new(base: &str) -> Http {
        Http {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            base: base.to_owned(),
        }
    }

    /// A request with the session cookie `token` (if any) and extra headers; the body is read
    /// for at most 3 s (a live stream never ends by itself).
    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("cookie", format!("tributary_session={t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(
                req.body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_owned(),
                )))
                .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = resp.into_body();
        let mut text = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
            if let Ok(data) = frame.into_data() {
                text.extend_from_slice(&data);
            }
        }
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&text).into_owned(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send("GET", path, token, &[], "").await
    }
}

// ------------------------------------------------------------------ the tests

/// Prints `tick 1..30` 100 ms apart, then waits for the test to create `gate`, so the test
/// sees lines in the browser while the build certainly still runs. The second job fails.
fn ticker_pipeline(gate: &Path) -> String {
    format!(
        "jobs:\n  ticker:\n    steps:\n      - name: tick\n        script:\n          - for i in $(seq 1 30); do echo \"tick $i\"; sleep 0.1; done\n          - \"printf '\\\\033[32mgreen done\\\\033[0m\\\\n'\"\n          - while [ ! -e {} ]; do sleep 0.1; done\n  verdict:\n    needs: ticker\n    matrix:\n      os: [linux]\n    steps:\n      - script:\n          - echo checking ${{{{ matrix.os }}}}\n          - exit 3\n          - echo never\n",
        gate.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_live_and_lines_show_exit_codes() {
    tributary_testkit::require!(Browser);
    let s = start(2);
    let gate = s.root.join("gate");
    s.project_as(&s.token, "live", &ticker_pipeline(&gate));
    let b = Browser::start().await;
    b.sign_in(&format!("{}/ui/", s.addr), &s.token).await;
    // The project list links to the project.
    b.until("the project in the list", || async {
        b.text("table.list a[href='/ui/projects/live']").await
    })
    .await;

    let build = s.trigger_as(&s.token, "live");
    b.c()
        .goto(&format!("{}/ui/builds/{build}", s.addr))
        .await
        .unwrap();
    // Lines arrive while the build runs: it cannot finish before the gate exists.
    let seen = b
        .until("tick lines in the page", || async {
            let n = b.count("details.joblog[data-job=ticker] .ln").await;
            (n >= 5).then_some(n)
        })
        .await;
    assert!(seen >= 5);
    assert_eq!(s.status(&s.token, &build), "running");
    assert_eq!(
        b.text(&format!("#L0-{} .t", 1 + PREAMBLE)).await.as_deref(),
        Some("tick 1"),
        "lines are numbered from 1 in order"
    );
    // The green line, rendered from its ANSI escape.
    b.until("the ANSI green line", || async {
        b.text(".log span.f2").await.filter(|t| t == "green done")
    })
    .await;
    assert_eq!(
        b.text(&format!("#L0-{} .t", 30 + PREAMBLE))
            .await
            .as_deref(),
        Some("tick 30")
    );
    std::fs::write(&gate, "go").unwrap();

    // The build ends: the summary shows the final status and each line's exit code.
    b.until("the build failed (summary refreshed)", || async {
        b.c()
            .find(Locator::Css("header.build[data-status=failed]"))
            .await
            .ok()
    })
    .await;
    b.until("every line's exit code", || async {
        let first = b.text("#line-0-0-0 .exit").await?;
        let failing = b.text("#line-1-0-1 .exit").await?;
        (first == "exit 0" && failing == "exit 3").then_some(())
    })
    .await;
    assert_eq!(
        b.text("#line-1-0-2 .exit").await.as_deref(),
        Some("–"),
        "the line after the failing one never ran"
    );
    assert_eq!(
        b.text("#job-1 .jobfacts .exit").await.as_deref(),
        Some("exit 3")
    );
    assert_eq!(b.text("#job-1 h2 .chip").await.as_deref(), Some("os=linux"));
    // The log's command headers carry exit codes too, and the stream ended.
    b.until("the failing command's header in the log", || async {
        b.text("details.joblog[data-job='verdict[os=linux]'] .cmd .res.fail")
            .await
            .filter(|t| t.starts_with("exit 3 · "))
    })
    .await;
    b.until("the stream's end", || async {
        b.c()
            .find(Locator::Css("#logs[data-status=failed]"))
            .await
            .ok()
    })
    .await;
    // The DAG: two nodes, one edge, linking to the jobs.
    assert_eq!(b.count("svg.dag a.node").await, 2);
    assert_eq!(b.count("svg.dag path.edge").await, 1);
    // Re-run failed is offered once the build failed; cancel no longer.
    assert_eq!(b.count("#rerun").await, 1);
    assert_eq!(b.count("#cancel").await, 0);

    let shot = b.c().screenshot().await.unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("build-page.png"), shot).unwrap();

    // On a phone-sized window the page fits the width (the DAG and logs scroll inside
    // their own boxes).
    b.c().set_window_size(390, 1400).await.unwrap();
    b.c().refresh().await.unwrap();
    b.until("the log replayed at phone size", || async {
        b.text(&format!("#L0-{} .t", 30 + PREAMBLE))
            .await
            .filter(|t| t == "tick 30")
    })
    .await;
    let overflow: serde_json::Value = b
        .c()
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page is wider than a phone: {overflow}"
    );
    std::fs::write(
        dir.join("build-page-phone.png"),
        b.c().screenshot().await.unwrap(),
    )
    .unwrap();
    b.c().set_window_size(1280, 1800).await.unwrap();

    // A link to a line highlights it once the replayed log reaches it.
    b.c()
        .goto(&format!("{}/ui/builds/{build}#L0-{}", s.addr, 7 + PREAMBLE))
        .await
        .unwrap();
    b.until("line 7 highlighted", || async {
        b.text(".log .ln.hl .t").await.filter(|t| t == "tick 7")
    })
    .await;

    // Re-run failed: a new build page of the same project.
    b.click("#rerun").await;
    let rerun = b
        .until("the re-run's page", || async {
            let url = b.c().current_url().await.ok()?;
            let id = url.path().strip_prefix("/ui/builds/")?.to_owned();
            (id != build).then_some(id)
        })
        .await;
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&s.token, &["get", &rerun, "--json"])).unwrap();
    assert_eq!(v["project"], "live");
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_build_is_canceled_from_its_page() {
    tributary_testkit::require!(Browser);
    let s = start(2);
    s.project_as(
        &s.token,
        "slow",
        "jobs:\n  slow:\n    steps:\n      - run: seq 1 300; for i in $(seq 1 1200); do echo \"waiting $i\"; sleep 0.1; done\n",
    );
    let b = Browser::start().await;
    let build = s.trigger_as(&s.token, "slow");
    b.sign_in(&format!("{}/ui/builds/{build}", s.addr), &s.token)
        .await;
    b.until("a log line", || async {
        (b.count("details.joblog .ln").await > 0).then_some(())
    })
    .await;
    // Auto-scroll: the log follows its end until the reader scrolls up; then new lines do not
    // move it, until "follow" is clicked.
    b.until("the log overflows its box, scrolled to the end", || async {
        let v = b.log_js("return box.scrollHeight > box.clientHeight + 100 && box.scrollTop + box.clientHeight >= box.scrollHeight - 8;").await;
        (v == serde_json::json!(true)).then_some(())
    })
    .await;
    b.log_js("box.scrollTop = 0; return 0;").await;
    b.until("the follow button appears", || async {
        b.c()
            .find(Locator::Css("details.joblog button.follow:not([hidden])"))
            .await
            .ok()
    })
    .await;
    let before = b.count("details.joblog .ln").await;
    b.until("more lines while scrolled up", || async {
        (b.count("details.joblog .ln").await > before + 3).then_some(())
    })
    .await;
    assert_eq!(
        b.log_js("return box.scrollTop;").await,
        serde_json::json!(0)
    );
    b.click("details.joblog button.follow").await;
    b.until("following the end again", || async {
        let v = b
            .log_js("return box.scrollTop + box.clientHeight >= box.scrollHeight - 8;")
            .await;
        (v == serde_json::json!(true)).then_some(())
    })
    .await;
    // The agents page shows the job the build runs, on the agent that runs it.
    b.c().goto(&format!("{}/ui/agents", s.addr)).await.unwrap();
    b.until("the running job on its agent", || async {
        b.text(&format!("#agents a[href='/ui/builds/{build}']"))
            .await
            .filter(|t| t == "slow")
    })
    .await;
    b.c()
        .goto(&format!("{}/ui/builds/{build}", s.addr))
        .await
        .unwrap();
    b.click("#cancel").await;
    b.until("the build canceled on the page", || async {
        b.c()
            .find(Locator::Css("header.build[data-status=canceled]"))
            .await
            .ok()
    })
    .await;
    assert_eq!(s.status(&s.token, &build), "canceled");
    assert_eq!(b.count("#cancel").await, 0);

    // The builds list shows it, live: a new build appears without a reload.
    b.c()
        .goto(&format!("{}/ui/projects/slow", s.addr))
        .await
        .unwrap();
    b.until("the canceled build in the list", || async {
        b.c()
            .find(Locator::Css(&format!(
                "tr[data-build='{build}'][data-status=canceled]"
            )))
            .await
            .ok()
    })
    .await;
    let next = s.trigger_as(&s.token, "slow");
    b.until("the new build appears in the list by itself", || async {
        b.c()
            .find(Locator::Css(&format!("tr[data-build='{next}']")))
            .await
            .ok()
    })
    .await;
    s.ok(&s.token, &["cancel", &next]);
    b.until(
        "the new build turns canceled in the list by itself",
        || async {
            b.c()
                .find(Locator::Css(&format!(
                    "tr[data-build='{next}'][data-status=canceled]"
                )))
                .await
                .ok()
        },
    )
    .await;

    // A long log (1.2 MiB, 200,000 lines): the page loads only its last ~1 MB, keeps at most
    // 20,000 lines, and numbers them as in the whole log.
    s.project_as(
        &s.token,
        "long",
        "jobs:\n  long:\n    steps:\n      - run: seq 1 200000\n",
    );
    let long = s.trigger_as(&s.token, "long");
    s.ok(&s.token, &["logs", &long, "-f"]);
    b.c()
        .goto(&format!("{}/ui/builds/{long}", s.addr))
        .await
        .unwrap();
    b.until("line 200000, numbered 200000", || async {
        b.text(&format!("#L0-{} .t", 200000 + PREAMBLE))
            .await
            .filter(|t| t == "200000")
    })
    .await;
    assert_eq!(
        b.text(&format!("#L0-{} .t", 199990 + PREAMBLE))
            .await
            .as_deref(),
        Some("199990")
    );
    let kept = b.count("details.joblog .ln").await;
    assert!((1000..=20_000).contains(&kept), "{kept} lines in the page");
    let notice = b.text("details.joblog .notice").await.unwrap();
    assert!(notice.contains("earlier lines"), "{notice}");
    assert_eq!(
        b.count("#L0-1").await,
        0,
        "the head of the log was not loaded"
    );

    // The agents page lists the two embedded agents.
    b.c().goto(&format!("{}/ui/agents", s.addr)).await.unwrap();
    b.until("two connected agents", || async {
        (b.count("#agents tr[data-state=connected]").await == 2).then_some(())
    })
    .await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_cannot_see_a_build_or_its_log() {
    tributary_testkit::require!(Browser);
    let s = start_allowing_local_repos(2);
    let acme = s.tenant("acme");
    let globex = s.tenant("globex");
    s.project_as(
        &acme,
        "secret",
        "jobs:\n  a:\n    steps:\n      - run: echo acme-only-output\n",
    );
    let out = s.ok(&acme, &["trigger", "secret", "--follow"]);
    assert!(out.contains("acme-only-output"), "{out}");
    let build = out.lines().next().unwrap().trim().to_owned();
    let page = format!("/ui/builds/{build}");

    // HTTP level: the owner reads the page, the log stream and the raw log.
    let h = Http::new(&s.addr);
    let own = h.get(&page, Some(&acme)).await;
    assert_eq!(own.status, 200);
    let stream = h.get(&format!("{page}/events"), Some(&acme)).await;
    assert_eq!(stream.status, 200);
    assert!(stream.body.contains("acme-only-output"), "{}", stream.body);
    assert!(stream.body.contains("event: end"), "{}", stream.body);
    // The builds table's live stream starts where the page was read: a build triggered
    // between loading the page and opening the stream is not missed. (An invalid pipeline:
    // the build is triggered and fails in one append, so nothing follows to hide a gap.)
    s.project_as(&acme, "broken", "jobs: {}\n");
    let list = h.get("/ui/projects/broken", Some(&acme)).await.body;
    let live = list
        .split("data-live=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .replace("&amp;", "&");
    let between = s.trigger_as(&acme, "broken");
    assert_eq!(s.status(&acme, &between), "failed");
    let changes = h.get(&live, Some(&acme)).await;
    assert_eq!(changes.status, 200);
    assert!(
        changes.body.contains("event: changed"),
        "{live}: {}",
        changes.body
    );
    let rows = h.get("/ui/projects/broken/rows", Some(&acme)).await.body;
    assert!(rows.contains(&between), "{rows}");

    // A reconnecting reader (Last-Event-ID) gets exactly the events after that one.
    let ids: Vec<u64> = stream
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|id| id.parse().unwrap())
        .collect();
    assert!(
        ids.len() > 4 && ids.windows(2).all(|w| w[0] < w[1]),
        "{ids:?}"
    );
    let mid = ids[ids.len() / 2];
    let resumed = h
        .send(
            "GET",
            &format!("{page}/events"),
            Some(&acme),
            &[("last-event-id", &mid.to_string())],
            "",
        )
        .await;
    let rest: Vec<u64> = resumed
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|id| id.parse().unwrap())
        .collect();
    assert_eq!(rest, ids[ids.len() / 2 + 1..].to_vec());
    let raw = h.get(&format!("{page}/log.txt"), Some(&acme)).await;
    assert!(
        raw.body
            .starts_with("tributary: to recreate this job locally")
            && raw.body.ends_with("\nacme-only-output\n"),
        "{}",
        raw.body
    );
    // Another tenant gets "not found" for every view of it, and learns nothing from it.
    for path in [
        page.clone(),
        format!("{page}/events"),
        format!("{page}/summary"),
        format!("{page}/log.txt?job=a"),
        "/ui/projects/secret/live".to_owned(),
        "/ui/projects/secret/rows".to_owned(),
    ] {
        let r = h.get(&path, Some(&globex)).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(!r.body.contains("acme-only-output"), "{path}");
    }
    let r = h
        .send(
            "GET",
            &format!("{page}/events"),
            None,
            &[("authorization", &format!("Bearer {globex}"))],
            "",
        )
        .await;
    assert_eq!(r.status, 404, "bearer header, other tenant");
    assert_eq!(
        h.get("/ui/projects/secret", Some(&globex)).await.status,
        404
    );
    assert!(!h.get("/ui/", Some(&globex)).await.body.contains("secret"));
    // Without a session: pages redirect to the sign-in, streams are 401.
    let anon = h.get(&page, None).await;
    assert_eq!(anon.status, 303);
    assert_eq!(
        anon.headers["location"],
        format!("/ui/login?next=/ui/builds/{build}")
    );
    assert_eq!(h.get(&format!("{page}/events"), None).await.status, 401);
    assert_eq!(
        h.get(&format!("{page}/events"), Some("trib_bogus"))
            .await
            .status,
        401
    );

    // Cancel needs the session's CSRF token and a same-origin request.
    let slow = s.root.join("gate-slow");
    s.project_as(
        &acme,
        "waits",
        &format!(
            "jobs:\n  w:\n    steps:\n      - run: while [ ! -e {} ]; do sleep 0.1; done\n",
            slow.display()
        ),
    );
    let running = s.trigger_as(&acme, "waits");
    wait_until_async("the build to start", WAIT, async || {
        s.status(&acme, &running) == "running"
    })
    .await;
    // The shared agents page: acme sees its running job; globex sees the agent busy, not whose.
    let mine = h.get("/ui/agents", Some(&acme)).await.body;
    assert!(mine.contains(&format!("/ui/builds/{running}")), "{mine}");
    let theirs = h.get("/ui/agents", Some(&globex)).await.body;
    assert!(!theirs.contains(&running), "{theirs}");
    assert!(theirs.contains("of other tenants"), "{theirs}");
    let cancel = format!("/ui/builds/{running}/cancel");
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let r = h.send("POST", &cancel, Some(&acme), &form, "csrf=").await;
    assert_eq!(r.status, 403, "no CSRF token");
    let page_html = h
        .get(&format!("/ui/builds/{running}"), Some(&acme))
        .await
        .body;
    let csrf = page_html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let globex_csrf_page = h.get("/ui/", Some(&globex)).await.body;
    let globex_csrf = globex_csrf_page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let r = h
        .send(
            "POST",
            &cancel,
            Some(&acme),
            &form,
            &format!("csrf={globex_csrf}"),
        )
        .await;
    assert_eq!(r.status, 403, "another session's CSRF token");
    let cross = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("origin", "http://evil.example"),
    ];
    let r = h
        .send(
            "POST",
            &cancel,
            Some(&acme),
            &cross,
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, 403, "cross-site");
    let r = h
        .send(
            "POST",
            &cancel,
            Some(&globex),
            &form,
            &format!("csrf={globex_csrf}"),
        )
        .await;
    assert_eq!(r.status, 404, "another tenant cannot cancel it");
    let st = s.status(&acme, &running);
    assert!(
        st == "queued" || st == "running",
        "refused cancels changed nothing: {st}"
    );
    let r = h
        .send("POST", &cancel, Some(&acme), &form, &format!("csrf={csrf}"))
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.headers["location"], format!("/ui/builds/{running}"));
    std::fs::write(&slow, "go").unwrap();
    wait_until_async("the canceled build to finish", WAIT, async || {
        s.status(&acme, &running) == "canceled"
    })
    .await;

    // In the browser: globex signs in and cannot open acme's build page.
    let b = Browser::start().await;
    b.sign_in(&format!("{}{page}", s.addr), &globex).await;
    b.until("not found", || async {
        b.text("main h1").await.filter(|t| t == "Not found")
    })
    .await;
    assert_eq!(b.count(".log .ln").await, 0);
    assert_eq!(
        b.text("header.top .who").await.as_deref(),
        Some("globex"),
        "signed in as globex, with the navigation"
    );
    let source = b.c().source().await.unwrap();
    assert!(!source.contains("acme-only-output"));
    // Cookies: HttpOnly, so the page's scripts cannot read the token.
    let cookies: serde_json::Value = b
        .c()
        .execute("return document.cookie;", vec![])
        .await
        .unwrap();
    assert_eq!(cookies, serde_json::json!(""));
    b.close().await;
}

/// The artifacts of a build are listed on its page with working download links (the session
/// cookie authenticates the download), and the usage page shows the tenant's metered minutes
/// and live invoice: tenant A's, never tenant B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_download_and_usage_show_only_the_tenants_own() {
    tributary_testkit::require!(Browser);
    let s = start_allowing_local_repos(2);
    let acme = s.tenant("acme");
    let globex = s.tenant("globex");
    s.project_as(
        &acme,
        "shipit",
        "jobs:\n  build:\n    steps:\n      - run: mkdir -p dist && printf 'acme artifact bytes\\n' > dist/app.txt && sleep 1\n    artifacts: [dist]\n",
    );
    let out = s.ok(&acme, &["trigger", "shipit", "--follow"]);
    let build = out.lines().next().unwrap().trim().to_owned();
    assert_eq!(s.status(&acme, &build), "succeeded", "{out}");
    let listed = s.ok(&acme, &["artifacts", "list", &build]);
    let sha = listed
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("a sha256 in {listed}"))
        .to_owned();
    let download = format!("/api/builds/{build}/artifacts/build/dist/app.txt");

    // HTTP: the owner's session cookie downloads the exact bytes; another tenant's cookie
    // gets 404, no credentials 401; the bearer header still works.
    let h = Http::new(&s.addr);
    let own = h.get(&download, Some(&acme)).await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.body, "acme artifact bytes\n");
    assert_eq!(own.headers["x-tributary-sha256"], sha.as_str());
    let other = h.get(&download, Some(&globex)).await;
    assert_eq!(other.status, 404, "{}", other.body);
    assert!(!other.body.contains("acme artifact"));
    assert_eq!(h.get(&download, None).await.status, 401);
    assert_eq!(h.get(&download, Some("trib_bogus")).await.status, 401);
    let bearer = h
        .send(
            "GET",
            &download,
            None,
            &[("authorization", &format!("Bearer {acme}"))],
            "",
        )
        .await;
    assert_eq!(bearer.status, 200);
    assert_eq!(bearer.body, "acme artifact bytes\n");

    // In the browser: the build page lists the artifact; its link downloads the right bytes
    // with the browser's own (HttpOnly) session cookie.
    let b = Browser::start().await;
    b.sign_in(&format!("{}/ui/builds/{build}", s.addr), &acme)
        .await;
    let link = b
        .until("the artifact's row", || async {
            b.c()
                .find(Locator::Css(
                    "#artifacts tr[data-job=build][data-path='dist/app.txt'] a.download",
                ))
                .await
                .ok()
        })
        .await;
    assert_eq!(
        link.attr("href").await.unwrap().as_deref(),
        Some(download.as_str())
    );
    assert_eq!(
        b.text("#artifacts tr[data-path='dist/app.txt'] td.num")
            .await
            .as_deref(),
        Some("20 B")
    );
    assert_eq!(
        b.text("#artifacts tr[data-path='dist/app.txt'] td[title]")
            .await
            .as_deref(),
        Some(&sha[..10])
    );
    let fetched = b
        .c()
        .execute_async(
            "var done = arguments[arguments.length - 1];
             var a = document.querySelector('#artifacts a.download');
             fetch(a.href).then(function (r) {
               return r.text().then(function (t) { done([r.status, t]); });
             }, function (e) { done([0, String(e)]); });",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        fetched,
        serde_json::json!([200, "acme artifact bytes\n"]),
        "the page's link downloads the artifact with the session cookie"
    );

    // The usage page: acme's minutes for the build's project, and a live invoice line.
    b.c().goto(&format!("{}/ui/usage", s.addr)).await.unwrap();
    let millis = b
        .until("acme's usage row", || async {
            let row = b
                .c()
                .find(Locator::Css("#usage tr[data-project=shipit]"))
                .await
                .ok()?;
            row.attr("data-millis")
                .await
                .ok()??
                .parse::<u64>()
                .ok()
                .filter(|m| *m >= 1000)
        })
        .await;
    let ticks: u64 = s
        .ok(
            &s.token,
            &[
                "events",
                "--data",
                s.data().to_str().unwrap(),
                "--build",
                &build,
                "--json",
            ],
        )
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "usage_tick")
        .map(|e| e["millis"].as_u64().unwrap())
        .sum();
    assert_eq!(millis, ticks, "the page shows exactly the metered time");
    let line = b
        .text("#current table.invoice[data-status=live] tr[data-kind=usage][data-project=shipit]")
        .await
        .expect("a live invoice line for the project");
    assert!(line.contains("shipit"), "{line}");
    assert_eq!(b.text("#current h2 .badge").await.as_deref(), Some("live"));
    b.close().await;

    // Tenant B's usage page shows none of it.
    let theirs = h.get("/ui/usage", Some(&globex)).await;
    assert_eq!(theirs.status, 200);
    assert!(theirs.body.contains("id=\"no-usage\""), "{}", theirs.body);
    assert!(!theirs.body.contains("shipit"), "{}", theirs.body);
    assert_eq!(h.get("/ui/usage", None).await.status, 303);
}

// ------------------------------------------------------------------ on a partitioned Kafka log
//
// The API in-process on a real Apache Kafka log with 4 events partitions and 2 logs
// partitions (a build's chunks and its line events in different partitions, so they reach a
// reader in no fixed relative order), with a builds projector; the test appends the builds'
// events itself, in the orders it wants to show. The broker comes from
// `scripts/setup-brokers.sh` (127.0.0.1:19092); `TRIBUTARY_TEST_KAFKA` names another.

use std::sync::Arc;

use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::{EventLog, Topic};
use tributary_proto::events::{
    envelope::Payload, BuildQueued, BuildTriggered, Envelope, JobPlan, JobStarted, LineExited,
    LineStarted, LogChunk, Plan, ProjectCreated, StepPlan, StepStarted,
};

/// The API and a builds projector on fresh Kafka topics (deleted by `stop`).
struct KafkaUi {
    kafka: Arc<KafkaLog>,
    log: Arc<dyn EventLog>,
    store: tributary_projections::BuildsStore,
    addr: String,
    token: String,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl KafkaUi {
    async fn start() -> KafkaUi {
        let options = tributary_testkit::kafka_options("webui", 4, 2);
        let kafka = Arc::new(KafkaLog::connect(options).await.expect("connect to Kafka"));
        let log: Arc<dyn EventLog> = kafka.clone();
        let (token, sha256) = tributary_api::auth::new_token();
        let mut setup = tributary_testkit::tenant_with_admin_token("default", sha256);
        setup.push(Envelope::new(
            "default",
            "",
            "",
            Payload::ProjectCreated(ProjectCreated {
                tenant: "default".into(),
                name: "web".into(),
                repository: "/nowhere".into(),
                ..ProjectCreated::default()
            }),
        ));
        log.append(&setup).await.expect("append the tenant");
        let dir = tempfile::tempdir().expect("temp dir");
        let store = tributary_projections::BuildsStore::open(&dir.path().join("readmodels.db"))
            .await
            .expect("builds store");
        let projector = {
            let (log, store) = (log.clone(), store.clone());
            tokio::spawn(async move {
                let mut p = tributary_projections::BuildsProjector::open(store)
                    .await
                    .expect("projector");
                if let Err(e) = p.follow(log.as_ref()).await {
                    eprintln!("projector stopped: {e}");
                }
            })
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let (addr, api) = common::serve_api(log.clone(), store.clone(), dir.path(), &stop).await;
        KafkaUi {
            kafka,
            log,
            store,
            addr,
            token,
            stop,
            tasks: vec![projector, api],
            _dir: dir,
        }
    }

    /// Appends a build of project `web` with `jobs` (each one step `s` of `lines` lines
    /// `echo <job><n>`), as the API's trigger does; returns its id once the read model has it.
    async fn build(&self, jobs: &[&str], lines: u32) -> String {
        let id = tributary_proto::new_id();
        let logs = self.log.layout().partition_for(Topic::Logs, &id);
        let ends = self.log.end_offsets().await.expect("ends");
        let plan = Plan {
            jobs: jobs
                .iter()
                .map(|j| JobPlan {
                    id: (*j).into(),
                    name: (*j).into(),
                    steps: vec![StepPlan {
                        name: "s".into(),
                        lines: (0..lines).map(|n| format!("echo {j}{n}")).collect(),
                    }],
                    ..JobPlan::default()
                })
                .collect(),
        };
        self.append(vec![
            ev(
                &id,
                Payload::BuildTriggered(BuildTriggered {
                    who: "admin".into(),
                    logs_from: ends[logs as usize],
                    ..BuildTriggered::default()
                }),
            ),
            ev(&id, Payload::BuildQueued(BuildQueued { plan: Some(plan) })),
        ])
        .await;
        wait_until_async(&format!("the projector to fold {id}"), WAIT, async || {
            self.store.load_build(&id).await.expect("store").is_some()
        })
        .await;
        id
    }

    async fn append(&self, events: Vec<Envelope>) {
        self.log.append(&events).await.expect("append");
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.abort();
        }
        self.kafka
            .delete_topics()
            .await
            .expect("delete the test topics");
    }
}

fn ev(build: &str, payload: Payload) -> Envelope {
    Envelope::new("default", "web", build, payload)
}

fn job_started(build: &str, job: &str) -> Vec<Envelope> {
    vec![
        ev(
            build,
            Payload::JobStarted(JobStarted {
                job: job.into(),
                attempt: 1,
                ..JobStarted::default()
            }),
        ),
        ev(
            build,
            Payload::StepStarted(StepStarted {
                job: job.into(),
                attempt: 1,
                step: 0,
                name: "s".into(),
            }),
        ),
    ]
}

fn line_started(build: &str, job: &str, line: u32) -> Envelope {
    ev(
        build,
        Payload::LineStarted(LineStarted {
            job: job.into(),
            attempt: 1,
            step: 0,
            line,
            text: format!("echo {job}{line}"),
        }),
    )
}

fn line_exited(build: &str, job: &str, line: u32) -> Envelope {
    ev(
        build,
        Payload::LineExited(LineExited {
            job: job.into(),
            attempt: 1,
            step: 0,
            line,
            exit_code: 0,
            duration_us: 1000,
        }),
    )
}

/// Output `text` of `job`'s line `line` (stream 1 stdout, 3 system).
fn output(build: &str, job: &str, line: u32, stream: i32, text: &str) -> Envelope {
    ev(
        build,
        Payload::LogChunk(LogChunk {
            job: job.into(),
            attempt: 1,
            step: 0,
            line,
            stream,
            data: text.as_bytes().to_vec(),
            ..LogChunk::default()
        }),
    )
}

/// Each section of `job`'s log in page order: its `data-line` (attempt-step-line), its
/// command, and its output lines.
async fn sections(b: &Browser, job: &str) -> Vec<(String, String, Vec<String>)> {
    let value = b
        .c()
        .execute(
            "var out = [];
             document.querySelectorAll('details.joblog[data-job=\"' + arguments[0] + '\"] .seg')
               .forEach(function (s) {
                 var c = s.querySelector('.cmd .c');
                 out.push([s.getAttribute('data-line'), c ? c.textContent : '',
                           Array.from(s.querySelectorAll('.ln .t')).map(function (t) { return t.textContent; })]);
               });
             return out;",
            vec![serde_json::json!(job)],
        )
        .await
        .expect("read the log sections");
    serde_json::from_value(value).expect("sections")
}

/// `job`'s sections as they must be once lines 0..3 ran and printed `<job>-out-<n>`.
/// Waits until job `job`'s output sections on the page are `want`.
async fn sections_become(b: &Browser, job: &str, want: &[(String, String, Vec<String>)]) {
    b.until(
        &format!("job {job}'s output under its own lines"),
        || async { (sections(b, job).await == want).then_some(()) },
    )
    .await;
}

fn expected_sections(job: &str, preamble: bool) -> Vec<(String, String, Vec<String>)> {
    let mut want = Vec::new();
    if preamble {
        want.push(("1--1-0".into(), String::new(), vec!["recreate me".into()]));
    }
    want.push(("1-0--1".into(), String::new(), vec![]));
    for n in 0..3 {
        want.push((
            format!("1-0-{n}"),
            format!("$ echo {job}{n}"),
            vec![format!("{job}-out-{n}")],
        ));
    }
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_placed_by_its_line_on_a_partitioned_log() {
    tributary_testkit::require!(Kafka, Browser);
    let ui = KafkaUi::start().await;
    let b = Browser::start().await;
    let build = ui.build(&["a", "b"], 3).await;
    // Job a ran before anyone looked: its line events, then its output. A replay reads the
    // build's events partition before its logs partition, so the page gets every command of
    // a before any of its output.
    let mut events = job_started(&build, "a");
    for n in 0..3 {
        events.push(line_started(&build, "a", n));
        events.push(line_exited(&build, "a", n));
    }
    ui.append(events).await;
    let mut chunks = vec![output(&build, "a", 0, 3, "recreate me\n")];
    chunks.extend((0..3).map(|n| output(&build, "a", n, 1, &format!("a-out-{n}\n"))));
    ui.append(chunks).await;

    b.sign_in(&format!("{}/ui/builds/{build}", ui.addr), &ui.token)
        .await;
    let want_a = expected_sections("a", true);
    sections_become(&b, "a", &want_a).await;

    // Job b runs while the page is open: output of lines 0 and 1 reaches the log before their
    // commands do, then line 2's command before its output, with a's late output in between.
    ui.append(job_started(&build, "b")).await;
    ui.append(vec![
        output(&build, "b", 0, 1, "b-out-0\n"),
        output(&build, "b", 1, 1, "b-out-"),
    ])
    .await;
    ui.append(vec![
        line_started(&build, "b", 0),
        line_exited(&build, "b", 0),
        line_started(&build, "b", 1),
    ])
    .await;
    ui.append(vec![output(&build, "b", 1, 1, "1\n")]).await;
    ui.append(vec![
        line_exited(&build, "b", 1),
        line_started(&build, "b", 2),
    ])
    .await;
    ui.append(vec![output(&build, "b", 2, 1, "b-out-2\n")])
        .await;
    ui.append(vec![line_exited(&build, "b", 2)]).await;
    let want_b = expected_sections("b", false);
    sections_become(&b, "b", &want_b).await;
    assert_eq!(sections(&b, "a").await, want_a, "job a is unchanged");
    // Every command finished with its exit code (line 2's LineExited is appended after its
    // output, so the page may show the output first), and lines are numbered in order.
    b.until("an exit code on each of the 6 commands", || async {
        (b.count(".log .cmd .res.ok").await == 6).then_some(())
    })
    .await;
    let numbers = b
        .log_js(
            "return Array.from(document.querySelectorAll('details.joblog[data-job=\"b\"] .ln .n'))
               .map(function (n) { return n.textContent; });",
        )
        .await;
    assert_eq!(numbers, serde_json::json!(["1", "2", "3"]));
    b.close().await;
    ui.stop().await;
}

/// The `changed` events of a live stream's reply: their SSE ids.
fn changed_ids(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| e.lines().any(|l| l == "event: changed"))
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("id: ").or_else(|| l.strip_prefix("id:")))
                .map(|id| id.trim().to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_project_stream_resumes_per_partition_with_no_gap_and_no_duplicate() {
    tributary_testkit::require!(Kafka, Browser);
    let ui = KafkaUi::start().await;
    let http = Http::new(&ui.addr);
    let token = ui.token.clone();
    // The page says where its live stream starts: every events partition's position.
    let page = http.get("/ui/projects/web", Some(&token)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let live = page
        .body
        .split("data-live=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the table's live stream")
        .replace("&amp;", "&");
    let from = live.split("from=").nth(1).expect("a start position");
    assert_eq!(
        from.split('.').count(),
        4,
        "a position per events partition: {live}"
    );

    // A build triggered after the page was rendered but before its stream connected is not
    // missed (no gap).
    ui.build(&["a"], 1).await;
    let first = http.get(&live, Some(&token)).await;
    let ids = changed_ids(&first.body);
    assert!(
        !ids.is_empty(),
        "the stream reports the build: {}",
        first.body
    );
    let last = ids.last().expect("an id").clone();
    assert_eq!(
        last.split('.').count(),
        4,
        "a resume token per partition: {last}"
    );

    // A browser reconnecting after that id gets nothing it had (no duplicate)...
    let again = http
        .send("GET", &live, Some(&token), &[("last-event-id", &last)], "")
        .await;
    assert_eq!(
        changed_ids(&again.body),
        Vec::<String>::new(),
        "{}",
        again.body
    );
    // ...and what came after it, wherever its partition (no gap).
    for _ in 0..3 {
        ui.build(&["a"], 1).await;
    }
    let later = http
        .send("GET", &live, Some(&token), &[("last-event-id", &last)], "")
        .await;
    let ids = changed_ids(&later.body);
    assert!(!ids.is_empty(), "the later builds: {}", later.body);
    let resumed = ids.last().expect("an id");
    let before: Vec<u64> = last.split('.').map(|o| o.parse().unwrap()).collect();
    let after: Vec<u64> = resumed.split('.').map(|o| o.parse().unwrap()).collect();
    let ends = ui.log.end_offsets().await.expect("ends");
    assert_eq!(
        after,
        ends[..4].to_vec(),
        "the stream reached every partition's end"
    );
    assert!(after.iter().zip(&before).all(|(a, b)| a >= b));
    // The table's rows, read once the read model has what that id covers: all four builds.
    let rows = http
        .get(
            &format!("/ui/projects/web/rows?after={resumed}"),
            Some(&token),
        )
        .await;
    assert_eq!(rows.status, 200, "{}", rows.body);
    assert_eq!(rows.body.matches("data-build=").count(), 4, "{}", rows.body);

    // In a browser: the table follows new builds, whichever partition they are in.
    let b = Browser::start().await;
    b.sign_in(&format!("{}/ui/projects/web", ui.addr), &token)
        .await;
    b.until("the table with the four builds", || async {
        (b.count("tr[data-build]").await == 4).then_some(())
    })
    .await;
    let mut new = Vec::new();
    for _ in 0..4 {
        new.push(ui.build(&["a"], 1).await);
    }
    for id in &new {
        b.until(&format!("build {id} in the table"), || async {
            (b.count(&format!("tr[data-build='{id}']")).await == 1).then_some(())
        })
        .await;
    }
    assert_eq!(b.count("tr[data-build]").await, 8);
    b.close().await;
    ui.stop().await;
}

/// The events of a live stream's reply: (id, event, data), in order.
fn sse_events(body: &str) -> Vec<(String, String, String)> {
    body.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| {
                block.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|rest| rest.strip_prefix(':'))
                        .map(|v| v.trim_start().to_owned())
                })
            };
            Some((
                field("id")?,
                field("event")?,
                field("data").unwrap_or_default(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_stream_resumes_after_any_event_with_no_gap_and_no_duplicate() {
    tributary_testkit::require!(Kafka);
    let ui = KafkaUi::start().await;
    let http = Http::new(&ui.addr);
    let build = ui.build(&["a"], 3).await;
    let mut events = job_started(&build, "a");
    for n in 0..3 {
        events.push(line_started(&build, "a", n));
        events.push(line_exited(&build, "a", n));
    }
    ui.append(events).await;
    ui.append(
        (0..3)
            .flat_map(|n| (0..4).map(move |k| (n, k)))
            .map(|(n, k)| output(&build, "a", n, 1, &format!("a-out-{n}-{k}\n")))
            .collect(),
    )
    .await;
    ui.append(vec![ev(
        &build,
        Payload::BuildFinished(tributary_proto::events::BuildFinished {
            status: tributary_proto::events::Status::Succeeded as i32,
            ..Default::default()
        }),
    )])
    .await;
    let path = format!("/ui/builds/{build}/events");
    let whole = sse_events(&http.get(&path, Some(&ui.token)).await.body);
    assert_eq!(
        whole.iter().filter(|e| e.1 == "log").count(),
        12,
        "every chunk once: {whole:?}"
    );
    assert_eq!(whole.last().map(|e| e.1.as_str()), Some("end"));
    // Ids are positions in the build's two partitions.
    assert!(
        whole.iter().all(|e| e.0.split('.').count() == 2),
        "{whole:?}"
    );
    // Resuming after any event gives exactly the events after it.
    for k in [0, 3, whole.len() / 2, whole.len() - 3, whole.len() - 2] {
        let resumed = http
            .send(
                "GET",
                &path,
                Some(&ui.token),
                &[("last-event-id", &whole[k].0)],
                "",
            )
            .await;
        let mut got: Vec<(String, String)> = sse_events(&resumed.body)
            .into_iter()
            .map(|e| (e.1, e.2))
            .collect();
        let mut want: Vec<(String, String)> = whole[k + 1..]
            .iter()
            .map(|e| (e.1.clone(), e.2.clone()))
            .collect();
        assert_eq!(
            got.last(),
            want.last(),
            "the resumed stream ends with the build"
        );
        got.sort();
        want.sort();
        assert_eq!(got, want, "resumed after event {k} ({})", whole[k].0);
    }
    ui.stop().await;
}
