//! Pure formatting for pages: durations, times, short commits, log text. No clock: "now" is
//! passed in.

/// `850 ms`, `3.2 s`, `4 m 05 s`, `2 h 03 m`.
pub fn duration_us(us: u64) -> String {
    let ms = us / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} m {:02} s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{} h {:02} m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// `812 B`, `15.0 KiB`, `3.4 MiB`, `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Machine time as minutes with one decimal: `0.5 min`, `125.0 min` (truncated, never rounded
/// up: billing rounds, this only shows).
pub fn minutes(millis: u64) -> String {
    let tenths = millis / 6_000;
    format!("{}.{} min", tenths / 10, tenths % 10)
}

/// How long something ran: finished - started, or now - started while it runs.
pub fn elapsed(started_us: Option<i64>, finished_us: Option<i64>, now_us: i64) -> Option<String> {
    let start = started_us?;
    let end = finished_us.unwrap_or(now_us);
    Some(duration_us(end.saturating_sub(start).max(0) as u64))
}

/// `2026-11-25 18:57:47 UTC` from microseconds since the epoch.
pub fn utc(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// `5 s ago`, `3 min ago`, `2 h ago`, `4 days ago`.
pub fn ago(us: i64, now_us: i64) -> String {
    let s = (now_us - us).max(0) / 1_000_000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// How a build is named on pages: `#12`, or the end of its id when it has no number.
pub fn build_label(number: u64, id: &str) -> String {
    if number > 0 {
        format!("#{number}")
    } else {
        let tail = id.len().saturating_sub(8);
        format!("#{}", id.get(tail..).unwrap_or(id))
    }
}

/// The first 10 characters of a commit.
pub fn short_commit(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

/// Decodes `data` as UTF-8 after the `carry` bytes left over from the previous chunk, leaving
/// in `carry` an incomplete character at the end (a chunk may split one). Invalid bytes
/// become U+FFFD.
pub fn utf8_chunk(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let keep = incomplete_tail(carry);
    let tail = carry.split_off(carry.len() - keep);
    let text = String::from_utf8_lossy(carry).into_owned();
    *carry = tail;
    text
}

/// Length of an unfinished UTF-8 sequence at the end of `bytes` (0 when it ends cleanly).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back for the lead
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_us(850_000), "850 ms");
        assert_eq!(duration_us(3_240_000), "3.2 s");
        assert_eq!(duration_us(245_000_000), "4 m 05 s");
        assert_eq!(duration_us(7_380_000_000), "2 h 03 m");
        assert_eq!(elapsed(Some(1_000_000), None, 3_000_000).unwrap(), "2.0 s");
        assert_eq!(elapsed(None, None, 3), None);
    }

    #[test]
    fn sizes_and_minutes_read_naturally() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(15 * 1024), "15.0 KiB");
        assert_eq!(bytes(3_565_158), "3.4 MiB");
        assert_eq!(bytes(5 << 40), "5120.0 GiB");
        assert_eq!(minutes(0), "0.0 min");
        assert_eq!(minutes(30_000), "0.5 min");
        assert_eq!(minutes(59_999), "0.9 min");
        assert_eq!(minutes(7_500_000), "125.0 min");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_633_067_000_000), "2026-11-25 18:57:47 UTC");
        assert_eq!(utc(951_782_400_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(ago(0, 125_000_000), "2 min ago");
        assert_eq!(build_label(12, "x"), "#12");
        assert_eq!(
            build_label(0, "01a21419-65b2-7148-b661-913145ad2b25"),
            "#45ad2b25"
        );
    }

    #[test]
    fn a_character_split_across_chunks_is_kept_whole() {
        let text = "é€😀".as_bytes();
        let mut carry = Vec::new();
        let mut out = String::new();
        for b in text {
            out += &utf8_chunk(&mut carry, &[*b]);
        }
        assert_eq!(out, "é€😀");
        assert!(carry.is_empty());
        assert_eq!(utf8_chunk(&mut Vec::new(), b"a\xffb"), "a\u{fffd}b");
    }

    proptest! {
        #[test]
        fn any_split_of_valid_text_decodes_to_the_text(s in "\\PC{0,40}", cut in 0usize..200) {
            let bytes = s.as_bytes();
            let cut = cut.min(bytes.len());
            let mut carry = Vec::new();
            let mut out = utf8_chunk(&mut carry, &bytes[..cut]);
            out += &utf8_chunk(&mut carry, &bytes[cut..]);
            prop_assert_eq!(out, s);
            prop_assert!(carry.is_empty());
        }
    }
}
