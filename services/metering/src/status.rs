//! Where an invoice stands, the one answer every `invoice` format and the web UI give.

use crate::calendar::Period;

/// An invoice's status: `live` while its month runs, `not_issued` once the month is over but
/// the metering service has not issued it yet (it does so `--close-after-hours` after the
/// month), `issued` once `invoice_issued` is on the log (it never changes after).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvoiceStatus {
    Live,
    NotIssued,
    Issued,
}

impl InvoiceStatus {
    /// The status of `period`'s invoice at `now_us`, `issued` saying whether its
    /// `invoice_issued` event exists.
    pub fn of(period: Period, issued: bool, now_us: i64) -> InvoiceStatus {
        if issued {
            InvoiceStatus::Issued
        } else if period.end_us() <= now_us {
            InvoiceStatus::NotIssued
        } else {
            InvoiceStatus::Live
        }
    }

    /// The name in the API's `Invoice.status` (and `invoice --format json|csv`).
    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Live => "live",
            InvoiceStatus::NotIssued => "not_issued",
            InvoiceStatus::Issued => "issued",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_is_live_until_it_ends_then_not_issued_until_issued() {
        let nov = Period::parse("2026-11").unwrap();
        let of = |issued, now_us| InvoiceStatus::of(nov, issued, now_us);
        assert_eq!(of(false, nov.start_us()), InvoiceStatus::Live);
        assert_eq!(of(false, nov.end_us() - 1), InvoiceStatus::Live);
        assert_eq!(of(false, nov.end_us()), InvoiceStatus::NotIssued);
        assert_eq!(
            of(false, nov.end_us() + 86_400_000_000),
            InvoiceStatus::NotIssued
        );
        assert_eq!(of(true, nov.end_us()), InvoiceStatus::Issued);
        // Issued is final, whatever the clock says.
        assert_eq!(of(true, nov.start_us()), InvoiceStatus::Issued);
        assert_eq!(InvoiceStatus::NotIssued.as_str(), "not_issued");
        assert_eq!(InvoiceStatus::Live.as_str(), "live");
        assert_eq!(InvoiceStatus::Issued.as_str(), "issued");
    }
}
