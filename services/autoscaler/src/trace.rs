//! Job-arrival traces: a CSV format and a generator of a realistic synthetic day.
//!
//! Format: one job per line, `arrival_secs,duration_secs,job,labels` (labels separated by
//! `;`, empty for none); `#` starts a comment. Arrivals are seconds from the start of the day.
//!
//! The generated day follows a working-day curve (quiet night, morning ramp, a lunch dip, an
//! afternoon peak, an evening tail) of pushes, each triggering a pipeline of several jobs
//! at once (build, lint, a matrix of tests, sometimes a job on a `large` machine), plus a few
//! bursts (a release: 40 jobs at once). Durations are log-normal around each job's median.

use rand::{Rng, SeedableRng};

use crate::config::SECOND_US;
use crate::sim::TraceJob;
use crate::ConfigError;

/// Parses a trace; errors name `path:line`.
pub fn parse(text: &str, path: &str) -> Result<Vec<TraceJob>, ConfigError> {
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| {
            ConfigError::Invalid(format!(
                "{path}:{}: {what}; expected `arrival_secs,duration_secs,job,labels` (labels \
                 separated by ';')",
                i + 1
            ))
        };
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 4 {
            return Err(bad(&format!("{} fields", fields.len())));
        }
        let secs = |s: &str, what: &str| -> Result<i64, ConfigError> {
            let v: f64 = s
                .trim()
                .parse()
                .map_err(|_| bad(&format!("{what} {s:?} is not a number")))?;
            if !(0.0..1e9).contains(&v) {
                return Err(bad(&format!("{what} {v} is out of range")));
            }
            Ok((v * SECOND_US as f64).round() as i64)
        };
        jobs.push(TraceJob {
            arrival_us: secs(fields[0], "arrival")?,
            duration_us: secs(fields[1], "duration")?,
            name: fields[2].trim().to_owned(),
            labels: fields[3]
                .split(';')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        });
    }
    jobs.sort_by_key(|j| j.arrival_us);
    Ok(jobs)
}

/// Renders a trace in the CSV format.
pub fn render(jobs: &[TraceJob]) -> String {
    let mut out = String::from(
        "# Tributary autoscaler trace: arrival_secs,duration_secs,job,labels (';'-separated)\n",
    );
    for j in jobs {
        out.push_str(&format!(
            "{},{},{},{}\n",
            j.arrival_us / SECOND_US,
            j.duration_us / SECOND_US,
            j.name,
            j.labels.join(";")
        ));
    }
    out
}

/// Pushes per hour over a working day (hour 0 = midnight).
const PUSHES_PER_HOUR: [f64; 24] = [
    1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 2.0, 5.0, 12.0, 22.0, 28.0, 30.0, 18.0, 20.0, 30.0, 32.0, 28.0,
    20.0, 10.0, 6.0, 4.0, 3.0, 2.0, 1.0,
];

/// Release bursts: (second of the day, jobs at once).
const BURSTS: [(i64, u32); 3] = [
    (10 * 3600 + 600, 40),
    (14 * 3600 + 1800, 40),
    (17 * 3600, 40),
];

/// A day of arrivals from `seed` (the same seed gives the same day).
pub fn generate_day(seed: u64) -> Vec<TraceJob> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut jobs = Vec::new();
    let push = |rng: &mut rand::rngs::StdRng, at: i64, jobs: &mut Vec<TraceJob>| {
        let mut add =
            |name: String, median_secs: f64, labels: Vec<String>, rng: &mut rand::rngs::StdRng| {
                jobs.push(TraceJob {
                    arrival_us: at * SECOND_US,
                    duration_us: (lognormal(rng, median_secs, 0.5).clamp(5.0, 3.0 * 3600.0)
                        * SECOND_US as f64) as i64,
                    name,
                    labels,
                })
            };
        add("build".into(), 240.0, Vec::new(), rng);
        add("lint".into(), 60.0, Vec::new(), rng);
        let tests = rng.random_range(2..=6);
        for i in 0..tests {
            add(format!("test-{i}"), 360.0, Vec::new(), rng);
        }
        if rng.random_bool(0.15) {
            add("integration".into(), 900.0, vec!["large".into()], rng);
        }
    };
    for (hour, rate) in PUSHES_PER_HOUR.iter().enumerate() {
        // Poisson arrivals: exponential gaps at `rate` per hour.
        let start = hour as f64 * 3600.0;
        let mut t = start;
        loop {
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() * 3600.0 / rate;
            if t >= start + 3600.0 {
                break;
            }
            push(&mut rng, t as i64, &mut jobs);
        }
    }
    for (at, n) in BURSTS {
        for i in 0..n {
            let labels = if i % 10 == 0 {
                vec!["large".into()]
            } else {
                Vec::new()
            };
            jobs.push(TraceJob {
                arrival_us: at * SECOND_US,
                duration_us: (lognormal(&mut rng, 300.0, 0.4) * SECOND_US as f64) as i64,
                name: format!("release-{i}"),
                labels,
            });
        }
    }
    jobs.sort_by_key(|j| j.arrival_us);
    jobs
}

/// A log-normal sample with the given median and shape (Box-Muller).
fn lognormal(rng: &mut impl Rng, median: f64, sigma: f64) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    median * (sigma * z).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_day_has_a_daily_curve_and_bursts_and_round_trips() {
        let day = generate_day(7);
        assert!(day.len() > 1000, "{} jobs", day.len());
        let per_hour = |h: i64| {
            day.iter()
                .filter(|j| j.arrival_us / SECOND_US / 3600 == h)
                .count()
        };
        assert!(
            per_hour(15) > 5 * per_hour(3).max(1),
            "afternoon busier than night"
        );
        let burst = day
            .iter()
            .filter(|j| j.arrival_us == (17 * 3600) * SECOND_US)
            .count();
        assert!(burst >= 40);
        let parsed = parse(&render(&day), "day.csv").unwrap();
        assert_eq!(parsed.len(), day.len());
        assert_eq!(parsed[0].name, day[0].name);
        assert_eq!(
            parsed[0].arrival_us / SECOND_US,
            day[0].arrival_us / SECOND_US
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = parse("# c\n1,2,build,\n3,x,test,\n", "t.csv")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.csv:3:"), "{e}");
        assert!(parse("1,2,build\n", "t.csv").is_err());
        let ok = parse("5,2,build,gpu;large\n1,2,lint,\n", "t.csv").unwrap();
        assert_eq!(ok[0].name, "lint");
        assert_eq!(ok[1].labels, vec!["gpu".to_owned(), "large".to_owned()]);
    }
}
