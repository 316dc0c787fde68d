//! The price plan: a TOML file, versioned, parsed into exact integer money (micro-units of
//! the currency: 1 USD = 1 000 000). Never floating point.
//!
//! ```toml
//! version = "2026-11"            # printed on every invoice
//! currency = "USD"
//! currency_decimals = 2          # line amounts are rounded (half up) to cents
//! free_minutes_per_month = 2000  # per tenant, used by the month's usage lines in order
//! round_up_secs = 60             # each job attempt's time in a month is rounded up to this
//! default_price = "0.008"        # per minute, for classes not listed (omit: refuse them)
//!
//! [prices]                       # per minute, per machine class
//! "linux-2cpu-4gb" = "0.008"
//! "linux-8cpu-32gb" = "0.032"
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

/// Micro-units per unit of currency.
pub const MICROS: i64 = 1_000_000;

/// The built-in plan (`tributary invoice --print-default-plan`).
pub const DEFAULT_PLAN: &str = r#"# Tributary's built-in price plan. Copy it, edit it, pass it with --price-plan FILE.
# Prices are per minute, as decimal strings (exact: never floating point).
version = "builtin-1"
currency = "USD"
currency_decimals = 2
free_minutes_per_month = 2000
round_up_secs = 60
default_price = "0.008"

[prices]
"linux-2cpu-4gb" = "0.008"
"linux-4cpu-16gb" = "0.016"
"linux-8cpu-32gb" = "0.032"
"#;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PricePlan {
    pub version: String,
    pub currency: String,
    pub currency_decimals: u32,
    pub free_minutes_per_month: u64,
    /// 0 or 1000 ms: no rounding beyond the millisecond.
    pub round_up_millis: u64,
    pub default_price_micros: Option<i64>,
    pub prices_micros: BTreeMap<String, i64>,
    /// The plan's text, verbatim (it goes into InvoiceIssued).
    pub text: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("machine class {class:?} has no price in plan {version}: add it under [prices] or set default_price")]
    UnknownClass { class: String, version: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    version: String,
    #[serde(default = "usd")]
    currency: String,
    #[serde(default = "two")]
    currency_decimals: u32,
    #[serde(default)]
    free_minutes_per_month: u64,
    #[serde(default = "sixty")]
    round_up_secs: u64,
    default_price: Option<toml::Value>,
    #[serde(default)]
    prices: BTreeMap<String, toml::Value>,
}

fn usd() -> String {
    "USD".into()
}
fn two() -> u32 {
    2
}
fn sixty() -> u64 {
    60
}

impl PricePlan {
    /// Parses a plan; `origin` (a file name) prefixes every error, which says what to fix.
    pub fn parse(text: &str, origin: &str) -> Result<PricePlan, PlanError> {
        let invalid = |message: String| PlanError::Invalid {
            origin: origin.to_owned(),
            message,
        };
        let raw: RawPlan = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if raw.version.trim().is_empty() {
            return Err(invalid("`version` must not be empty".into()));
        }
        if raw.currency_decimals > 6 {
            return Err(invalid(format!(
                "currency_decimals = {} but at most 6 are supported",
                raw.currency_decimals
            )));
        }
        let price = |key: &str, v: &toml::Value| -> Result<i64, PlanError> {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                other => {
                    return Err(invalid(format!(
                        "{key} = {other}: write prices as decimal strings, e.g. \"0.008\" (floating point is not exact)"
                    )))
                }
            };
            parse_money(&text).map_err(|m| invalid(format!("{key} = {text:?}: {m}")))
        };
        let default_price_micros = raw
            .default_price
            .as_ref()
            .map(|v| price("default_price", v))
            .transpose()?;
        let mut prices_micros = BTreeMap::new();
        for (class, v) in &raw.prices {
            prices_micros.insert(class.clone(), price(&format!("prices.{class:?}"), v)?);
        }
        Ok(PricePlan {
            version: raw.version,
            currency: raw.currency,
            currency_decimals: raw.currency_decimals,
            free_minutes_per_month: raw.free_minutes_per_month,
            round_up_millis: raw.round_up_secs.saturating_mul(1000),
            default_price_micros,
            prices_micros,
            text: text.to_owned(),
        })
    }

    pub fn builtin() -> PricePlan {
        // The built-in text is tested to parse.
        PricePlan::parse(DEFAULT_PLAN, "built-in plan").unwrap_or_else(|_| PricePlan {
            version: "builtin-1".into(),
            currency: "USD".into(),
            currency_decimals: 2,
            free_minutes_per_month: 0,
            round_up_millis: 60_000,
            default_price_micros: Some(8_000),
            prices_micros: BTreeMap::new(),
            text: DEFAULT_PLAN.into(),
        })
    }

    /// Price per minute of a machine class, in micro-units.
    pub fn price_micros(&self, class: &str) -> Result<i64, PlanError> {
        self.prices_micros
            .get(class)
            .copied()
            .or(self.default_price_micros)
            .ok_or_else(|| PlanError::UnknownClass {
                class: class.to_owned(),
                version: self.version.clone(),
            })
    }

    /// A job attempt's billed time in a month: `millis` rounded up to the plan's unit.
    pub fn billed_millis(&self, millis: u64) -> u64 {
        let unit = self.round_up_millis;
        if unit <= 1 {
            return millis;
        }
        millis.div_ceil(unit).saturating_mul(unit)
    }

    pub fn free_millis(&self) -> u64 {
        self.free_minutes_per_month.saturating_mul(60_000)
    }

    /// `millis` of machine time at `price` per minute, rounded half up to the currency's
    /// smallest unit, in micro-units.
    pub fn amount_micros(&self, millis: u64, price_per_minute_micros: i64) -> i64 {
        let exact_num = i128::from(millis) * i128::from(price_per_minute_micros); // / 60_000
        let step = 10i128.pow(6 - self.currency_decimals.min(6)) * 60_000;
        let rounded = (exact_num + step / 2).div_euclid(step) * step;
        i64::try_from(rounded / 60_000).unwrap_or(i64::MAX)
    }
}

/// `"0.008"` → 8000 micro-units. At most 6 decimals, no sign, no exponent.
pub fn parse_money(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (!frac.is_empty() && !digits(frac)) || t.ends_with('.') {
        return Err("not a decimal number like 0.008".into());
    }
    if frac.len() > 6 {
        return Err("more than 6 decimals (prices are exact to a millionth)".into());
    }
    let int: i64 = int.parse().map_err(|_| "too large".to_string())?;
    let frac_micros: i64 = format!("{frac:0<6}").parse().map_err(|_| "bad decimals")?;
    int.checked_mul(MICROS)
        .and_then(|v| v.checked_add(frac_micros))
        .ok_or_else(|| "too large".into())
}

/// Micro-units as a decimal with `decimals` places: `format_money(1_234_500, 2)` = `1.23`
/// (amounts are already rounded; extra digits are cut).
pub fn format_money(micros: i64, decimals: u32) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let int = m / MICROS as u64;
    let frac = format!("{:06}", m % MICROS as u64);
    let d = decimals.min(6) as usize;
    if d == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{}", &frac[..d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_builtin_plan_parses() {
        let plan = PricePlan::parse(DEFAULT_PLAN, "built-in").unwrap();
        assert_eq!(plan.price_micros("linux-2cpu-4gb"), Ok(8_000));
        assert_eq!(plan.price_micros("anything"), Ok(8_000));
        assert_eq!(plan.round_up_millis, 60_000);
        assert_eq!(plan.free_millis(), 2000 * 60_000);
    }

    #[test]
    fn money_is_exact() {
        assert_eq!(parse_money("0.008"), Ok(8_000));
        assert_eq!(parse_money("12"), Ok(12_000_000));
        assert_eq!(parse_money("0.000001"), Ok(1));
        assert!(parse_money("0.0000001").is_err());
        assert!(parse_money("-1").is_err());
        assert!(parse_money("1e3").is_err());
        assert_eq!(format_money(1_230_000, 2), "1.23");
        assert_eq!(format_money(8_000, 3), "0.008");
    }

    #[test]
    fn errors_say_where_and_what() {
        let e = PricePlan::parse("version = \"x\"\n[prices]\nsmall = 0.1\n", "plan.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("plan.toml: "), "{e}");
        assert!(e.contains("decimal strings"), "{e}");
        let e = PricePlan::parse("versio = \"x\"\n", "plan.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        let plan = PricePlan::parse("version = \"x\"\n", "p").unwrap();
        assert!(plan
            .price_micros("gpu")
            .unwrap_err()
            .to_string()
            .contains("[prices]"));
    }

    #[test]
    fn rounding_per_job_to_the_minute_and_to_cents() {
        let plan = PricePlan::parse("version = \"v\"\nround_up_secs = 60\n", "p").unwrap();
        assert_eq!(plan.billed_millis(0), 0);
        assert_eq!(plan.billed_millis(1), 60_000);
        assert_eq!(plan.billed_millis(60_000), 60_000);
        assert_eq!(plan.billed_millis(60_001), 120_000);
        // 3 minutes at 0.008 = 0.024 -> 0.02; 7 minutes = 0.056 -> 0.06
        assert_eq!(plan.amount_micros(180_000, 8_000), 20_000);
        assert_eq!(plan.amount_micros(420_000, 8_000), 60_000);
        let per_second = PricePlan::parse("version = \"v\"\nround_up_secs = 1\n", "p").unwrap();
        assert_eq!(per_second.billed_millis(1_500), 2_000);
    }

    proptest! {
        #[test]
        fn amounts_are_whole_cents_and_within_half_a_cent(ms in 0u64..10_000_000_000, price in 0i64..10_000_000) {
            let plan = PricePlan::parse("version = \"v\"\n", "p").unwrap();
            let a = plan.amount_micros(ms, price);
            prop_assert_eq!(a % 10_000, 0);
            let exact = i128::from(ms) * i128::from(price);
            prop_assert!((i128::from(a) * 60_000 - exact).abs() <= 5_000 * 60_000);
        }
    }
}
