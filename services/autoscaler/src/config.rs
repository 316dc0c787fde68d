//! The autoscaler's configuration: the agent kinds it may acquire, and the rules' parameters.
//!
//! Read from a TOML file ([`Config::from_toml`]); times are seconds (fractions allowed), prices
//! are currency units per hour. Internally times are µs and money is micro-units, so the
//! policy's arithmetic is exact.

use serde::Deserialize;

use crate::ConfigError;

pub const SECOND_US: i64 = 1_000_000;
/// Micro-units per currency unit.
pub const MICROS: u64 = 1_000_000;

/// One kind of agent the autoscaler can acquire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindConfig {
    pub name: String,
    /// Labels the agent carries (`runs-on`); empty = a generic agent.
    pub labels: Vec<String>,
    /// Jobs one agent runs at once.
    pub capacity: u32,
    pub price_per_hour_micros: u64,
    /// The provider bills started periods of this many seconds (3600 = by the hour).
    pub billing_granularity_secs: u64,
    /// Never more than this many agents of the kind at once (starting, running or draining).
    pub max_agents: u32,
    /// How long an agent takes from acquisition to taking work (the simulator uses it).
    pub boot_us: i64,
}

impl KindConfig {
    /// Serves a job asking for `runs_on`: carries all of them.
    pub fn serves(&self, runs_on: &[String]) -> bool {
        runs_on.iter().all(|l| self.labels.contains(l))
    }

    pub fn is_generic(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Everything the policy is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// In preference order: a label set goes to the first kind carrying all its labels.
    pub kinds: Vec<KindConfig>,
    /// An agent idle this long, with no job waiting for its kind, is let go.
    pub grace_us: i64,
    /// Hard limit on the summed hourly price of every agent that is paid for.
    pub budget_per_hour_micros: u64,
    /// An agent billed by periods is kept until this long before its paid period ends; then
    /// it is renewed (kept) if needed or drained and released.
    pub renewal_margin_us: i64,
    /// Acquire enough slots that the waiting work drains in about this long.
    pub target_wait_us: i64,
    /// Expected duration of a job never seen finishing.
    pub default_job_us: i64,
    /// An acquired agent that has not connected after this long is released; so is an agent
    /// that disconnected without being drained.
    pub startup_timeout_us: i64,
    /// A drained idle agent is released only after it has been draining this long, so that an
    /// assignment decided just before the drain reaches it (and keeps it) first.
    pub drain_settle_us: i64,
    /// How often the service decides.
    pub tick_us: i64,
    /// A queued job counts as waiting once it has waited this long: a job that an agent with a
    /// free slot (the pool's or another one) takes at once never makes the pool grow.
    pub queue_delay_us: i64,
    /// The `command` provider's scripts.
    pub command: Option<CommandConfig>,
    /// The `kubernetes` provider's cluster, namespace and Pod template.
    pub kubernetes: Option<KubernetesConfig>,
}

/// Scripts of the `command` provider, run with `sh -c` (see `provider::command`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Starts a machine running `tributary agent`; prints the machine's id on its last line.
    pub acquire: String,
    /// Stops the machine (called only once its agent runs nothing).
    pub release: String,
    /// Optional: tells the agent to drain (e.g. `ssh $MACHINE systemctl stop tributary-agent`).
    pub drain: Option<String>,
}

/// The `kubernetes` provider's `[kubernetes]` table (see `provider::kubernetes`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The agent Pod template (YAML, `kind: Pod`); a relative path is relative to the
    /// configuration file.
    pub template: std::path::PathBuf,
    /// Namespace of the agent Pods (default: the kubeconfig context's, else `default`; in a
    /// Pod: its own namespace).
    pub namespace: Option<String>,
    /// Kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`, else the in-cluster
    /// service account when running in a Pod).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context (default: its current context).
    pub context: Option<String>,
    /// The Pods' terminationGracePeriodSeconds: how long a released agent has to drain after
    /// SIGTERM before it is killed (default: the template's, else 60).
    pub termination_grace_secs: Option<i64>,
    /// The server URL the agents in the Pods dial (TRIBUTARY_SERVER; default: the server the
    /// autoscaler is given, which must then be reachable from the Pods).
    pub server: Option<String>,
    /// Value of the `tributary.dev/owner` label on every Pod this autoscaler creates: at start
    /// it deletes the Pods with its owner label that its log does not know (default
    /// `tributary`; give each installation sharing a namespace its own).
    pub owner: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kinds: Vec::new(),
            grace_us: 300 * SECOND_US,
            budget_per_hour_micros: 10 * MICROS,
            renewal_margin_us: 300 * SECOND_US,
            target_wait_us: 120 * SECOND_US,
            default_job_us: 300 * SECOND_US,
            startup_timeout_us: 600 * SECOND_US,
            drain_settle_us: SECOND_US,
            tick_us: SECOND_US,
            queue_delay_us: SECOND_US,
            command: None,
            kubernetes: None,
        }
    }
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    grace_secs: Option<f64>,
    budget_per_hour: f64,
    renewal_margin_secs: Option<f64>,
    target_wait_secs: Option<f64>,
    default_job_secs: Option<f64>,
    startup_timeout_secs: Option<f64>,
    drain_settle_secs: Option<f64>,
    tick_secs: Option<f64>,
    queue_delay_secs: Option<f64>,
    command: Option<CommandConfig>,
    kubernetes: Option<KubernetesConfig>,
    #[serde(rename = "kind")]
    kinds: Vec<KindFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindFile {
    name: String,
    #[serde(default)]
    labels: Vec<String>,
    capacity: Option<u32>,
    price_per_hour: f64,
    /// `second`, `minute`, `hour`, or a number of seconds.
    billing: Option<toml::Value>,
    max_agents: u32,
    boot_secs: Option<f64>,
}

fn secs(v: Option<f64>, default_us: i64, what: &str) -> Result<i64, ConfigError> {
    match v {
        None => Ok(default_us),
        Some(s) if s.is_finite() && (0.0..1e9).contains(&s) => Ok((s * 1e6).round() as i64),
        Some(s) => Err(ConfigError::Invalid(format!(
            "{what} = {s}: must be a number of seconds between 0 and 1e9"
        ))),
    }
}

fn money(v: f64, what: &str) -> Result<u64, ConfigError> {
    if v.is_finite() && (0.0..1e9).contains(&v) {
        Ok((v * MICROS as f64).round() as u64)
    } else {
        Err(ConfigError::Invalid(format!(
            "{what} = {v}: must be an amount between 0 and 1e9 per hour"
        )))
    }
}

fn billing(v: Option<&toml::Value>, kind: &str) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError::Invalid(format!(
            "kind {kind}: billing must be \"second\", \"minute\", \"hour\" or a number of seconds \
             (at least 1)"
        ))
    };
    match v {
        None => Ok(1),
        Some(toml::Value::String(s)) => match s.as_str() {
            "second" => Ok(1),
            "minute" => Ok(60),
            "hour" => Ok(3600),
            _ => Err(bad()),
        },
        Some(toml::Value::Integer(n)) if *n >= 1 => Ok(*n as u64),
        Some(_) => Err(bad()),
    }
}

impl Config {
    /// Parses a TOML file's text; `path` is only used in errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(":{line}")
                })
                .unwrap_or_default();
            ConfigError::Invalid(format!("{path}{at}: {}", e.message()))
        })?;
        let d = Config::default();
        let mut kinds = Vec::new();
        for k in file.kinds {
            if k.name.is_empty()
                || !k
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::Invalid(format!(
                    "{path}: kind name {:?}: use letters, digits, '-' and '_'",
                    k.name
                )));
            }
            if kinds.iter().any(|x: &KindConfig| x.name == k.name) {
                return Err(ConfigError::Invalid(format!(
                    "{path}: kind {} is defined twice",
                    k.name
                )));
            }
            let capacity = k.capacity.unwrap_or(1);
            if capacity == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{path}: kind {}: capacity must be at least 1",
                    k.name
                )));
            }
            kinds.push(KindConfig {
                price_per_hour_micros: money(k.price_per_hour, "price_per_hour")?,
                billing_granularity_secs: billing(k.billing.as_ref(), &k.name)?,
                boot_us: secs(k.boot_secs, 30 * SECOND_US, "boot_secs")?,
                name: k.name,
                labels: k.labels,
                capacity,
                max_agents: k.max_agents,
            });
        }
        if kinds.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{path}: no agent kind: add at least one [[kind]] with name, price_per_hour and \
                 max_agents"
            )));
        }
        Ok(Config {
            kinds,
            grace_us: secs(file.grace_secs, d.grace_us, "grace_secs")?,
            budget_per_hour_micros: money(file.budget_per_hour, "budget_per_hour")?,
            renewal_margin_us: secs(
                file.renewal_margin_secs,
                d.renewal_margin_us,
                "renewal_margin_secs",
            )?,
            target_wait_us: secs(file.target_wait_secs, d.target_wait_us, "target_wait_secs")?
                .max(1),
            default_job_us: secs(file.default_job_secs, d.default_job_us, "default_job_secs")?,
            startup_timeout_us: secs(
                file.startup_timeout_secs,
                d.startup_timeout_us,
                "startup_timeout_secs",
            )?,
            drain_settle_us: secs(
                file.drain_settle_secs,
                d.drain_settle_us,
                "drain_settle_secs",
            )?,
            tick_us: secs(file.tick_secs, d.tick_us, "tick_secs")?.max(10_000),
            queue_delay_us: secs(file.queue_delay_secs, d.queue_delay_us, "queue_delay_secs")?,
            command: file.command,
            kubernetes: file.kubernetes,
        })
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    pub fn kind(&self, name: &str) -> Option<&KindConfig> {
        self.kinds.iter().find(|k| k.name == name)
    }

    /// The kind that serves jobs asking for `runs_on`, with the scheduler's routing: the first
    /// kind carrying all the labels, else the first generic kind; a job without labels goes
    /// to the first generic kind, else the first kind.
    pub fn kind_for(&self, runs_on: &[String]) -> Option<&KindConfig> {
        let generic = || self.kinds.iter().find(|k| k.is_generic());
        if runs_on.is_empty() {
            generic().or_else(|| self.kinds.first())
        } else {
            self.kinds
                .iter()
                .find(|k| k.serves(runs_on))
                .or_else(generic)
        }
    }
}

/// Seconds billed for an agent paid from `start_us` until `end_us`: started periods of
/// `granularity_secs`, at least one.
pub fn billed_secs(start_us: i64, end_us: i64, granularity_secs: u64) -> u64 {
    let g = granularity_secs.max(1);
    let elapsed_us = (end_us - start_us).max(0) as u64;
    let elapsed_secs = elapsed_us.div_ceil(SECOND_US as u64);
    elapsed_secs.div_ceil(g).max(1) * g
}

/// What `secs` seconds cost at `price_per_hour_micros`.
pub fn cost_micros(secs: u64, price_per_hour_micros: u64) -> u64 {
    ((secs as u128 * price_per_hour_micros as u128).div_ceil(3600)) as u64
}

/// End of the billing period that contains `now_us` for an agent paid since `start_us` (the
/// first period ends one granularity after the start).
pub fn period_end_us(start_us: i64, now_us: i64, granularity_secs: u64) -> i64 {
    let g = granularity_secs.max(1) as i64 * SECOND_US;
    let elapsed = (now_us - start_us).max(0);
    let periods = (elapsed / g + 1).max(1);
    start_us + periods * g
}

/// Money for people: `1.234567` → `1.23`.
pub fn format_money(micros: u64) -> String {
    format!("{:.2}", micros as f64 / MICROS as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_rounds_up_to_started_periods() {
        assert_eq!(billed_secs(0, 0, 3600), 3600);
        assert_eq!(billed_secs(0, 1, 3600), 3600);
        assert_eq!(billed_secs(0, 3600 * SECOND_US, 3600), 3600);
        assert_eq!(billed_secs(0, 3600 * SECOND_US + 1, 3600), 7200);
        assert_eq!(billed_secs(0, 90 * SECOND_US + 1, 1), 91);
        assert_eq!(cost_micros(3600, 2 * MICROS), 2 * MICROS);
        assert_eq!(cost_micros(1800, 2 * MICROS), MICROS);
        assert_eq!(period_end_us(0, 0, 3600), 3600 * SECOND_US);
        assert_eq!(period_end_us(0, 3599 * SECOND_US, 3600), 3600 * SECOND_US);
        assert_eq!(period_end_us(0, 3600 * SECOND_US, 3600), 7200 * SECOND_US);
    }

    #[test]
    fn parses_a_file_and_names_the_line_of_an_error() {
        let c = Config::from_toml(
            "budget_per_hour = 5.5\ngrace_secs = 0.5\n[[kind]]\nname = \"gpu\"\nlabels = [\"gpu\"]\n\
             price_per_hour = 2.0\nbilling = \"hour\"\nmax_agents = 2\n[[kind]]\nname = \"small\"\n\
             price_per_hour = 0.1\nmax_agents = 8\ncapacity = 2\n",
            "pool.toml",
        )
        .unwrap();
        assert_eq!(c.budget_per_hour_micros, 5_500_000);
        assert_eq!(c.grace_us, 500_000);
        assert_eq!(c.kinds[0].billing_granularity_secs, 3600);
        assert_eq!(c.kinds[1].billing_granularity_secs, 1);
        assert_eq!(c.kind_for(&["gpu".into()]).unwrap().name, "gpu");
        assert_eq!(c.kind_for(&[]).unwrap().name, "small");
        assert_eq!(c.kind_for(&["arm".into()]).unwrap().name, "small");

        let e = Config::from_toml("budget_per_hour = 1\n[[kind]]\nnmae = \"x\"\n", "pool.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool.toml:3"), "{e}");
        assert!(e.contains("nmae"), "{e}");
        let e = Config::from_toml("budget_per_hour = 1\nkind = []\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no agent kind"), "{e}");
    }
}
