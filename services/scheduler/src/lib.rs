//! Scheduling decisions as pure functions over a folded build state, and the loop that interprets them
