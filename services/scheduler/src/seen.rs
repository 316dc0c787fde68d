//! Skipping re-delivered events: the consumer runtime's one memory of applied event ids
//! ([`tributary_eventlog::runtime::SeenIds`]), re-exported for the readers that follow a log
//! by hand (the API's live streams).

pub use tributary_eventlog::runtime::SeenIds;
