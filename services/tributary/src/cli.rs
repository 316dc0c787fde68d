//! The command line: every subcommand, its flags and its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Tributary: an event-sourced CI. Every action is an event on a log; everything you see is a
/// projection of that log.
#[derive(Debug, Parser)]
#[command(name = "tributary", version, propagate_version = true)]
#[command(after_help = "Examples:\n  \
    tributary run                       run ./.tributary.yml here, with live output\n  \
    tributary run -f ci.yml --parallel 4\n  \
    tributary events --build <ID> --json   every event of a build, one JSON object per line\n  \
    tributary builds                    the builds read model as a table\n  \
    tributary replay --check            rebuild the read models from the log and compare\n\n\
    Logging: set TRIBUTARY_LOG (e.g. TRIBUTARY_LOG=debug) for diagnostics on stderr.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline locally, exactly as the server would, with live per-job output.
    ///
    /// Jobs run on this machine with `sh`, in the directory holding the pipeline file. Every
    /// action is recorded on the embedded event log in the data directory, so `tributary
    /// events` and `tributary builds` show the run afterwards.
    ///
    /// Exit status: 0 if the build succeeded, 1 if it failed or was canceled (Ctrl-C), 2 if
    /// the pipeline is invalid.
    Run(RunArgs),
    /// Print the event log in order.
    Events(EventsArgs),
    /// Show the builds read model as a table.
    Builds(BuildsArgs),
    /// Rebuild every read model from offset 0 of the log: the builds (readmodels.db) and
    /// metering (metering.db: usage, job attempts, issued invoices).
    ///
    /// Stop `tributary up` first (it folds into the same files). With --check, nothing is
    /// written: each rebuilt state is compared with the stored one and the first difference of
    /// each is reported (exit status 1). `tributary audit` does the same in one pass and also
    /// names the offset where a divergence starts.
    Replay(ReplayArgs),
    /// Start the server on the embedded default: API, scheduler, projector and in-process
    /// agents in one process, with the log and read models in --data. Remote agents
    /// (`tributary agent`) can join it too.
    ///
    /// On first start it creates the admin token in DIR/admin.token (mode 0600). Projects are
    /// git repositories (URL or local path); builds read `.tributary.yml` at the commit.
    ///
    /// The web UI is on the same address: open http://ADDR/ and sign in with an API token
    /// (builds, live logs, cancel, re-run failed jobs, agents). Behind a TLS proxy, have it set
    /// `X-Forwarded-Proto: https` so the session cookie is marked Secure.
    Up(UpArgs),
    /// Add or list projects on a server.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Trigger a build of a project on a server; prints the build id.
    Trigger(TriggerArgs),
    /// Print a build's log (with -f, follow it live until the build ends).
    Logs(LogsArgs),
    /// Show one build from a server: jobs, steps, lines and exit codes. With --at, the build
    /// as it stood at that moment of its history (folded from its events by the projector's
    /// fold, so exact).
    Get(GetBuildArgs),
    /// Explain a build's jobs from the log: each decision about a job (queued, waiting and
    /// why, assigned to an agent, requeued, retried, canceled, reused, skipped) with its
    /// reason, time and the time since the previous one.
    Why(WhyArgs),
    /// Cancel a build on a server.
    Cancel(GetArgs),
    /// Re-run the failed jobs of a finished build: a new build of the same commit where jobs
    /// that succeeded keep their result and are not run again. Prints the new build id.
    Rerun(GetArgs),
    /// Follow the server's events live (your tenant's), from an offset.
    Watch(WatchArgs),
    /// A build's artifacts on a server: list them, or download one (its sha256 is checked
    /// before the file appears).
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// A project's secrets: set (value from standard input), list (names and when they were
    /// set, never values), delete.
    ///
    /// A job gets the secrets it names in the pipeline (`secrets: [DEPLOY_TOKEN]`) as
    /// environment variables, and every occurrence of a value in its log (and failure reason)
    /// is replaced by `***`. Values are sealed with the server's key: the log never holds one.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Admin: list agents (connected, labels, running jobs) or revoke one.
    Agents(AgentsArgs),
    /// Admin: create a tenant, or a token for one.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Run an agent: take jobs from a server and run them on this machine.
    ///
    /// The first start registers the agent with an enrollment token (--token; `tributary admin
    /// token-create --kind enrollment`); its identity is then kept in WORKDIR/agent.json (mode
    /// 0600) and later starts need no token. Jobs run in WORKDIR/work/<build>/<job>-<attempt>,
    /// checked out from mirrors in WORKDIR/mirrors. The agent only dials out, and reconnects by
    /// itself when the server goes away.
    ///
    /// SIGINT/SIGTERM drains: no new jobs (heartbeats tell the server), the running ones
    /// finish and report, then exit 0. A second signal cancels the running jobs and exits at
    /// once (status 130).
    Agent(AgentArgs),
    /// Run one of the server's services in its own process, on a `tributary up` data directory.
    #[command(subcommand)]
    Serve(ServeCommand),
    /// Show a tenant's invoice for a month: the issued one once the month is closed, else the
    /// live one (the month so far).
    ///
    /// With a server (--server or TRIBUTARY_SERVER) it asks the server (a user token sees its
    /// own tenant only; the admin token may name any). Without one it reads the local data
    /// directory (--data).
    ///
    /// Each job attempt's time in the month is rounded up on its own (default: to the
    /// minute); the month's free minutes are used first; late usage of an already issued month
    /// appears as an `adjustment` line on the next invoice.
    Invoice(InvoiceArgs),
    /// Replay the whole log into fresh read models (builds and metering) and compare them
    /// with the stored ones and with every issued invoice.
    ///
    /// Reports the first divergence with the offset of the event where it starts (and its
    /// partition on a partitioned log). Exit status: 0 when everything matches, 1 on any
    /// difference. With --kafka and --database it replays every events partition up to the
    /// offsets the stored read models reached and compares them with the live tables.
    Audit(AuditArgs),
    /// Write a starter .tributary.yml for the repository here, from what it finds.
    ///
    /// Cargo.toml → cargo build/test; package.json → npm ci (or install), build and test when
    /// its scripts have them; go.mod → go vet/test; pyproject.toml or requirements.txt →
    /// pytest; Makefile → make (and make test). The pipeline is checked by the same parser as
    /// `tributary run` before it is written; an existing file is never overwritten.
    Init(InitArgs),
    /// Print a shell completion script for bash, zsh or fish.
    ///
    /// bash: `tributary completions bash > /etc/bash_completion.d/tributary`;
    /// zsh: `tributary completions zsh > "${fpath[1]}/_tributary"`;
    /// fish: `tributary completions fish > ~/.config/fish/completions/tributary.fish`.
    Completions(CompletionsArgs),
    /// Measure performance: `bench log`, `bench run`, `bench server`, `bench autoscale`,
    /// `bench metering`, `bench exec`, `bench ui`.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub struct ServeMeteringArgs {
    #[command(flatten)]
    pub backends: crate::backends::BackendArgs,
    #[command(flatten)]
    pub metering: MeteringArgs,
    #[command(flatten)]
    pub health: crate::health::HealthArgs,
}

#[derive(Debug, Args)]
pub struct InvoiceArgs {
    /// Tenant (default: the token's own tenant with a server; `local` without one, the tenant
    /// of `tributary run`).
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// The month, YYYY-MM (default: the current month, UTC).
    #[arg(long, value_name = "YYYY-MM")]
    pub period: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = InvoiceFormat::Table)]
    pub format: InvoiceFormat,
    /// Print the built-in price plan (a starting point for --price-plan) and exit.
    #[arg(long)]
    pub print_default_plan: bool,
    /// Ask this server (also TRIBUTARY_SERVER); without it, read the local data directory.
    #[arg(long, value_name = "URL", env = "TRIBUTARY_SERVER")]
    pub server: Option<String>,
    /// API token for --server.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TRIBUTARY_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Price plan for a live invoice read locally (a server uses its own).
    #[arg(long, value_name = "FILE", env = "TRIBUTARY_PRICE_PLAN")]
    pub price_plan: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InvoiceFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub backends: crate::backends::BackendArgs,
    /// Only compare this tenant's builds, usage and invoices (the whole log is replayed).
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The pipeline file to write (its directory is the one looked at).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        default_value = ".tributary.yml"
    )]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish (also elvish, powershell).
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct DataArgs {
    /// Directory holding the event log and read models [default: this repository's directory
    /// under $XDG_STATE_HOME/tributary or ~/.local/state/tributary, outside the repository so
    /// jobs never see it].
    #[arg(long = "data", value_name = "DIR", env = "TRIBUTARY_DATA")]
    pub given: Option<PathBuf>,
}

impl DataArgs {
    /// The data directory: --data / TRIBUTARY_DATA, else [`crate::data_dir::default_dir`].
    pub fn dir(&self) -> PathBuf {
        self.given
            .clone()
            .unwrap_or_else(crate::data_dir::default_dir)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline file to run.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        default_value = ".tributary.yml"
    )]
    pub file: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// How many jobs may run at the same time.
    #[arg(long, value_name = "N", default_value_t = default_parallel())]
    pub parallel: usize,
    /// Print plain lines even on a terminal (no progress spinners).
    #[arg(long)]
    pub plain: bool,
    /// Run only this job: an instance id (`test[os=linux]`) or a job name (all its matrix
    /// instances). Its `needs` are taken as done. Every job log starts with the command that
    /// recreates that job this way.
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,
    /// Machine class the run's jobs report in UsageTick events, as an agent does (so
    /// `tributary invoice` and `tributary audit` work on the data directory; tenant `local`).
    /// Default: this host's `<os>-<cpus>cpu-<memory>gb`. An empty value reports no usage.
    #[arg(long, value_name = "CLASS")]
    pub machine_class: Option<String>,
    /// Seconds between two UsageTick events of a running job (a last, partial tick is always
    /// appended when the job ends).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub usage_interval: f64,
    #[command(flatten)]
    pub containers: ContainerArgs,
    /// Size limit of this project's caches in the data directory (`cache:` in the pipeline),
    /// e.g. 512m, 10g; 0 = no limit: least recently used caches are deleted beyond it.
    #[arg(long, value_name = "SIZE", default_value = "10g", value_parser = parse_size)]
    pub cache_limit: u64,
}

/// A duration flag (`--keep-failed-for` …) in the pipeline's syntax
/// ([`tributary_pipeline::duration`]): `3600`, `24h`, `1h30m`, `90s`, `0`; surrounding spaces
/// are ignored.
fn parse_keep(text: &str) -> Result<std::time::Duration, String> {
    parse_duration(text).map(std::time::Duration::from_secs)
}

/// Seconds in a duration flag's text, or the message clap shows.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    use tributary_pipeline::duration::{self, DurationError};
    duration::parse_duration(text.trim()).map_err(|e| match e {
        DurationError::Invalid => {
            format!("{text:?} is not a duration; write e.g. 24h, 30m, 1h30m, 90s or 0")
        }
        DurationError::TooLarge => format!("{text:?} is too large a duration; give a shorter one"),
    })
}

/// Container jobs (`image:` in the pipeline): the engine and the limits of every container.
#[derive(Debug, Args, Clone)]
pub struct ContainerArgs {
    /// Docker Engine API of the container engine that runs `image:` jobs: `unix:///path` or
    /// `tcp://host:port` (Docker, or Podman's compatible socket; `scripts/setup-containers.sh`
    /// starts Podman's at unix:///run/podman/podman.sock). `tributary run` uses DOCKER_HOST or
    /// that socket when a job has an image; agents run container jobs only with --engine.
    #[arg(long, value_name = "ADDR", env = "TRIBUTARY_ENGINE")]
    pub engine: Option<String>,
    /// CPUs each job container may use (fractions allowed; 0 = no limit).
    #[arg(long, value_name = "N", default_value_t = 2.0)]
    pub cpus: f64,
    /// Memory each job container may use, e.g. 512m, 4g (no swap on top; 0 = no limit).
    #[arg(long, value_name = "SIZE", default_value = "4g", value_parser = parse_size)]
    pub memory: u64,
    /// Processes and threads each job container may run (0 = no limit).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub pids_limit: u32,
    /// Images built from the repository (`image: {build: ...}`) kept on the engine per
    /// project: after a build, images of the project beyond the newest N keys are removed
    /// (each an `image_pruned` event; 0 = keep all).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub image_keep: u32,
}

/// A size in bytes: a number with an optional k, m, g or t suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (digits, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{text:?} is not a size; write e.g. 512m, 4g or a number of bytes"))
}

fn default_parallel() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Only the events of this build.
    #[arg(long, value_name = "ID")]
    pub build: Option<String>,
    /// One JSON object per line: offset, type, build_id and the payload's fields.
    #[arg(long)]
    pub json: bool,
    /// Start at this offset.
    #[arg(long, value_name = "OFFSET", default_value_t = 0)]
    pub from: u64,
}

#[derive(Debug, Args)]
pub struct BuildsArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// List from this server instead of the local data directory (also TRIBUTARY_SERVER).
    #[arg(long, value_name = "URL", env = "TRIBUTARY_SERVER")]
    pub server: Option<String>,
    /// API token for --server.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TRIBUTARY_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Only this project's builds (with --server).
    #[arg(long, value_name = "P")]
    pub project: Option<String>,
    /// Only builds with this status (with --server): running, failed, succeeded, ...
    #[arg(long, value_name = "S")]
    pub status: Option<String>,
    /// Show at most this many builds, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Print the builds (with jobs, steps and lines) as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    tributary replay --check                         the embedded data directory (.tributary)\n  \
    tributary replay --kafka 127.0.0.1:19092 --database postgres://u:p@db/tributary --check\n  \
    tributary replay --config /etc/tributary.toml    rebuild (stop the projectors first)")]
pub struct ReplayArgs {
    #[command(flatten)]
    pub backends: crate::backends::BackendArgs,
    /// Compare instead of rebuilding: replays every events partition up to the offset the read
    /// model stored for it and reports the first difference; exit status 1 on any difference.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct ServeProjectorArgs {
    #[command(flatten)]
    pub backends: crate::backends::BackendArgs,
    #[command(flatten)]
    pub health: crate::health::HealthArgs,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Append events in batches, then read them all back; prints events/s.
    ///
    /// By default on the embedded SQLite log in a temporary directory. With --kafka, on Apache
    /// Kafka through rdkafka: fresh topics `bench-<id>.events` and `bench-<id>.logs` (deleted
    /// afterwards), appends through the idempotent producer (acks=all), reads through one
    /// consumer assigned to every partition.
    Log {
        /// Number of events to append.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Events per append call.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Where to put the benchmark's log (a temporary directory by default).
        #[arg(long, value_name = "DIR", conflicts_with = "kafka")]
        data: Option<PathBuf>,
        /// Benchmark the Kafka backend on these brokers (host:port[,host:port...]), e.g. the
        /// one scripts/setup-brokers.sh starts: --kafka 127.0.0.1:19092.
        #[arg(long, value_name = "BROKERS")]
        kafka: Option<String>,
        /// With --kafka: partitions of each topic (events and logs).
        #[arg(long, default_value_t = 6, requires = "kafka")]
        partitions: u32,
    },
    /// Run a pipeline of N trivial jobs; prints the overhead per job over a bare `sh -c true`.
    Run {
        /// Number of jobs in the pipeline.
        #[arg(long, default_value_t = 200)]
        jobs: usize,
        /// Jobs running at once (1 measures pure per-job overhead).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
    },
    /// Replay a day of job arrivals through the autoscaler's policy with simulated time, and
    /// through a fixed pool of the policy's peak size and a fixed pool of one agent per kind;
    /// prints each one's cost and p50/p95 queue wait.
    ///
    /// The trace is CSV: `arrival_secs,duration_secs,job,labels` (labels separated by ';').
    /// services/autoscaler/traces/day.csv is a synthetic working day (daily curve, release
    /// bursts); --generate FILE writes another one. The pool is --config (the format of `serve
    /// autoscaler`), by default services/autoscaler/traces/bench-pool.toml.
    Autoscale {
        /// The trace to replay.
        #[arg(long, value_name = "FILE", required_unless_present = "generate")]
        trace: Option<PathBuf>,
        /// The autoscaler configuration (kinds, prices, billing, grace period, budget).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Write a synthetic day of arrivals to FILE instead of replaying.
        #[arg(long, value_name = "FILE", conflicts_with = "trace")]
        generate: Option<PathBuf>,
        /// Seed of --generate (the same seed gives the same day).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Artifact throughput, then container overhead. First: upload and download MB/s (sha256
    /// taken on upload, checked on download) of one 64 MiB file and of 1000 files of 4 KiB
    /// through a local object store. Then: a one-line job run N times on the host and N times
    /// in a container (alternating); prints start -> first line and whole-job times
    /// (p50/p90/max) of both and the difference. Needs a container engine
    /// (`scripts/setup-containers.sh`).
    Exec {
        /// Runs of each kind.
        #[arg(long, value_name = "N", default_value_t = 20)]
        runs: usize,
        /// Image of the container runs (must be on the engine).
        #[arg(long, value_name = "IMAGE", default_value = "localhost/ci-busybox")]
        image: String,
        /// The engine's Docker API (default: DOCKER_HOST, else unix:///run/podman/podman.sock).
        #[arg(long, value_name = "ADDR")]
        engine: Option<String>,
    },
    /// Trigger many one-job builds on a server; prints trigger -> first line and trigger ->
    /// finished latencies (p50/p99), sustained builds/s, log tail latency and the server's RSS.
    ///
    /// Two parts: first --latency-builds builds one at a time (the latency of a build on an idle
    /// server, split into its steps), then --builds builds from --concurrency triggerers, as
    /// fast as the server takes them (builds/s, and the latencies at that load).
    ///
    /// Without --server it starts `tributary up` (this executable) on a temporary data
    /// directory and a free port, and stops it at the end. It creates a throwaway git
    /// repository and project (`bench-...`) for the run. With --server the project stays on
    /// that server, which must be able to read a local path of this machine; the tail latency
    /// then also includes the offset between this machine's clock and the agent's.
    Server {
        /// Builds to trigger.
        #[arg(long, value_name = "N", default_value_t = 200)]
        builds: usize,
        /// Triggerers sending TriggerBuild at the same time.
        #[arg(long, value_name = "C", default_value_t = 8)]
        concurrency: usize,
        /// In-process agents of the server started here.
        #[arg(long, value_name = "A", default_value_t = 2, conflicts_with = "server")]
        agents: usize,
        /// Jobs each of those agents runs at once.
        #[arg(long, value_name = "K", default_value_t = 4, conflicts_with = "server")]
        agent_capacity: usize,
        /// Measure this running server instead of starting one.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// Admin token for --server (default: TRIBUTARY_TOKEN).
        #[arg(long, value_name = "TOKEN", requires = "server")]
        token: Option<String>,
        /// Trigger each build by branch (`main`: the server fetches to resolve it) instead of
        /// at the branch's commit (as a push webhook does, which carries the commit).
        #[arg(long)]
        by_branch: bool,
        /// Under load, at most this many builds triggered and not finished (a triggerer waits
        /// for a slot): the latencies at a bounded load. By default the triggerers send as fast
        /// as the server takes the calls, which keeps it near saturation, and the latencies
        /// under load are mostly queueing.
        #[arg(long, value_name = "B")]
        in_flight: Option<usize>,
        /// Builds triggered one at a time (each after the previous one finished) before the
        /// load: their trigger -> first line is the latency on an idle server, the figure the
        /// latency target is about. At most --builds; 0 skips this part.
        #[arg(long, value_name = "N", default_value_t = 200)]
        latency_builds: usize,
    },
    /// What a long history costs the embedded server: RSS and restart-to-ready time after
    /// N finished builds.
    ///
    /// A real one-job build on a `tributary up` started here is the template; copies of its
    /// events (fresh ids) are appended to the stopped server's log until it holds each count of
    /// --builds, and the server is restarted and measured each time: time to the first answered
    /// call, time until the newest build is in the read model, RSS, and RSS after --live real
    /// builds. Targets: RSS <= 2 x a fresh server's, ready <= 1 s, flat in the history.
    History {
        /// Finished builds in the log at each measurement (comma-separated, ascending).
        #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_values_t = [1000u64, 10000, 50000])]
        builds: Vec<u64>,
        /// Real builds run after each restart.
        #[arg(long, value_name = "N", default_value_t = 20)]
        live: usize,
    },
    /// Generate a synthetic log of usage ticks over many tenants, then print ticks/s through
    /// the metering projection (into SQLite) and the time `audit` takes to replay it.
    Metering {
        /// Usage ticks in the log.
        #[arg(long, default_value_t = 2_000_000)]
        ticks: u64,
        /// Tenants the ticks are spread over.
        #[arg(long, default_value_t = 1000)]
        tenants: u64,
        /// Ticks per job attempt (a 10 s tick interval: 60 = a 10-minute job).
        #[arg(long, default_value_t = 60)]
        ticks_per_job: u64,
        /// Where to put the benchmark's log (a temporary directory by default).
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
    },
    /// Open many live log viewers of the web UI on one build; prints log line -> viewer
    /// latency (p50/p99) and the server's memory with them connected.
    ///
    /// Starts `tributary up` (this executable) on a temporary data directory and a free port,
    /// triggers one build that waits until every viewer is connected to its Server-Sent
    /// Events stream (`/ui/builds/<id>/events`, the one the build page reads), then prints
    /// L lines, each the wall-clock time in µs when it was printed. Latency = time a viewer
    /// parsed the line − printed time, over every line and viewer.
    Ui {
        /// Concurrent SSE viewers (HTTP clients, not browsers).
        #[arg(long, value_name = "V", default_value_t = 200)]
        viewers: usize,
        /// Lines the build prints.
        #[arg(long, value_name = "L", default_value_t = 200)]
        lines: usize,
        /// Pause between two lines, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 20)]
        interval_ms: u64,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub repos: crate::repo_access::RepoAccessArgs,
    /// Address the gRPC API listens on.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7700",
        env = "TRIBUTARY_LISTEN"
    )]
    pub listen: String,
    /// In-process agents.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub agents: usize,
    /// Jobs each in-process agent runs at once.
    #[arg(long, value_name = "C", default_value_t = 2)]
    pub agent_capacity: usize,
    /// Seconds without a heartbeat after which an agent is lost and its jobs are requeued.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub lease_ttl: f64,
    /// Size a pool of agents from the queue with this autoscaler configuration (see `tributary
    /// serve autoscaler --help`); its agents enroll with the admin token.
    #[arg(long, value_name = "FILE")]
    pub autoscaler: Option<PathBuf>,
    /// Who starts and stops the autoscaler's agents: `local` processes, `command` scripts, or
    /// `kubernetes` Pods (the configuration's [kubernetes] table; the Pods' agents dial its
    /// `server`, which must reach this server from the cluster).
    #[arg(long, value_enum, default_value = "local", requires = "autoscaler")]
    pub autoscaler_provider: ProviderKind,
    /// Machine class the in-process agents report in UsageTick events. Default: this host's
    /// `<os>-<cpus>cpu-<memory>gb`, e.g. `linux-2cpu-24gb`.
    #[arg(long, value_name = "CLASS")]
    pub agent_machine_class: Option<String>,
    /// Seconds between two UsageTick events of a job on an in-process agent.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub usage_interval: f64,
    #[command(flatten)]
    pub metering: MeteringArgs,
    /// Keep the workspace of a failed or timed-out job this long (its log says where), then
    /// delete it: e.g. 24h, 30m, 0 (delete at once).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_keep)]
    pub keep_failed: std::time::Duration,
    /// The in-process agents run `image:` jobs with --engine (and these limits).
    #[command(flatten)]
    pub containers: ContainerArgs,
    /// Size limit of each project's caches (`cache:` in the pipeline), e.g. 512m, 10g; 0 = no
    /// limit. After a job saves a cache that takes its project over it, the least recently
    /// used caches are deleted (CacheEvicted on the log).
    #[arg(long, value_name = "SIZE", default_value = "10g", value_parser = parse_size)]
    pub cache_limit: u64,
    /// Object storage for artifacts and caches: `s3://BUCKET/PREFIX` (AWS_* variables
    /// configure credentials, AWS_ENDPOINT an S3-compatible server such as MinIO,
    /// AWS_ALLOW_HTTP=true a plain-HTTP one) or a directory. Default: DATA/objects. Remote
    /// agents given the same `--objects` exchange artifacts and caches there directly.
    #[arg(long, value_name = "URL", env = "TRIBUTARY_OBJECTS")]
    pub objects: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// Size the agent pool from the queue, and pay nothing when idle.
    ///
    /// Jobs waiting for agents make it acquire agents of the configured kinds (enough to drain
    /// the waiting work in about target_wait_secs, within max_agents and a hard budget per
    /// hour); agents idle for grace_secs with nothing waiting for their kind are drained (they
    /// finish what they run) and released — an agent billed by the hour only near the end of
    /// its paid hour (renewal_margin_secs). Every decision is an event on the log
    /// (agent_requested, agent_draining, agent_released, with reason and cost): `tributary
    /// events | grep agent_` is the pool's audit trail.
    ///
    /// The configuration file (TOML):
    ///
    ///   budget_per_hour = 10.0          # hard limit on the pool's summed hourly price
    ///   grace_secs = 300                # idle this long -> let go
    ///   renewal_margin_secs = 300       # hourly agents: decide this long before the hour ends
    ///   target_wait_secs = 120          # size the pool so waiting work drains in about this
    ///   default_job_secs = 300          # expected duration of a job never seen before
    ///   queue_delay_secs = 1            # a job counts as waiting after this long in the queue
    ///   startup_timeout_secs = 600      # an agent not connected by then is released
    ///   [[kind]]
    ///   name = "standard"
    ///   labels = []                     # runs-on labels it carries ([] = generic)
    ///   capacity = 2                    # jobs at once
    ///   price_per_hour = 0.20
    ///   billing = "minute"              # "second", "minute", "hour" or seconds
    ///   max_agents = 20
    ///   [command]                       # --provider command only
    ///   acquire = "./scripts/vm-create.sh"   # prints the machine id on its last line
    ///   release = "./scripts/vm-delete.sh"   # gets TRIBUTARY_MACHINE
    ///   [kubernetes]                    # --provider kubernetes only
    ///   template = "agent-pod.yaml"     # a YAML Pod running `tributary agent` (relative to this file)
    ///   namespace = "ci"                # default: the kubeconfig context's (in a Pod: its own)
    ///   kubeconfig = "/etc/tributary/kubeconfig"  # default: KUBECONFIG, ~/.kube/config, in-cluster
    ///   context = "prod"                # default: the kubeconfig's current context
    ///   server = "http://tributary.ci.svc:7700"   # what agents in Pods dial (default: --server)
    ///   termination_grace_secs = 600    # after SIGTERM, how long a released agent may drain
    ///   owner = "tributary"             # owner label; at start its Pods the log does not know are deleted
    ///
    /// Providers: `local` starts `tributary agent` processes on this machine (SIGTERM drains
    /// them); `command` runs your scripts with TRIBUTARY_REQUEST_ID (start the agent with
    /// `--name $TRIBUTARY_REQUEST_ID`), TRIBUTARY_AGENT_LABELS, TRIBUTARY_AGENT_CAPACITY,
    /// TRIBUTARY_SERVER, TRIBUTARY_ENROLLMENT_TOKEN and, for release, TRIBUTARY_MACHINE;
    /// `kubernetes` creates one Pod per agent from the template: named <owner>-<request id>,
    /// labelled tributary.dev/owner, tributary.dev/request-id and tributary.dev/agent-kind,
    /// its agent container (named `agent`, else the first) given `--name <request id>
    /// --capacity N --labels ...` after the template's args, and TRIBUTARY_SERVER and
    /// TRIBUTARY_ENROLLMENT_TOKEN unless the template sets them (reference a Secret there:
    /// valueFrom.secretKeyRef); release deletes the Pod (SIGTERM: the agent drains). At start
    /// it deletes the Pods with its owner label that the log does not know and adopts the rest.
    ///
    /// SIGINT/SIGTERM stops it; the local provider drains its agents first (Kubernetes Pods
    /// keep running and are adopted by the next start).
    ///
    /// Backends: the embedded log of a `tributary up` (--data DIR; one autoscaler per data
    /// directory), or Kafka (--kafka BROKERS, the same backend flags as every service; the
    /// backends' TOML file is --backends-config here). On Kafka, run two replicas: they join
    /// consumer group `autoscaler` and exactly one is active (the owner of events partition
    /// 0); when it dies the other catches up with the log and takes over after the session
    /// timeout (--kafka-session-timeout), never requesting an agent twice.
    #[command(verbatim_doc_comment)]
    Autoscaler(AutoscalerArgs),
    /// The builds projector: folds the log into the builds read model (--database).
    ///
    /// Run as many replicas as you like: they are members of the consumer group `projector`
    /// and split the events topic's partitions; each stores its next offset per partition in
    /// the read-model database, in the transaction of the rows, so every event takes effect
    /// once even though Kafka may deliver it again (re-deliveries are also skipped by event
    /// id). With a logs topic each replica is also a member of `projector-logs`, counting log
    /// bytes per line. When a replica dies, the others take over its partitions after the
    /// session timeout (--kafka-session-timeout); SIGTERM/SIGINT leaves the groups at once.
    ///
    /// Example: tributary serve projector --kafka 127.0.0.1:19092 \
    ///            --database postgres://tributary:tributary@127.0.0.1:5432/tributary
    #[command(verbatim_doc_comment)]
    Projector(ServeProjectorArgs),
    /// The API as its own process: gRPC, webhooks, the web UI and the agents' work streams on
    /// one port, over the backends below (run `serve projector` and `serve scheduler` beside
    /// it). Stateless: run as many replicas as you like behind one address; give each the same
    /// --admin-token-file and --server-key-file.
    Api(crate::serve::ServeApiArgs),
    /// The scheduler as its own process: queues, leases, requeues, timeouts and retries, as
    /// appended decisions. Replicas split the events partitions through Kafka consumer group
    /// `scheduler` (a rebalance hands a partition over only once its old owner stopped deciding
    /// for it); each folds every partition, since agents and leases span them all.
    Scheduler(crate::serve::ServeSchedulerArgs),
    /// The metering service: folds usage ticks into usage per tenant, project, machine class
    /// and day, and issues each tenant's invoice when a month is over.
    ///
    /// Embedded (--data DIR): the SQLite log DIR/events.db into DIR/metering.db; `tributary
    /// up` runs it too. Scale-out (--kafka, --database postgres://...): every partition of the
    /// events topic into the `metering` schema of the database (`serve api` on the same
    /// database answers invoices and usage from it), one next offset per partition stored in
    /// the transaction of the rows; re-delivered events are skipped by position and event id.
    ///
    /// Run two replicas for availability: exactly one is active (it holds a PostgreSQL
    /// advisory lock on the connection it writes through, so a replica that lost it cannot
    /// commit); the others stand by and take over when it dies. Invoices are issued once the
    /// fold has caught up with every partition; a duplicate from a dying replica is rejected
    /// by every fold.
    ///
    /// Example: tributary serve metering --kafka 127.0.0.1:19092 \
    ///            --database postgres://tributary:tributary@127.0.0.1:5432/tributary
    #[command(verbatim_doc_comment)]
    Metering(ServeMeteringArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// `tributary agent` processes on this machine.
    Local,
    /// Your scripts acquire and release machines.
    Command,
    /// Agent Pods from a template, in a Kubernetes cluster (the [kubernetes] table).
    Kubernetes,
}

#[derive(Debug, Args)]
// `--config` is the autoscaler's own file; the backends' file is `--backends-config` here.
#[command(mut_arg("config", |a| a.long("backends-config")))]
pub struct AutoscalerArgs {
    #[command(flatten)]
    pub backends: crate::backends::BackendArgs,
    /// Who starts and stops agents.
    #[arg(long, value_enum)]
    pub provider: ProviderKind,
    /// The autoscaler configuration (TOML, see above).
    #[arg(id = "autoscaler_config", long = "config", value_name = "FILE")]
    pub config: PathBuf,
    /// The server the agents join.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:7700",
        env = "TRIBUTARY_SERVER"
    )]
    pub server: String,
    /// Enrollment token the agents register with (default: the admin token in DIR/admin.token).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TRIBUTARY_ENROLLMENT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    #[command(flatten)]
    pub health: crate::health::HealthArgs,
}

#[derive(Debug, Args, Clone)]
pub struct ServerArgs {
    /// The server's address.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:7700",
        env = "TRIBUTARY_SERVER"
    )]
    pub server: String,
    /// API token (the admin token is in <data>/admin.token).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TRIBUTARY_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Add a project whose pipelines come from a git repository.
    Add {
        /// Project name: letters, digits, '-', '_', '.'.
        name: String,
        /// A git URL or the path of a local git repository.
        #[arg(long, value_name = "PATH_OR_URL")]
        repo: String,
        /// At most this many jobs of the project run at once (0 = no limit).
        #[arg(long, default_value_t = 0)]
        max_concurrent_jobs: u32,
        /// Secret for GitHub webhook signatures (POST /hooks/github/TENANT/PROJECT); taken
        /// from the environment so it stays out of the process list.
        #[arg(long, env = "TRIBUTARY_WEBHOOK_SECRET", hide_env_values = true)]
        webhook_secret: Option<String>,
        /// With the admin token: another tenant's project. Adding a project that exists
        /// replaces its repository only when the server's rules refuse the current one
        /// (docs/OPERATIONS.md: upgrading to these rules).
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List your tenant's projects.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Args)]
pub struct TriggerArgs {
    pub project: String,
    /// Branch, tag or ref to build (default: the repository's default branch).
    #[arg(long = "ref", value_name = "REF", conflicts_with = "commit")]
    pub git_ref: Option<String>,
    /// Exact commit to build.
    #[arg(long, value_name = "SHA")]
    pub commit: Option<String>,
    /// Follow the build live; exit 0 if it succeeds, 1 otherwise.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub build: String,
    /// Keep following until the build finishes.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only this job's output, as it printed it (no prefixes, steps or `$ line`s).
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,
    /// Every job's output as it printed it, interleaved, without the `[job]` prefixes, steps
    /// and `$ line`s `logs` shows by default (as `trigger --follow` does).
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct GetBuildArgs {
    #[command(flatten)]
    pub get: GetArgs,
    /// Time travel: show the build as it stood at this moment. OFFSET (a number): up to and
    /// including the event at that offset of the build's events partition (the `offset`
    /// `tributary events --json` and `watch` print; on the embedded log, the log's offset).
    /// TIME: an RFC 3339 UTC time (`2026-12-07T21:03:05Z`, fractions allowed), or `+DURATION`
    /// after the build was triggered (`+90s`, `+2m 5s`).
    #[arg(long, value_name = "TIME|OFFSET")]
    pub at: Option<String>,
}

#[derive(Debug, Args)]
pub struct WhyArgs {
    pub build: String,
    /// A job id (`test[os=linux]`) or name (every matrix instance); all jobs when left out.
    pub job: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    pub build: String,
    /// Print JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set (or replace) a secret; the value is read from standard input, so it stays out of
    /// the shell history and the process list: `printf %s "$TOKEN" | tributary secret set web
    /// DEPLOY_TOKEN`. One trailing newline is dropped (so `echo VALUE |` works too).
    ///
    /// The value must be at least 4 bytes long (shorter values would mask every short word
    /// of every log); each line of a multi-line value is masked on its own as well, lines
    /// shorter than 4 bytes excepted.
    Set {
        project: String,
        /// An environment variable name: letters, digits and `_`, not starting with a digit.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List a project's secrets: names, when and by whom they were set. Never values.
    List {
        project: String,
        /// One JSON object per secret and line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a secret: jobs that name it fail until it is set again.
    Delete {
        project: String,
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// List a build's artifacts: job, path, size and sha256.
    List {
        build: String,
        /// One JSON object per artifact and line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Download one artifact, e.g. `tributary artifacts get BUILD dist/app.tar`.
    Get {
        build: String,
        /// The artifact's path, as `list` shows it.
        path: String,
        /// The job that produced it, when several jobs have one at that path.
        #[arg(long, value_name = "JOB")]
        job: Option<String>,
        /// Where to write it (default: its file name, in the current directory; `-` for
        /// stdout).
        #[arg(short, long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Start at this log offset.
    #[arg(long, value_name = "OFFSET", default_value_t = 0)]
    pub from: u64,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a tenant.
    TenantAdd {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Create a token for a tenant; prints it once.
    TokenCreate {
        #[arg(long)]
        tenant: String,
        /// `user` (API access) or `enrollment` (registers agents).
        #[arg(long, default_value = "user")]
        kind: String,
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub repos: crate::repo_access::RepoAccessArgs,
    /// The server's address.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:7700",
        env = "TRIBUTARY_SERVER"
    )]
    pub server: String,
    /// Enrollment token, needed on the first start only (then WORKDIR/agent.json is used).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TRIBUTARY_ENROLLMENT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Name shown by the server (default: the host name); used when registering.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Labels jobs can ask for (`runs-on`), comma-separated.
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Jobs run at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub capacity: u32,
    /// Directory for the identity, mirrors and job workspaces.
    #[arg(
        long,
        value_name = "DIR",
        default_value = ".tributary-agent",
        env = "TRIBUTARY_AGENT_DIR"
    )]
    pub workdir: PathBuf,
    /// Machine class reported in UsageTick events (machine time of running jobs, billed per
    /// class by the price plan). Default: this host's `<os>-<cpus>cpu-<memory>gb`, e.g.
    /// `linux-2cpu-24gb`. An empty value reports no usage.
    #[arg(long, value_name = "CLASS")]
    pub machine_class: Option<String>,
    /// Object storage for artifacts, shared with the server: a directory (e.g. the server's
    /// `DATA/objects` on the same machine) or `s3://BUCKET/PREFIX` (AWS_* variables configure
    /// credentials and AWS_ENDPOINT an S3-compatible server). Without it, artifacts go
    /// through the server (uploaded and fetched over the agent's authenticated connection,
    /// sha256 checked by the server and by the agent): simpler, but every byte crosses the
    /// server.
    #[arg(long, value_name = "URL", env = "TRIBUTARY_OBJECTS")]
    pub objects: Option<String>,
    /// Seconds between two UsageTick events of a running job (a last, partial tick is always
    /// sent when the job ends).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub usage_interval: f64,
    /// Keep the workspace of a failed or timed-out job this long (its log says where), then
    /// delete it: e.g. 24h, 30m, 0 (delete at once).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_keep)]
    pub keep_failed: std::time::Duration,
    /// How often kept workspaces are checked for expiry while the agent runs (tests shorten
    /// it; they are also checked at start).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_keep, hide = true)]
    pub kept_sweep_interval: std::time::Duration,
    /// With --engine the agent also runs `image:` jobs, in containers with these limits, and
    /// tells the server so; without it the server sends it no container jobs.
    #[command(flatten)]
    pub containers: ContainerArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("0"), Ok(0));
        assert!(parse_duration("30m1h").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("1d").is_err());
        assert_eq!(
            parse_duration(" 10m "),
            Ok(600),
            "spaces around a flag's value are ignored"
        );
        let e = parse_duration("99999999999999999999h").unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Revoke this agent: it gets no more work and its token stops working.
    #[arg(long, value_name = "AGENT_ID")]
    pub revoke: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How the metering service prices and closes invoices.
#[derive(Debug, Args, Clone)]
pub struct MeteringArgs {
    /// Price plan (TOML: version, currency, free_minutes_per_month, round_up_secs,
    /// [prices] per machine class, default_price). Default: the built-in plan, printed by
    /// `tributary invoice --print-default-plan`.
    #[arg(long, value_name = "FILE", env = "TRIBUTARY_PRICE_PLAN")]
    pub price_plan: Option<PathBuf>,
    /// Hours after the end of a month before its invoices are issued (late ticks of running
    /// jobs land in the month itself until then; later ones become adjustments).
    #[arg(long, value_name = "HOURS", default_value_t = 1.0)]
    pub close_after_hours: f64,
}
