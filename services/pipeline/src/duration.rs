//! The one duration syntax of Tributary: a pipeline's `timeout:` and the CLI's duration flags
//! (`--keep-failed-for`, …) both read it here, so what a user learns in one place works in the
//! other.
//!
//! Whole seconds (`600`, `0`), or hours, minutes and seconds with their unit, each at most once
//! and in that order: `90s`, `10m`, `1h`, `1h30m`, `2h5m10s`, `1h10s`. No spaces, signs,
//! fractions or other units. Pure: text in, seconds or an error out.

/// Why a text is not a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "not a duration; write whole seconds (`600`) or hours, minutes and seconds in that \
         order: 90s, 10m, 1h, 1h30m"
    )]
    Invalid,
    #[error("too large a duration; give a shorter one")]
    TooLarge,
}

/// Seconds in `600`, `90s`, `10m`, `1h`, `1h30m`, `2h5m10s` (units in that order, each once).
pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Invalid);
    }
    if text.chars().all(|c| c.is_ascii_digit()) {
        return text.parse().map_err(|_| DurationError::TooLarge);
    }
    let mut total: u64 = 0;
    let mut rest = text;
    // Units still allowed, largest first.
    let mut units: &[(char, u64)] = &[('h', 3600), ('m', 60), ('s', 1)];
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 || digits == rest.len() {
            return Err(DurationError::Invalid);
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::TooLarge)?;
        let unit = rest[digits..]
            .chars()
            .next()
            .ok_or(DurationError::Invalid)?;
        let pos = units
            .iter()
            .position(|(u, _)| *u == unit)
            .ok_or(DurationError::Invalid)?;
        let secs = n.checked_mul(units[pos].1).ok_or(DurationError::TooLarge)?;
        total = total.checked_add(secs).ok_or(DurationError::TooLarge)?;
        units = &units[pos + 1..];
        rest = &rest[digits + unit.len_utf8()..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_units_in_order() {
        assert_eq!(parse_duration("600"), Ok(600));
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("3600"), Ok(3600));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2h5m10s"), Ok(7510));
        assert_eq!(parse_duration("1h10s"), Ok(3610));
        assert_eq!(parse_duration("0s"), Ok(0));
        assert_eq!(parse_duration("007m"), Ok(420));
    }

    #[test]
    fn anything_else_is_invalid() {
        for bad in [
            "", "m", "h", "10x", "1d", "1m1h", "30m1h", "1h1h", "1.5h", "10 m", " 10m", "-5s",
            "+5s", "1h30", "h1", "1H", "１h", "10ms",
        ] {
            assert_eq!(parse_duration(bad), Err(DurationError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn overflow_is_too_large_not_wrapped() {
        assert_eq!(
            parse_duration("99999999999999999999"),
            Err(DurationError::TooLarge)
        );
        assert_eq!(
            parse_duration("9999999999999999h"),
            Err(DurationError::TooLarge)
        );
        assert_eq!(
            parse_duration(&format!("{}s", u64::MAX)),
            Ok(u64::MAX),
            "the largest number of seconds fits"
        );
        assert_eq!(
            parse_duration(&format!("1m{}s", u64::MAX)),
            Err(DurationError::TooLarge)
        );
    }
}
