//! UTC calendar arithmetic for metering: days, months (billing periods), and splitting a
//! tick's interval at day boundaries. Pure; time comes from events only.
//!
//! Days are counted from 1970-01-01 (day 0) with Howard Hinnant's `days_from_civil` /
//! `civil_from_days` algorithms (proleptic Gregorian calendar).

use std::fmt;

pub const US_PER_DAY: i64 = 86_400_000_000;

/// A UTC day, as days since 1970-01-01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i64);

/// A billing period: one calendar month (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    pub year: i32,
    /// 1..=12
    pub month: u32,
}

impl Day {
    /// The day holding instant `us` (µs since the epoch).
    pub fn of_us(us: i64) -> Day {
        Day(us.div_euclid(US_PER_DAY))
    }

    pub fn start_us(self) -> i64 {
        self.0.saturating_mul(US_PER_DAY)
    }

    pub fn civil(self) -> (i32, u32, u32) {
        civil_from_days(self.0)
    }

    pub fn period(self) -> Period {
        let (year, month, _) = self.civil();
        Period { year, month }
    }

    /// `2026-11-25`.
    pub fn parse(s: &str) -> Option<Day> {
        let mut it = s.splitn(3, '-');
        let y: i32 = it.next()?.parse().ok()?;
        let m: u32 = it.next()?.parse().ok()?;
        let d: u32 = it.next()?.parse().ok()?;
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return None;
        }
        Some(Day(days_from_civil(y, m, d)))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl Period {
    /// `2026-11`; the error says what is expected.
    pub fn parse(s: &str) -> Result<Period, String> {
        let bad = || format!("invalid period {s:?}: expected a month as YYYY-MM, e.g. 2026-11");
        let (y, m) = s.trim().split_once('-').ok_or_else(bad)?;
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u32 = m.parse().map_err(|_| bad())?;
        if y.len() != 4 || !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Period { year, month })
    }

    pub fn first_day(self) -> Day {
        Day(days_from_civil(self.year, self.month, 1))
    }

    pub fn next(self) -> Period {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn start_us(self) -> i64 {
        self.first_day().start_us()
    }

    /// The first instant after the period.
    pub fn end_us(self) -> i64 {
        self.next().start_us()
    }

    pub fn of_us(us: i64) -> Period {
        Day::of_us(us).period()
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    ((y + i64::from(m <= 2)) as i32, m, d)
}

/// Splits `millis` of machine time covering `[start_us, end_us)` across the UTC days the
/// interval touches, in proportion to the time in each day. The parts always add up to
/// `millis` exactly (integer arithmetic, the remainder lands in the later part). An empty or
/// inverted interval puts everything on the day of `end_us`.
pub fn split_by_day(start_us: i64, end_us: i64, millis: u64) -> Vec<(Day, u64)> {
    let mut parts = Vec::new();
    for_each_day(start_us, end_us, millis, |d, ms| parts.push((d, ms)));
    parts
}

/// [`split_by_day`] without allocating in the common case (the interval lies in one day).
#[inline]
pub fn for_each_day(start_us: i64, end_us: i64, millis: u64, mut f: impl FnMut(Day, u64)) {
    let first = Day::of_us(start_us);
    if end_us > start_us && Day::of_us(end_us - 1) == first {
        return f(first, millis);
    }
    for (d, ms) in split_slow(start_us, end_us, millis) {
        f(d, ms);
    }
}

fn split_slow(start_us: i64, end_us: i64, millis: u64) -> Vec<(Day, u64)> {
    let last = Day::of_us(end_us.saturating_sub(1).max(start_us));
    if end_us <= start_us {
        return vec![(Day::of_us(end_us), millis)];
    }
    let first = Day::of_us(start_us);
    if first == last {
        return vec![(first, millis)];
    }
    let span = (end_us - start_us) as u128;
    let mut parts = Vec::new();
    let mut done: u64 = 0;
    let mut day = first;
    while day <= last {
        let boundary = Day(day.0 + 1).start_us().min(end_us);
        let upto = if boundary >= end_us {
            millis
        } else {
            (u128::from(millis) * (boundary - start_us) as u128 / span) as u64
        };
        if upto > done || day == last {
            parts.push((day, upto - done));
        }
        done = upto;
        day = Day(day.0 + 1);
    }
    parts.retain(|(_, ms)| *ms > 0);
    if parts.is_empty() {
        parts.push((last, 0));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(Day(0).to_string(), "1970-01-01");
        assert_eq!(Day::parse("2026-11-30").unwrap().to_string(), "2026-11-30");
        assert_eq!(Day::parse("2024-02-29").unwrap().to_string(), "2024-02-29");
        assert!(Day::parse("2026-02-29").is_none());
        let p = Period::parse("2026-12").unwrap();
        assert_eq!(p.next().to_string(), "2027-01");
        assert_eq!(Period::of_us(p.end_us() - 1), p);
        assert_eq!(Period::of_us(p.end_us()), p.next());
        assert!(Period::parse("2026-13").is_err());
        assert!(Period::parse("nov").unwrap_err().contains("YYYY-MM"));
    }

    #[test]
    fn a_tick_across_midnight_of_a_month_end_is_split() {
        let midnight = Period::parse("2026-12").unwrap().start_us();
        // 20 s before and 40 s after midnight, 60 000 ms.
        let parts = split_by_day(midnight - 20_000_000, midnight + 40_000_000, 60_000);
        assert_eq!(
            parts,
            vec![
                (Day::parse("2026-11-30").unwrap(), 20_000),
                (Day::parse("2026-12-01").unwrap(), 40_000)
            ]
        );
    }

    proptest! {
        #[test]
        fn civil_round_trips(z in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(z);
            prop_assert_eq!(days_from_civil(y, m, d), z);
        }

        #[test]
        fn split_parts_add_up_and_stay_inside(
            start in 0i64..10 * US_PER_DAY,
            len in 0i64..5 * US_PER_DAY,
            millis in 0u64..10_000_000_000,
        ) {
            let parts = split_by_day(start, start + len, millis);
            prop_assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), millis);
            for (day, _) in &parts {
                prop_assert!(day.0 >= Day::of_us(start).0 && day.0 <= Day::of_us(start + len).0);
            }
        }
    }
}
