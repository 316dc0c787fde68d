//! JSON rendering of events, for `tributary events --json` and the `watch` APIs.
//!
//! One flat object per event: `offset`, `type`, `event_id`, `tenant`, `project`, `build_id`,
//! `time_us`, then the payload's own fields (`job`, `step`, `line`, `exit_code`, ...).
//! Bytes are rendered as (lossy) UTF-8 text, enums by name.

use serde::Serializer;
use serde_json::{Map, Value};

use crate::events::{Envelope, Status, Stream};

/// The flat JSON object for one event at `offset`.
pub fn event_json(offset: u64, env: &Envelope) -> Value {
    let mut obj = Map::new();
    obj.insert("offset".into(), Value::from(offset));
    obj.insert("type".into(), Value::from(env.type_name()));
    obj.insert("event_id".into(), Value::from(env.event_id.clone()));
    obj.insert("tenant".into(), Value::from(env.tenant.clone()));
    obj.insert("project".into(), Value::from(env.project.clone()));
    obj.insert("build_id".into(), Value::from(env.build_id.clone()));
    obj.insert("time_us".into(), Value::from(env.time_us));
    if let Some(payload) = &env.payload {
        // Externally tagged: {"line_exited": {...}} -> merge the inner fields.
        if let Ok(Value::Object(outer)) = serde_json::to_value(payload) {
            for (_, inner) in outer {
                if let Value::Object(fields) = inner {
                    for (k, v) in fields {
                        obj.entry(k).or_insert(v);
                    }
                }
            }
        }
    }
    Value::Object(obj)
}

pub(crate) fn bytes_as_text<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(data))
}

pub(crate) fn status_name<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(Status::try_from(*v).map_or("unknown", Status::name))
}

pub(crate) fn stream_name<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(Stream::try_from(*v).map_or("unknown", Stream::name))
}
