//! Rust's unsigned numbers in SQL's signed `BIGINT` columns and back. A value that does not
//! fit is an error naming the column, never a silent 0 or a clamp: a read model that holds a
//! negative offset is damaged, and a write that would store a wrong number must not commit.

use crate::SqlStoreError;

/// A stored `BIGINT` read as a `u64` (offsets, sizes, microseconds, counters).
pub fn to_u64(value: i64, what: &'static str) -> Result<u64, SqlStoreError> {
    u64::try_from(value).map_err(|_| SqlStoreError::OutOfRange {
        what,
        value,
        range: "0..=2^63-1",
    })
}

/// A stored `BIGINT` read as a `u32` (partitions, attempts, counts).
pub fn to_u32(value: i64, what: &'static str) -> Result<u32, SqlStoreError> {
    u32::try_from(value).map_err(|_| SqlStoreError::OutOfRange {
        what,
        value,
        range: "0..=4294967295",
    })
}

/// A `u64` to store in a `BIGINT` column.
pub fn to_i64(value: u64, what: &'static str) -> Result<i64, SqlStoreError> {
    i64::try_from(value).map_err(|_| SqlStoreError::TooLarge { what, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_range_values_convert_exactly() {
        assert_eq!(to_u64(0, "x").unwrap(), 0);
        assert_eq!(to_u64(i64::MAX, "x").unwrap(), i64::MAX as u64);
        assert_eq!(to_u32(0, "x").unwrap(), 0);
        assert_eq!(to_u32(u32::MAX as i64, "x").unwrap(), u32::MAX);
        assert_eq!(to_i64(0, "x").unwrap(), 0);
        assert_eq!(to_i64(i64::MAX as u64, "x").unwrap(), i64::MAX);
    }

    #[test]
    fn out_of_range_values_are_errors_naming_the_column() {
        for e in [
            to_u64(-1, "next_offset").unwrap_err(),
            to_u32(-1, "next_offset").unwrap_err(),
            to_u32(u32::MAX as i64 + 1, "next_offset").unwrap_err(),
            to_i64(i64::MAX as u64 + 1, "next_offset").unwrap_err(),
            to_i64(u64::MAX, "next_offset").unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(text.contains("next_offset"), "{text}");
        }
        let text = to_u32(-7, "attempt").unwrap_err().to_string();
        assert!(text.contains("-7") && text.contains("replay"), "{text}");
    }
}
