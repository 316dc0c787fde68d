//! Runs a job's lines in one shell session, emitting per-line events and batched log chunks
