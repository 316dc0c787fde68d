//! Which event types a fold wants, and the look at an encoded record that tells, without
//! decoding it.
//!
//! An [`Envelope`](tributary_proto::events::Envelope) is five header fields (numbers 1-5) and a
//! `payload` oneof whose field number (10-99 in `events.proto`) is the event type. [`peek`]
//! walks the record's top-level fields (a few varints, no allocation) to find that number, so
//! the driver decodes only the records a fold wants.

/// A set of payload field numbers (`Envelope.payload` in `events.proto`), or every event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Bit `n` set: payload field `n` is wanted.
    fields: u128,
    /// Whether payload fields of 128 and more are wanted.
    rest: bool,
}

/// Payload field numbers of the events a job's output is made of, by far the most numerous:
/// log chunks, steps and lines, usage ticks.
pub const JOB_OUTPUT: [u32; 6] = [
    16, // StepStarted
    17, // LineStarted
    18, // LogChunk
    19, // LineExited
    20, // StepFinished
    25, // UsageTick
];

impl Interest {
    /// Every event, decoded (unknown payloads included: they are logged and counted).
    pub const ALL: Interest = Interest {
        fields: u128::MAX,
        rest: true,
    };

    /// Only the events whose payload field number is in `fields` (numbers of 128 and more
    /// are ignored: `events.proto` keeps payloads below 100).
    pub const fn of(fields: &[u32]) -> Interest {
        Interest {
            fields: bits(fields),
            rest: false,
        }
    }

    /// Every event but those whose payload field number is in `fields`: for folds that want
    /// whatever new event types come, except some they know they never read.
    pub const fn except(fields: &[u32]) -> Interest {
        Interest {
            fields: !bits(fields),
            rest: true,
        }
    }

    /// Whether every event is wanted.
    pub fn is_all(self) -> bool {
        self == Interest::ALL
    }

    /// Whether a record with payload field `field` is wanted.
    pub fn wants(self, field: u32) -> bool {
        if field < 128 {
            self.fields & (1u128 << field) != 0
        } else {
            self.rest
        }
    }

    /// What to do with the encoded envelope `data`.
    pub fn admits(self, data: &[u8]) -> Admit {
        if self.is_all() {
            return Admit::Decode;
        }
        match peek(data) {
            Peek::Payload(field) if self.wants(field) => Admit::Decode,
            // Without a payload: an unknown event type or none; a fold that takes whatever
            // comes decodes it (logged and counted), the others skip it.
            Peek::NoPayload if self.rest => Admit::Decode,
            Peek::Payload(_) | Peek::NoPayload => Admit::Skip,
            // Let the decoder say what is wrong (it logs and counts the record).
            Peek::Unsure => Admit::Decode,
        }
    }
}

const fn bits(fields: &[u32]) -> u128 {
    let mut bits = 0u128;
    let mut i = 0;
    while i < fields.len() {
        if fields[i] < 128 {
            bits |= 1u128 << fields[i];
        }
        i += 1;
    }
    bits
}

/// [`Interest::admits`]'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Decode,
    /// Not wanted: skipped undecoded (not counted as skipped: it is not this fold's business).
    Skip,
}

/// What [`peek`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peek {
    /// The payload's field number.
    Payload(u32),
    /// A well-formed envelope without any payload field.
    NoPayload,
    /// Malformed, truncated, or a payload given twice: only a full decode can tell.
    Unsure,
}

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// The payload field number of the encoded envelope `data`.
pub fn peek(data: &[u8]) -> Peek {
    let mut at = 0usize;
    let mut found = None;
    while at < data.len() {
        let Some(key) = varint(data, &mut at) else {
            return Peek::Unsure;
        };
        let (field, wire) = (key >> 3, key & 7);
        let Ok(field) = u32::try_from(field) else {
            return Peek::Unsure;
        };
        match wire {
            VARINT => {
                if varint(data, &mut at).is_none() {
                    return Peek::Unsure;
                }
            }
            FIXED64 => at += 8,
            FIXED32 => at += 4,
            LEN => {
                let Some(len) = varint(data, &mut at).and_then(|l| usize::try_from(l).ok()) else {
                    return Peek::Unsure;
                };
                at = match at.checked_add(len) {
                    Some(end) => end,
                    None => return Peek::Unsure,
                };
                if field >= 10 {
                    if found.is_some() {
                        return Peek::Unsure;
                    }
                    found = Some(field);
                }
            }
            _ => return Peek::Unsure,
        }
    }
    if at != data.len() {
        return Peek::Unsure;
    }
    match found {
        Some(field) => Peek::Payload(field),
        None => Peek::NoPayload,
    }
}

fn varint(data: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tributary_proto::events::envelope::Payload;
    use tributary_proto::events::{Envelope, JobQueued, TenantCreated};

    #[test]
    fn peek_finds_the_payload_field_number() {
        let env = Envelope::new(
            "t",
            "p",
            "b",
            Payload::JobQueued(JobQueued {
                job: "j".into(),
                attempt: 2,
            }),
        );
        assert_eq!(peek(&env.encode_to_vec()), Peek::Payload(13));
        let env = Envelope::new(
            "t",
            "",
            "",
            Payload::TenantCreated(TenantCreated::default()),
        );
        assert_eq!(peek(&env.encode_to_vec()), Peek::Payload(40));
        let none = Envelope {
            payload: None,
            ..env.clone()
        };
        assert_eq!(peek(&none.encode_to_vec()), Peek::NoPayload);
        assert_eq!(peek(&[0xff, 0xff, 0xff]), Peek::Unsure);
        let mut truncated = env.encode_to_vec();
        truncated.pop();
        assert_eq!(peek(&truncated), Peek::Unsure);
    }

    #[test]
    fn interest_decodes_only_what_it_wants_and_whatever_it_cannot_tell() {
        let queued = Envelope::new("t", "", "b", Payload::JobQueued(JobQueued::default()));
        let tenant = Envelope::new(
            "t",
            "",
            "",
            Payload::TenantCreated(TenantCreated::default()),
        );
        let only_queued = Interest::of(&[13]);
        assert_eq!(only_queued.admits(&queued.encode_to_vec()), Admit::Decode);
        assert_eq!(only_queued.admits(&tenant.encode_to_vec()), Admit::Skip);
        assert_eq!(only_queued.admits(b"\xff\xff"), Admit::Decode);
        assert_eq!(Interest::ALL.admits(&tenant.encode_to_vec()), Admit::Decode);
        assert!(Interest::of(&[200]) == Interest::of(&[]));
        let but_chunks = Interest::except(&JOB_OUTPUT);
        assert_eq!(but_chunks.admits(&queued.encode_to_vec()), Admit::Decode);
        let chunk = Envelope::new("t", "", "b", Payload::LogChunk(Default::default()));
        assert_eq!(but_chunks.admits(&chunk.encode_to_vec()), Admit::Skip);
        assert!(but_chunks.wants(85), "an event type added later is wanted");
    }
}
