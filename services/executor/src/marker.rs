//! The in-band line markers and their scanner.
//!
//! The wrapper script prints, on BOTH stdout and stderr,
//!
//! * before line `i`: `\x1eTRIB:<nonce>:S:<i>\n`
//! * after line `i`:  `\x1eTRIB:<nonce>:E:<i>:<rc>\n` (`rc` is the line's `$?`)
//!
//! `<nonce>` is 32 lower-case hex digits (128 random bits) chosen per job, so a job's output
//! cannot produce a marker by accident. A marker may start anywhere in the byte stream (after
//! output without a trailing newline), and a read may end in the middle of one.
//! [`MarkerScanner`] splits a stream into [`Item`]s, holding back at most one marker's worth of
//! bytes between calls.

/// First byte of every marker (ASCII record separator).
pub const MARKER_LEAD: u8 = 0x1e;

/// Longest tail after the prefix: `E:4294967295:-2147483648\n`.
const MAX_TAIL: usize = 2 + 10 + 1 + 11 + 1;

/// One piece of a scanned stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Bytes the job wrote (never empty).
    Output(Vec<u8>),
    /// The wrapper is about to run line `line` (0-based within the step).
    Start { line: u32 },
    /// Line `line` finished with `$?` = `code`.
    Exit { line: u32, code: i32 },
}

/// Splits one output stream into output bytes and markers. Pure: no I/O, no clock.
#[derive(Debug, Clone)]
pub struct MarkerScanner {
    /// `\x1eTRIB:<nonce>:`
    prefix: Vec<u8>,
    /// Bytes from a possible marker start that the last `feed` could not decide on yet.
    held: Vec<u8>,
}

enum Classified {
    /// A marker of `len` bytes.
    Marker(Item, usize),
    /// The lead byte starts no marker: it is output.
    NotMarker,
    /// Still a valid marker prefix, but the bytes ran out.
    Incomplete,
}

impl MarkerScanner {
    pub fn new(nonce: &str) -> Self {
        let mut prefix = Vec::with_capacity(6 + nonce.len() + 1);
        prefix.push(MARKER_LEAD);
        prefix.extend_from_slice(b"TRIB:");
        prefix.extend_from_slice(nonce.as_bytes());
        prefix.push(b':');
        MarkerScanner {
            prefix,
            held: Vec::new(),
        }
    }

    /// Scans the next bytes of the stream. Output is returned as soon as it is known not to be
    /// part of a marker; only a possible marker's beginning is held back for the next call.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Item> {
        let mut items = Vec::new();
        if self.held.is_empty() {
            self.scan(data, &mut items);
        } else {
            let mut buf = std::mem::take(&mut self.held);
            buf.extend_from_slice(data);
            self.scan(&buf, &mut items);
        }
        items
    }

    /// The stream ended: whatever was held back (an unfinished marker) is output.
    pub fn finish(&mut self) -> Vec<Item> {
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            Vec::new()
        } else {
            vec![Item::Output(held)]
        }
    }

    fn scan(&mut self, buf: &[u8], items: &mut Vec<Item>) {
        let mut out_start = 0;
        let mut i = 0;
        while let Some(rel) = buf[i..].iter().position(|&b| b == MARKER_LEAD) {
            let p = i + rel;
            match self.classify(&buf[p..]) {
                Classified::Marker(item, len) => {
                    push_output(items, &buf[out_start..p]);
                    items.push(item);
                    i = p + len;
                    out_start = i;
                }
                Classified::NotMarker => i = p + 1,
                Classified::Incomplete => {
                    push_output(items, &buf[out_start..p]);
                    self.held = buf[p..].to_vec();
                    return;
                }
            }
        }
        push_output(items, &buf[out_start..]);
    }

    /// `s` starts with the lead byte.
    fn classify(&self, s: &[u8]) -> Classified {
        let n = s.len().min(self.prefix.len());
        if s[..n] != self.prefix[..n] {
            return Classified::NotMarker;
        }
        if s.len() < self.prefix.len() {
            return Classified::Incomplete;
        }
        match parse_tail(&s[self.prefix.len()..]) {
            Tail::Done(item, len) => Classified::Marker(item, self.prefix.len() + len),
            Tail::Invalid => Classified::NotMarker,
            Tail::Short => Classified::Incomplete,
        }
    }
}

fn push_output(items: &mut Vec<Item>, bytes: &[u8]) {
    if !bytes.is_empty() {
        items.push(Item::Output(bytes.to_vec()));
    }
}

enum Tail {
    Done(Item, usize),
    Invalid,
    Short,
}

/// Parses `S:<line>\n` or `E:<line>:<rc>\n`.
fn parse_tail(t: &[u8]) -> Tail {
    let mut cur = Cursor { t, pos: 0 };
    let kind = match cur.next() {
        None => return Tail::Short,
        Some(k @ (b'S' | b'E')) => k,
        Some(_) => return Tail::Invalid,
    };
    match cur.expect(b':') {
        Step::Ok => {}
        Step::Short => return Tail::Short,
        Step::Invalid => return Tail::Invalid,
    }
    let line = match cur.number(false, b"\n:") {
        Num::Ok(v) => v,
        Num::Short => return Tail::Short,
        Num::Invalid => return Tail::Invalid,
    };
    let Ok(line) = u32::try_from(line) else {
        return Tail::Invalid;
    };
    if kind == b'S' {
        return match cur.expect(b'\n') {
            Step::Ok => Tail::Done(Item::Start { line }, cur.pos),
            Step::Short => Tail::Short,
            Step::Invalid => Tail::Invalid,
        };
    }
    match cur.expect(b':') {
        Step::Ok => {}
        Step::Short => return Tail::Short,
        Step::Invalid => return Tail::Invalid,
    }
    let code = match cur.number(true, b"\n") {
        Num::Ok(v) => v,
        Num::Short => return Tail::Short,
        Num::Invalid => return Tail::Invalid,
    };
    let Ok(code) = i32::try_from(code) else {
        return Tail::Invalid;
    };
    match cur.expect(b'\n') {
        Step::Ok => {
            debug_assert!(cur.pos <= MAX_TAIL);
            Tail::Done(Item::Exit { line, code }, cur.pos)
        }
        Step::Short => Tail::Short,
        Step::Invalid => Tail::Invalid,
    }
}

struct Cursor<'a> {
    t: &'a [u8],
    pos: usize,
}

enum Step {
    Ok,
    Short,
    Invalid,
}

enum Num {
    Ok(i64),
    Short,
    Invalid,
}

impl Cursor<'_> {
    fn next(&mut self) -> Option<u8> {
        let b = self.t.get(self.pos).copied();
        if b.is_some() {
            self.pos += 1;
        }
        b
    }

    fn expect(&mut self, want: u8) -> Step {
        match self.next() {
            None => Step::Short,
            Some(b) if b == want => Step::Ok,
            Some(_) => Step::Invalid,
        }
    }

    /// An optional `-` (when `signed`), then 1 to 10 digits, stopping before one of `ends`
    /// (which is not consumed).
    fn number(&mut self, signed: bool, ends: &[u8]) -> Num {
        let mut neg = false;
        if signed && self.t.get(self.pos) == Some(&b'-') {
            neg = true;
            self.pos += 1;
        }
        let mut value: i64 = 0;
        let mut digits = 0;
        loop {
            match self.t.get(self.pos) {
                None => return Num::Short,
                Some(b) if b.is_ascii_digit() => {
                    if digits == 10 {
                        return Num::Invalid;
                    }
                    value = value * 10 + i64::from(b - b'0');
                    digits += 1;
                    self.pos += 1;
                }
                Some(b) if ends.contains(b) && digits > 0 => {
                    return Num::Ok(if neg { -value } else { value });
                }
                Some(_) => return Num::Invalid,
            }
        }
    }
}

/// Merges adjacent `Output` items: two scans of the same bytes split at different points give
/// the same coalesced items.
pub fn coalesce(items: impl IntoIterator<Item = Item>) -> Vec<Item> {
    let mut out: Vec<Item> = Vec::new();
    for item in items {
        match (out.last_mut(), item) {
            (Some(Item::Output(prev)), Item::Output(more)) => prev.extend_from_slice(&more),
            (_, item) => out.push(item),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NONCE: &str = "0123456789abcdef0123456789abcdef";

    fn start(line: u32) -> Vec<u8> {
        format!("\x1eTRIB:{NONCE}:S:{line}\n").into_bytes()
    }

    fn exit(line: u32, code: i32) -> Vec<u8> {
        format!("\x1eTRIB:{NONCE}:E:{line}:{code}\n").into_bytes()
    }

    fn scan_whole(data: &[u8]) -> Vec<Item> {
        let mut s = MarkerScanner::new(NONCE);
        let mut items = s.feed(data);
        items.extend(s.finish());
        coalesce(items)
    }

    fn scan_split(data: &[u8], cuts: &[usize]) -> Vec<Item> {
        let mut s = MarkerScanner::new(NONCE);
        let mut items = Vec::new();
        let mut last = 0;
        for &c in cuts {
            items.extend(s.feed(&data[last..c]));
            last = c;
        }
        items.extend(s.feed(&data[last..]));
        items.extend(s.finish());
        coalesce(items)
    }

    fn out(s: &[u8]) -> Item {
        Item::Output(s.to_vec())
    }

    #[test]
    fn finds_markers_mid_line() {
        let mut data = b"hello".to_vec();
        data.extend(start(0));
        data.extend(b"partial");
        data.extend(exit(0, 3));
        data.extend(b"tail\n");
        assert_eq!(
            scan_whole(&data),
            vec![
                out(b"hello"),
                Item::Start { line: 0 },
                out(b"partial"),
                Item::Exit { line: 0, code: 3 },
                out(b"tail\n"),
            ]
        );
    }

    #[test]
    fn marker_fed_byte_by_byte() {
        let mut data = b"a".to_vec();
        data.extend(start(7));
        data.extend(b"b\x1ec");
        data.extend(exit(7, -1));
        let mut s = MarkerScanner::new(NONCE);
        let mut items = Vec::new();
        for b in &data {
            items.extend(s.feed(std::slice::from_ref(b)));
        }
        items.extend(s.finish());
        assert_eq!(
            coalesce(items),
            vec![
                out(b"a"),
                Item::Start { line: 7 },
                out(b"b\x1ec"),
                Item::Exit { line: 7, code: -1 }
            ]
        );
    }

    #[test]
    fn output_is_not_held_back_needlessly() {
        let mut s = MarkerScanner::new(NONCE);
        assert_eq!(s.feed(b"abc"), vec![out(b"abc")]);
        // A lone lead byte might start a marker: held.
        assert_eq!(s.feed(b"x\x1e"), vec![out(b"x")]);
        assert_eq!(s.feed(b"y"), vec![out(b"\x1ey")]);
    }

    #[test]
    fn fake_markers_are_output() {
        let fakes: Vec<Vec<u8>> = vec![
            b"\x1eTRIB:deadbeef:S:0\n".to_vec(),
            format!("\x1eTRIB:{NONCE}:X:0\n").into_bytes(),
            format!("\x1eTRIB:{NONCE}:S:\n").into_bytes(),
            format!("\x1eTRIB:{NONCE}:S:1x\n").into_bytes(),
            format!("\x1eTRIB:{NONCE}:S:99999999999\n").into_bytes(),
            format!("\x1eTRIB:{NONCE}:E:1\n").into_bytes(),
            format!("\x1eTRIB:{NONCE}:E:1:-\n").into_bytes(),
            format!("TRIB:{NONCE}:S:0\n").into_bytes(),
        ];
        for fake in fakes {
            assert_eq!(
                scan_whole(&fake),
                vec![out(&fake)],
                "{:?}",
                String::from_utf8_lossy(&fake)
            );
        }
    }

    #[test]
    fn unfinished_marker_at_eof_is_output() {
        let data = format!("x\x1eTRIB:{NONCE}:E:2:");
        assert_eq!(scan_whole(data.as_bytes()), vec![out(data.as_bytes())]);
    }

    #[test]
    fn lead_byte_then_real_marker() {
        let mut data = b"\x1e".to_vec();
        data.extend(start(1));
        assert_eq!(
            scan_whole(&data),
            vec![out(b"\x1e"), Item::Start { line: 1 }]
        );
    }

    /// One generated piece of a stream and the items it must scan to.
    fn segment() -> impl Strategy<Value = (Vec<u8>, Vec<Item>)> {
        prop_oneof![
            // Arbitrary bytes, often containing the lead byte and marker-like text.
            prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    Just(MARKER_LEAD),
                    Just(b'T'),
                    Just(b'\n'),
                    Just(b':')
                ],
                1..40
            )
            .prop_map(|b| (b, Vec::new())),
            (0u32..1000).prop_map(|l| (start(l), vec![Item::Start { line: l }])),
            (0u32..1000, any::<i32>())
                .prop_map(|(l, c)| (exit(l, c), vec![Item::Exit { line: l, code: c }])),
            // Wrong nonce: always output.
            (0u32..1000).prop_map(|l| {
                let b = format!("\x1eTRIB:{}:S:{l}\n", "f".repeat(32)).into_bytes();
                (b.clone(), vec![Item::Output(b)])
            }),
        ]
    }

    proptest! {
        /// Any bytes split anywhere scan to the same items as the unsplit bytes.
        #[test]
        fn split_points_do_not_matter(
            segs in prop::collection::vec(segment(), 0..30),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let data: Vec<u8> = segs.iter().flat_map(|(b, _)| b.clone()).collect();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(scan_split(&data, &cuts), scan_whole(&data));
        }

        /// Without accidental markers in the random bytes, the scan finds exactly the markers
        /// that were written, and all other bytes as output, for any split.
        #[test]
        fn markers_are_found_exactly(
            segs in prop::collection::vec(segment(), 0..30),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let data: Vec<u8> = segs.iter().flat_map(|(b, _)| b.clone()).collect();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            cuts.sort_unstable();
            let expected = coalesce(segs.iter().flat_map(|(b, items)| {
                if items.is_empty() { vec![Item::Output(b.clone())] } else { items.clone() }
            }));
            prop_assert_eq!(scan_split(&data, &cuts), expected);
        }

        #[test]
        fn arbitrary_bytes_byte_by_byte(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let cuts: Vec<usize> = (0..=data.len()).collect();
            prop_assert_eq!(scan_split(&data, &cuts), scan_whole(&data));
        }
    }
}
