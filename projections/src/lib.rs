//! Read models: pure folds over the event log, persisted with their consumer offset
