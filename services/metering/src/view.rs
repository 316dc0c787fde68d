//! What metering reads of an encoded event, without decoding all of it.
//!
//! A replay of millions of events spends most of its time in protobuf decoding: a full
//! [`Envelope`] allocates every string (seven per usage tick). Metering needs only usage ticks
//! (as borrowed text), job ends and invoices: [`view`] walks the encoded envelope once,
//! borrows a tick's strings from the record's bytes, decodes the few other events metering
//! folds with prost, and skips every other event without decoding it.
//!
//! Anything the walker does not expect (a field with an unexpected wire type, a payload given
//! twice, invalid UTF-8, a truncated buffer) is handed to prost's full decoder. So every tick,
//! job end and invoice reads exactly as `Envelope::decode` reads it, and a record is malformed
//! here only when prost says so too; the bytes of payloads metering skips are not checked
//! (prost may call such a record malformed: the fold ignores it either way).

use prost::Message;
use tributary_proto::events::{envelope::Payload, Envelope, UsageTick};

/// A usage tick with its envelope's fields, borrowed from the encoded record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tick<'a> {
    pub event_id: &'a str,
    pub tenant: &'a str,
    pub project: &'a str,
    pub build_id: &'a str,
    pub time_us: i64,
    pub job: &'a str,
    pub attempt: u32,
    pub machine_class: &'a str,
    pub millis: u64,
    pub seq: u32,
    pub last: bool,
    pub start_us: i64,
    pub end_us: i64,
}

impl<'a> Tick<'a> {
    /// The tick of a decoded envelope.
    pub fn of(env: &'a Envelope, t: &'a UsageTick) -> Tick<'a> {
        Tick {
            event_id: &env.event_id,
            tenant: &env.tenant,
            project: &env.project,
            build_id: &env.build_id,
            time_us: env.time_us,
            job: &t.job,
            attempt: t.attempt,
            machine_class: &t.machine_class,
            millis: t.millis,
            seq: t.seq,
            last: t.last,
            start_us: t.start_us,
            end_us: t.end_us,
        }
    }
}

/// An event as metering sees it.
#[derive(Debug, PartialEq)]
pub enum View<'a> {
    Tick(Tick<'a>),
    /// JobFinished, JobRequeued or InvoiceIssued decoded in full; also a usage tick the walker
    /// left to prost (an unexpected field shape somewhere in the record).
    Decoded(Box<Envelope>),
    /// Nothing metering folds (other payloads, unknown ones, none).
    Skip,
}

/// Payload field numbers of `Envelope` (events.proto) metering folds.
const USAGE_TICK: u32 = 25;
const JOB_FINISHED: u32 = 22;
const JOB_REQUEUED: u32 = 26;
const INVOICE_ISSUED: u32 = 30;

/// Reads `data` (an encoded `Envelope`) as metering needs it. Err: the record is malformed.
pub fn view(data: &[u8]) -> Result<View<'_>, prost::DecodeError> {
    match walk(data) {
        Some(Walked::Tick(t)) => Ok(View::Tick(t)),
        Some(Walked::Skip) => Ok(View::Skip),
        Some(Walked::Decode) | None => {
            let env = Envelope::decode(data)?;
            Ok(match env.payload {
                Some(Payload::UsageTick(_))
                | Some(Payload::JobFinished(_))
                | Some(Payload::JobRequeued(_))
                | Some(Payload::InvoiceIssued(_)) => View::Decoded(Box::new(env)),
                _ => View::Skip,
            })
        }
    }
}

enum Walked<'a> {
    Tick(Tick<'a>),
    Skip,
    /// Decode with prost (an event metering folds, or something the walker leaves to prost).
    Decode,
}

/// The fast path; None whenever prost must decide.
fn walk(data: &[u8]) -> Option<Walked<'_>> {
    let mut r = Reader(data);
    let mut tick = Tick::default();
    let mut payload: Option<(u32, &[u8])> = None;
    while !r.0.is_empty() {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, LEN) => tick.event_id = r.text()?,
            (2, LEN) => tick.tenant = r.text()?,
            (3, LEN) => tick.project = r.text()?,
            (4, LEN) => tick.build_id = r.text()?,
            (5, VARINT) => tick.time_us = r.varint()? as i64,
            (1..=5, _) => return None,
            (10..=99, LEN) => {
                let bytes = r.bytes()?;
                if payload.is_some() {
                    return None; // a oneof given twice: prost's merge rules decide
                }
                payload = Some((field, bytes));
            }
            (10..=99, _) => return None,
            _ => r.skip(wire)?,
        }
    }
    match payload {
        Some((USAGE_TICK, bytes)) => {
            walk_tick(bytes, &mut tick)?;
            Some(Walked::Tick(tick))
        }
        Some((JOB_FINISHED | JOB_REQUEUED | INVOICE_ISSUED, _)) => Some(Walked::Decode),
        // Another payload's bytes are not checked here; metering does not fold them.
        _ => Some(Walked::Skip),
    }
}

fn walk_tick<'a>(data: &'a [u8], t: &mut Tick<'a>) -> Option<()> {
    let mut r = Reader(data);
    while !r.0.is_empty() {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, LEN) => t.job = r.text()?,
            (2, VARINT) => t.attempt = r.varint()? as u32,
            (3, LEN) => {
                r.text()?; // agent_id: checked, not needed
            }
            (4, LEN) => t.machine_class = r.text()?,
            (5, VARINT) => t.millis = r.varint()?,
            (6, VARINT) => t.seq = r.varint()? as u32,
            (7, VARINT) => t.last = r.varint()? != 0,
            (8, VARINT) => t.start_us = r.varint()? as i64,
            (9, VARINT) => t.end_us = r.varint()? as i64,
            (1..=9, _) => return None,
            _ => r.skip(wire)?,
        }
    }
    Some(())
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            if i == 9 && b > 1 {
                return None;
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn key(&mut self) -> Option<(u32, u8)> {
        let k = u32::try_from(self.varint()?).ok()?;
        let field = k >> 3;
        (field > 0).then_some((field, (k & 7) as u8))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(b)
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn skip(&mut self, wire: u8) -> Option<()> {
        let n = match wire {
            VARINT => return self.varint().map(|_| ()),
            I64 => 8,
            LEN => return self.bytes().map(|_| ()),
            I32 => 4,
            _ => return None, // groups: prost decides
        };
        self.0 = self.0.get(n..)?;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tributary_proto::events::{JobFinished, LogChunk};

    fn agrees_with_prost(data: &[u8]) -> Result<(), TestCaseError> {
        let prost = Envelope::decode(data);
        match (view(data), prost) {
            (Ok(View::Tick(t)), Ok(env)) => match &env.payload {
                Some(Payload::UsageTick(u)) => prop_assert_eq!(t, Tick::of(&env, u)),
                other => prop_assert!(false, "tick vs {:?}", other),
            },
            (Ok(View::Decoded(e)), Ok(env)) => prop_assert_eq!(*e, env),
            (Ok(View::Skip), Ok(env)) => prop_assert!(!matches!(
                env.payload,
                Some(Payload::UsageTick(_))
                    | Some(Payload::JobFinished(_))
                    | Some(Payload::JobRequeued(_))
                    | Some(Payload::InvoiceIssued(_))
            )),
            (Ok(View::Skip), Err(_)) => {} // a payload metering skips, not checked
            (Err(_), Err(_)) => {}
            (v, p) => prop_assert!(false, "view {:?} but prost {:?}", v, p),
        }
        Ok(())
    }

    fn tick_env(t: UsageTick, tenant: &str, build: &str) -> Envelope {
        let mut env = Envelope::new(tenant, "web", build, Payload::UsageTick(t));
        env.time_us = 1_795_633_067_000_000;
        env
    }

    #[test]
    fn other_events_are_skipped_or_decoded_and_garbage_is_an_error() {
        let chunk = Envelope::new(
            "acme",
            "web",
            "b1",
            Payload::LogChunk(LogChunk {
                data: b"hello".to_vec(),
                ..LogChunk::default()
            }),
        );
        assert_eq!(view(&chunk.encode_to_vec()).unwrap(), View::Skip);
        let done = Envelope::new(
            "acme",
            "web",
            "b1",
            Payload::JobFinished(JobFinished {
                job: "build".into(),
                attempt: 2,
                ..JobFinished::default()
            }),
        );
        assert_eq!(
            view(&done.encode_to_vec()).unwrap(),
            View::Decoded(Box::new(done))
        );
        let none = Envelope {
            payload: None,
            ..chunk.clone()
        };
        assert_eq!(view(&none.encode_to_vec()).unwrap(), View::Skip);
        assert!(view(b"\xff\xff\xff").is_err());
        // A tick followed by a payload-range field with a fixed32 wire type: the walker leaves
        // it to prost, and metering still folds the tick.
        let tick = tick_env(UsageTick::default(), "acme", "b1");
        let mut odd = tick.encode_to_vec();
        odd.extend_from_slice(&[229, 2, 0, 0, 0, 0]);
        assert_eq!(view(&odd).unwrap(), View::Decoded(Box::new(tick)));
        let mut bad_utf8 = tick_env(UsageTick::default(), "acme", "b1").encode_to_vec();
        let at = bad_utf8.windows(4).position(|w| w == b"acme").unwrap();
        bad_utf8[at] = 0xff;
        assert!(
            view(&bad_utf8).is_err(),
            "invalid UTF-8 is malformed, as prost says"
        );
    }

    proptest! {
        /// The borrowed tick is exactly what prost decodes.
        #[test]
        fn a_tick_reads_as_prost_decodes_it(
            job in "\\PC{0,12}", class in "[a-z0-9-]{0,16}", tenant in "\\PC{0,8}",
            attempt in any::<u32>(), millis in any::<u64>(), seq in any::<u32>(),
            last in any::<bool>(), start in any::<i64>(), end in any::<i64>(),
        ) {
            let env = tick_env(
                UsageTick {
                    job, attempt, agent_id: "a-1".into(), machine_class: class, millis, seq,
                    last, start_us: start, end_us: end,
                },
                &tenant,
                "0190-build",
            );
            let bytes = env.encode_to_vec();
            let Some(Payload::UsageTick(t)) = &env.payload else { unreachable!() };
            prop_assert_eq!(view(&bytes).unwrap(), View::Tick(Tick::of(&env, t)));
        }

        /// Any bytes: the view never disagrees with prost about what metering folds.
        #[test]
        fn arbitrary_bytes_read_as_prost_reads_them(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            agrees_with_prost(&data)?;
        }

        /// Ticks with extra, repeated or mangled fields: still what prost says.
        #[test]
        fn mangled_ticks_read_as_prost_reads_them(
            seq in any::<u32>(), extra in proptest::collection::vec(any::<u8>(), 0..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let t = UsageTick { job: "build".into(), seq, millis: 10, ..UsageTick::default() };
            let mut bytes = tick_env(t, "acme", "b1").encode_to_vec();
            bytes.extend_from_slice(&extra);
            agrees_with_prost(&bytes)?;
            agrees_with_prost(&bytes[..cut.index(bytes.len() + 1)])?;
        }
    }
}
